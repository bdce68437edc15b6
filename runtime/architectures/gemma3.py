"""Gemma 3 (text): Llama-like attention and a gated MLP, with
  * embeddings multiplied by sqrt(hidden_size),
  * RMSNorm weights used as (1 + w) (stored as HF stores them; the model adds 1 at load),
  * four norms per layer: before and after attention, before and after the MLP (the "after" norms
    apply to the branch output before it joins the residual stream),
  * an RMSNorm over each query and key head (q_norm, k_norm) before RoPE,
  * GeGLU: gelu_tanh(gate) * up,
  * attention scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2,
  * sliding-window layers interleaved with global ones (layer_types), each kind with its own RoPE:
    sliding layers rope_local_base_freq without scaling, global layers rope_theta with rope_scaling.
Logit soft-capping is not implemented (Gemma 3 ships without it): a config that sets it is refused.
"""
from ..errors import ModelError
from .base import (Family, Field, Refusal, attention_tensors, common_fields, embedding_and_head, mlp_tensors, norm,
                   register, window_fields)


def pattern_layer_types(fields) -> list:
    """HF's default for configs without layer_types: every 6th layer global (sliding_window_pattern)."""
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(fields["num_hidden_layers"])]


def read_hf(raw: dict) -> dict:
    """transformers 5 nests RoPE per layer kind: rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}; older configs say rope_theta, rope_scaling, rope_local_base_freq and
    sliding_window_pattern."""
    out = {}
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if not isinstance(full, dict) or not isinstance(local, dict):
            raise ModelError("rope_parameters.full_attention and .sliding_attention must be objects")
        if local.get("rope_type", "default") != "default":
            raise ModelError(f"rope_parameters.sliding_attention.rope_type {local.get('rope_type')!r:.40} is not "
                             "supported (sliding layers use default RoPE)")
        out["rope_theta"] = full.get("rope_theta", 1_000_000.0)
        out["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
        kind = full.get("rope_type", "default")
        out["rope_scaling"] = None if kind == "default" else {k: v for k, v in full.items() if k != "rope_theta"}
    pattern = raw.get("sliding_window_pattern")
    if "layer_types" not in raw and isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        layers = raw.get("num_hidden_layers")
        if isinstance(layers, int) and 0 < layers < 1 << 16:
            out["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    return out


def hf_spelling(c) -> dict:
    full = {"rope_type": "default", **(c.rope_scaling.to_json() if c.rope_scaling else {}), "rope_theta": c.rope_theta}
    return {"rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base_freq}},
            "rope_local_base_freq": c.rope_local_base_freq,
            # transformers' Gemma3TextConfig insists on an int here
            "query_pre_attn_scalar": int(c.query_pre_attn_scalar) if c.query_pre_attn_scalar.is_integer()
            else c.query_pre_attn_scalar}


GEMMA3 = register(Family(
    name="gemma3", hf_architectures=("Gemma3ForCausalLM",), model_type="gemma3_text",
    fields=common_fields(max_position_embeddings=131072, rope_theta=1_000_000.0, tie_word_embeddings=True)
    + window_fields(pattern_layer_types)
    + (Field("rope_local_base_freq", "positive_number", 10_000.0),
       Field("query_pre_attn_scalar", "positive_number", 256.0)),
    tensors=embedding_and_head(),
    layer_tensors=(norm("input_layernorm", "attn_norm"),
                   *attention_tensors("attention_bias", "attention_bias", qk_norm=True),
                   norm("post_attention_layernorm", "attn_out_norm"),
                   norm("pre_feedforward_layernorm", "mlp_norm"),
                   norm("post_feedforward_layernorm", "mlp_out_norm"),
                   *mlp_tensors()),
    refused=(Refusal("hidden_activation", ("gelu_pytorch_tanh",), "the MLP activation must be gelu_pytorch_tanh"),
             Refusal("final_logit_softcapping", (), "logit soft-capping is not implemented"),
             Refusal("attn_logit_softcapping", (), "attention soft-capping is not implemented"),
             Refusal("use_bidirectional_attention", (False,), "causal attention only")),
    activation="gelu_tanh",
    norm_offset=1.0,
    embed_scale=True,
    hf_fixed={"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
              "attn_logit_softcapping": None},
    hf_spelling=hf_spelling,
    hf_reader=read_hf,
))
