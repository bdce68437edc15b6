"""Qwen3: the Llama block with an RMSNorm over each query and key head (q_norm, k_norm, applied
before RoPE), no biases by default, an optional sliding window on the upper layers (as Qwen2)."""
from .base import (UNUSED_ROTARY, Family, Field, common_fields, embedding_and_head, llama_like_layer, register,
                   window_fields)
from .llama import NO_MLP_BIAS, SILU_ONLY, qwen_layer_types, qwen_window

QWEN3 = register(Family(
    name="qwen3", hf_architectures=("Qwen3ForCausalLM",), model_type="qwen3",
    fields=common_fields(max_position_embeddings=32768) + (Field("use_sliding_window", "boolean", False),
                                              Field("max_window_layers", "count", 28))
    + window_fields(qwen_layer_types),
    tensors=embedding_and_head(),
    layer_tensors=llama_like_layer("attention_bias", "attention_bias", qk_norm=True),
    refused=(SILU_ONLY, NO_MLP_BIAS),
    unused=UNUSED_ROTARY,
    hf_fixed={"hidden_act": "silu"},
    hf_reader=qwen_window,
))
