"""Phi-3 / Phi-4-mini: the Llama block with fused projections in the checkpoint (qkv_proj = q; k; v
stacked along rows, gate_up_proj = gate; up), an optional sliding window over every layer, and
partial rotary embeddings (partial_rotary_factor: only the leading dims of each head rotate).

Fused tensors are split at conversion, not quantized fused. After the split a Phi-3 layer is
exactly a Llama layer: the runtime, the kernels, calibration and the MILP see the same seven
linears per layer as every other family, each with its own bit width (q, k and v have different
sensitivities, and the split costs nothing: rows of a row-major tensor are contiguous, so each part is
a byte range of the checkpoint tensor). export-hf re-fuses them (`fused`), so transformers loads
the result as Phi3ForCausalLM. LongRoPE scaling (the 128k variants) is not implemented: refused.
"""
from .base import (UNUSED_ROTARY, Family, Field, Fused, common_fields, embedding_and_head, every_layer_slides,
                   llama_like_layer, register, window_fields)
from .llama import SILU_ONLY


def read_hf(raw: dict) -> dict:
    """partial_rotary_factor lives in rope_parameters (transformers 5) or at the top level."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return {"partial_rotary_factor": params["partial_rotary_factor"]}
    return {}


def hf_spelling(c) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta,
                                "partial_rotary_factor": c.partial_rotary_factor},
            "original_max_position_embeddings": c.max_position_embeddings}


PHI3 = register(Family(
    name="phi3", hf_architectures=("Phi3ForCausalLM",), model_type="phi3",
    fields=tuple(f for f in common_fields(rms_norm_eps=1e-5, max_position_embeddings=4096)
                 if f.name != "attention_bias")
    + window_fields(every_layer_slides) + (Field("partial_rotary_factor", "fraction", 1.0),),
    tensors=embedding_and_head(),
    layer_tensors=llama_like_layer(),
    refused=(SILU_ONLY,),
    fused=(Fused("model.layers.{i}.self_attn.qkv_proj.weight",
                 ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                  "model.layers.{i}.self_attn.v_proj.weight")),
           Fused("model.layers.{i}.mlp.gate_up_proj.weight",
                 ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"))),
    unused=UNUSED_ROTARY,
    hf_fixed={"hidden_act": "silu"},
    hf_omit=("layer_types",),  # derived from sliding_window; Phi3Config has no such field
    hf_spelling=hf_spelling,
    hf_reader=read_hf,
))
