"""The model configuration of a .mxq file (SPEC.md §3.1), validated, plus RoPE frequencies.

Every problem is a ModelError naming the field, so a bad file fails at load with one clear line
instead of somewhere inside the forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ModelError

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 0.0  # llama3 only
    high_freq_factor: float = 0.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hf_architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # may differ from hidden_size // num_attention_heads
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple  # ints; from the model config (the tokenizer may add more)

    @classmethod
    def from_json(cls, model: dict) -> "ModelConfig":
        if not isinstance(model, dict):
            raise ModelError("the file's 'model' object is missing or not an object")
        r = _Fields(model)
        architecture = r.string("architecture")
        if architecture not in ARCHITECTURES:
            raise ModelError(f"model.architecture {architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        hidden, heads = r.positive_int("hidden_size"), r.positive_int("num_attention_heads")
        kv_heads = r.positive_int("num_key_value_heads")
        if heads % kv_heads:
            raise ModelError(f"model.num_attention_heads ({heads}) is not a multiple of "
                             f"model.num_key_value_heads ({kv_heads})")
        head_dim = model.get("head_dim")
        head_dim = hidden // heads if head_dim is None else r.positive_int("head_dim")
        if head_dim % 2:
            raise ModelError(f"model.head_dim must be even for rotary embeddings, got {head_dim}")
        return cls(
            architecture=architecture,
            hf_architecture=model.get("hf_architecture") if isinstance(model.get("hf_architecture"), str) else "",
            vocab_size=r.positive_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.positive_int("intermediate_size"),
            num_hidden_layers=r.positive_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=r.positive_int("max_position_embeddings"),
            rms_norm_eps=r.positive_number("rms_norm_eps"),
            rope_theta=r.positive_number("rope_theta"),
            rope_scaling=_rope_scaling(model.get("rope_scaling")),
            tie_word_embeddings=r.boolean("tie_word_embeddings", default=False),
            attention_bias=r.boolean("attention_bias", default=False),
            bos_token_id=r.optional_token("bos_token_id"),
            eos_token_ids=r.token_list("eos_token_id"),
        )

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, (head_dim // 2,) float32, computed in float32 like transformers'
        ROPE_INIT_FUNCTIONS (default, linear, llama3) so angles agree bit for bit where possible."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s.rope_type == "linear":
            return (inv_freq / np.float32(s.factor)).astype(np.float32)
        # llama3 (transformers' _compute_llama3_parameters)
        old_context_len = s.original_max_position_embeddings
        low_freq_wavelen = old_context_len / s.low_freq_factor
        high_freq_wavelen = old_context_len / s.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
        smooth = (np.float32(old_context_len) / wavelen - np.float32(s.low_freq_factor)) / np.float32(
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / np.float32(s.factor) + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def _rope_scaling(raw) -> RopeScaling | None:
    """null, {"rope_type": ...} or the older {"type": ...} spelling; "default" means none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelError("model.rope_scaling must be null or an object")
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"model.rope_scaling.rope_type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return None
    r = _Fields(raw, "model.rope_scaling.")
    if rope_type == "linear":
        return RopeScaling("linear", r.positive_number("factor"))
    scaling = RopeScaling("llama3", r.positive_number("factor"), r.positive_number("low_freq_factor"),
                          r.positive_number("high_freq_factor"), r.positive_int("original_max_position_embeddings"))
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ModelError("model.rope_scaling.high_freq_factor must be greater than low_freq_factor")
    return scaling


class _Fields:
    """Typed accessors raising ModelError that name the field."""

    def __init__(self, obj: dict, prefix: str = "model."):
        self.obj, self.prefix = obj, prefix

    def _get(self, key):
        if key not in self.obj or self.obj[key] is None:
            raise ModelError(f"{self.prefix}{key} is missing")
        return self.obj[key]

    def string(self, key) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise ModelError(f"{self.prefix}{key} must be a string, got {value!r:.40}")
        return value

    def positive_int(self, key) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{self.prefix}{key} must be a positive integer, got {value!r:.40}")
        return value

    def positive_number(self, key) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ModelError(f"{self.prefix}{key} must be a positive number, got {value!r:.40}")
        return float(value)

    def boolean(self, key, default: bool) -> bool:
        value = self.obj.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ModelError(f"{self.prefix}{key} must be true or false, got {value!r:.40}")
        return value

    def optional_token(self, key) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelError(f"{self.prefix}{key} must be a token id or null, got {value!r:.40}")
        return value

    def token_list(self, key) -> tuple:
        value = self.obj.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ModelError(f"{self.prefix}{key} must be a token id, a list of them, or null, got {value!r:.40}")
        return tuple(values)
