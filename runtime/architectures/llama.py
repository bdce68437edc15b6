"""The Llama family and its variants that differ only in data: Llama, Mistral, Qwen2.

    x = embed(ids)
    per layer:  x += o(attention(rope(q(n)), rope(k(n)), v(n)))  with n = rms_norm(x)
                x += down(silu(gate(n)) * up(n))                 with n = rms_norm(x)
    logits = lm_head(rms_norm(x))

Llama: optional biases on q/k/v/o (`attention_bias`). Mistral: no biases, a sliding window over every
layer. Qwen2: q/k/v biases always, optional sliding window on the upper layers.
"""
from .base import (UNUSED_ROTARY, Family, Field, Refusal, common_fields, embedding_and_head, every_layer_slides,
                   llama_like_layer, register, window_fields)

SILU_ONLY = Refusal("hidden_act", ("silu",), "the MLP activation must be silu")
NO_MLP_BIAS = Refusal("mlp_bias", (False,), "MLP projections without biases only")


def qwen_window(raw: dict) -> dict:
    """Qwen2/3: sliding_window counts only with use_sliding_window (HF sets it to null otherwise)."""
    if raw.get("use_sliding_window") is not True:
        return {"sliding_window": None, "layer_types": None}
    return {}


def qwen2_read_hf(raw: dict) -> dict:
    return {**qwen_window(raw), "attention_bias": True}  # Qwen2's q/k/v projections always have biases


def qwen_layer_types(fields) -> list:
    """HF's default: layers from max_window_layers on slide when a window is set."""
    window = fields["sliding_window"]
    return ["sliding_attention" if window is not None and i >= fields["max_window_layers"] else "full_attention"
            for i in range(fields["num_hidden_layers"])]


LLAMA = register(Family(
    name="llama", hf_architectures=("LlamaForCausalLM",), model_type="llama",
    fields=common_fields(),
    tensors=embedding_and_head(),
    layer_tensors=llama_like_layer(qkv_bias="attention_bias", o_bias="attention_bias"),
    refused=(SILU_ONLY, NO_MLP_BIAS),
    unused=UNUSED_ROTARY,
    hf_fixed={"hidden_act": "silu", "mlp_bias": False},
))

MISTRAL = register(Family(
    name="mistral", hf_architectures=("MistralForCausalLM",), model_type="mistral",
    fields=tuple(f for f in common_fields(max_position_embeddings=131072) if f.name != "attention_bias")
    + window_fields(every_layer_slides),
    tensors=embedding_and_head(),
    layer_tensors=llama_like_layer(),
    refused=(SILU_ONLY,),
    unused=UNUSED_ROTARY,
    hf_fixed={"hidden_act": "silu"},
    hf_omit=("layer_types",),  # derived from sliding_window (transformers reads a Mistral config with
                               # layer_types as Ministral)
))

QWEN2_FIELDS = (tuple(f for f in common_fields(max_position_embeddings=32768) if f.name != "attention_bias")
                + (Field("attention_bias", "boolean", True),  # q/k/v biases: always there in Qwen2
                   Field("use_sliding_window", "boolean", False), Field("max_window_layers", "count", 28))
                + window_fields(qwen_layer_types))

QWEN2 = register(Family(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",), model_type="qwen2",
    fields=QWEN2_FIELDS,
    tensors=embedding_and_head(),
    layer_tensors=llama_like_layer(qkv_bias="attention_bias"),
    refused=(SILU_ONLY,),
    unused=UNUSED_ROTARY,
    hf_fixed={"hidden_act": "silu"},
    hf_reader=qwen2_read_hf,
))
