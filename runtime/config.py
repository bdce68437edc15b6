"""The validated model configuration (SPEC.md §3.1), derived from the family contract
(runtime/architectures): the family's `fields` say which config entries exist, of what kind and
with what default; this module is the one grammar that checks them. It reads both a .mxq file's
`model` object (`from_json`) and, through `from_hf`, a Hugging Face config.json — so a file mxq
writes (`to_json`) is always a file mxq can run. Every problem is one ModelError naming the field.

Also here: RoPE inverse frequencies per layer (`inv_freq`), computed like transformers does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .architectures import REFUSED_HF, family, family_of_hf, families, supported_hf
from .architectures.base import REQUIRED, Family, hf_rope
from .errors import ModelError

MAX_INT = 2 ** 31  # ids and sizes fit an int32 everywhere (kernels, numpy indices)
# real-valued fields are used in float32 arithmetic: they must be normal float32 numbers
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 0.0  # llama3 only
    high_freq_factor: float = 0.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3 only

    def to_json(self) -> dict:
        out = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Field names are the HF names. Fields a family does not read keep their neutral default."""
    architecture: str  # the family (runtime/architectures), e.g. "llama", "gemma3"
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
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()  # ints; from the model config (the tokenizer may add more)
    sliding_window: int | None = None
    layer_types: tuple = ()  # per layer "full_attention" | "sliding_attention"
    rope_local_base_freq: float | None = None  # Gemma 3: RoPE base of sliding layers (no scaling)
    query_pre_attn_scalar: float | None = None  # Gemma 3: attention scale is its -1/2 power
    partial_rotary_factor: float = 1.0  # Phi-3/4: fraction of each head's dims that are rotated
    use_sliding_window: bool = False  # Qwen2/3 (kept for export)
    max_window_layers: int = 0  # Qwen2/3 (kept for export)
    family: Family = field(default=None, compare=False, repr=False)

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, model, where: str = "model.") -> "ModelConfig":
        """A .mxq `model` object (or the canonical dict from_hf builds). `where` prefixes field
        names in error messages."""
        if not isinstance(model, dict):
            raise ModelError("the file's 'model' object is missing or not an object")
        architecture = model.get("architecture")
        fam = family(architecture) if isinstance(architecture, str) else None
        if fam is None:
            raise ModelError(f"{where}architecture {architecture!r:.40} is not supported "
                             f"(supported: {', '.join(families())})")
        hf_architecture = model.get("hf_architecture", fam.hf_architectures[0])
        if hf_architecture not in fam.hf_architectures:
            raise ModelError(f"{where}hf_architecture must be one of {', '.join(fam.hf_architectures)} for a "
                             f"{fam.name} model, got {hf_architecture!r:.40}")
        refuse(fam, model, where)
        values = _Grammar(model, where).read(fam.fields)
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            raise ModelError(f"{where}num_attention_heads ({values['num_attention_heads']}) is not a multiple of "
                             f"{where}num_key_value_heads ({values['num_key_value_heads']})")
        eos = values.pop("eos_token_id")
        config = cls(architecture=fam.name, hf_architecture=hf_architecture, eos_token_ids=eos,
                     family=fam, **values)
        if config.rotary_dim % 2 or config.rotary_dim == 0:
            raise ModelError(f"{where}head_dim ({config.head_dim}) × partial_rotary_factor "
                             f"({config.partial_rotary_factor}) must give an even number of rotary dims")
        last = np.float32(config.max_position_embeddings)
        for kind in dict.fromkeys(config.layer_types):  # each kind of layer has its own RoPE settings
            inv_freq = config.inv_freq(config.layer_types.index(kind))
            with np.errstate(all="ignore"):  # the angles of the last position must be finite too
                finite = np.isfinite(inv_freq).all() and np.isfinite(last * inv_freq).all()
            if not finite:
                raise ModelError(f"{where}rope_theta / rope_scaling give non-finite RoPE frequencies "
                                 f"or angles in float32 ({kind} layers)")
        return config

    @classmethod
    def from_hf(cls, raw) -> "ModelConfig":
        """A Hugging Face config.json object, read through its family's spellings."""
        if not isinstance(raw, dict):
            raise ModelError("config.json is not a JSON object")
        architectures = raw.get("architectures")
        if (not isinstance(architectures, list) or not architectures
                or not all(isinstance(a, str) for a in architectures)):
            raise ModelError(f"architectures must be a list of strings, got {architectures!r:.60}")
        hf = architectures[0]
        if hf in REFUSED_HF:
            raise ModelError(f"architecture {hf}: {REFUSED_HF[hf]}")
        fam = family_of_hf(hf)
        if fam is None:
            raise ModelError(f"architecture {hf!r:.60} is not supported (supported: {', '.join(supported_hf())})")
        refuse(fam, raw, "")
        canonical = {f.name: raw[f.name] for f in fam.fields if f.name in raw}
        canonical.update(hf_rope(raw))
        if fam.hf_reader is not None:
            canonical.update(fam.hf_reader(raw))
        return cls.from_json({"architecture": fam.name, "hf_architecture": hf, **canonical}, where="")

    def to_json(self) -> dict:
        """The .mxq `model` object: the family's fields, canonical spelling (from_json reads it back)."""
        out = {"architecture": self.architecture, "hf_architecture": self.hf_architecture}
        for f in self.family.fields:
            value = getattr(self, "eos_token_ids" if f.name == "eos_token_id" else f.name)
            if f.name == "eos_token_id":
                value = list(value)
            elif f.name == "rope_scaling":
                value = value and value.to_json()
            elif f.name == "layer_types":
                value = list(value)
            out[f.name] = value
        return out

    # -- derived ----------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def untied(self) -> bool:
        return not self.tie_word_embeddings

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float | None:
        """Softmax scale when it is not 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar^-1/2)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

    @property
    def embed_scale(self) -> float | None:
        """Factor on the embeddings (Gemma: sqrt(hidden_size)), else None."""
        return math.sqrt(self.hidden_size) if self.family.embed_scale else None

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer i (keys at positions p - window < j <= p), None for full attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    def inv_freq(self, layer: int = 0) -> np.ndarray:
        """RoPE inverse frequencies of `layer`, (rotary_dim // 2,) float32, computed in float32 like
        transformers' ROPE_INIT_FUNCTIONS (default, linear, llama3) so angles agree bit for bit where
        possible. Gemma 3's sliding layers use rope_local_base_freq without scaling."""
        theta, s = self.rope_theta, self.rope_scaling
        if self.rope_local_base_freq is not None and self.layer_types[layer] == "sliding_attention":
            theta, s = self.rope_local_base_freq, None
        with np.errstate(all="ignore"):  # hostile settings overflow: from_json refuses non-finite results
            return self._inv_freq(theta, s)

    def _inv_freq(self, theta, s) -> np.ndarray:
        dim = self.rotary_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
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


def refuse(fam: Family, obj: dict, where: str) -> None:
    """One line naming the first config feature of `obj` the family does not implement."""
    for r in fam.refused:
        value = obj.get(r.name)
        if value is not None and not any(value is a or (type(value) is type(a) and value == a) for a in r.allowed):
            raise ModelError(f"{where}{r.name} = {value!r:.40} is not supported ({r.why})")


class _Grammar:
    """Reads fields of one kind each (Field.kind) from a JSON object, naming the field on error."""

    def __init__(self, obj: dict, where: str):
        self.obj, self.where = obj, where
        self.values: dict = {}

    def read(self, fields) -> dict:
        """{field name: checked value}; null or absent means the field's default."""
        for f in fields:
            raw = self.obj.get(f.name)
            if raw is None:
                if f.default is REQUIRED:
                    raise ModelError(f"{self.where}{f.name} is missing")
                raw = f.default(self.values) if callable(f.default) else f.default
            self.values[f.name] = getattr(self, f.kind)(f.name, raw)
            if f.limit is not None and self.values[f.name] > f.limit:
                raise ModelError(f"{self.where}{f.name} = {raw} is beyond the supported {f.limit}")
        if "layer_types" not in self.values:  # families without sliding windows
            self.values["layer_types"] = self.layer_types("layer_types", None)
        return self.values

    def fail(self, key, expected, value):
        raise ModelError(f"{self.where}{key} must be {expected}, got {value!r:.40}")

    @staticmethod
    def _is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def positive_int(self, key, value) -> int:
        if not self._is_int(value) or not 0 < value < MAX_INT:
            self.fail(key, "a positive integer below 2^31", value)
        return value

    def count(self, key, value) -> int:
        if not self._is_int(value) or not 0 <= value < MAX_INT:
            self.fail(key, "a non-negative integer below 2^31", value)
        return value

    def optional_positive_int(self, key, value):
        return None if value is None else self.positive_int(key, value)

    def positive_number(self, key, value) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value)
                or not FLOAT32_TINY <= value <= FLOAT32_MAX):
            self.fail(key, f"a positive number in float32's range [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}]", value)
        return float(value)

    def fraction(self, key, value) -> float:
        number = self.positive_number(key, value)
        if number > 1:
            self.fail(key, "a number in (0, 1]", value)
        return number

    def boolean(self, key, value) -> bool:
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def token(self, key, value):
        if value is None:
            return None
        vocab = self.values["vocab_size"]
        if not self._is_int(value) or not 0 <= value < vocab:
            self.fail(key, f"a token id in [0, {vocab}) or null", value)
        return value

    def tokens(self, key, value) -> tuple:
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        vocab = self.values["vocab_size"]
        if len(values) > 1024 or not all(self._is_int(v) and 0 <= v < vocab for v in values):
            self.fail(key, f"a token id in [0, {vocab}), a list of them, or null", value)
        return tuple(values)

    def layer_types(self, key, value) -> tuple:
        n = self.values["num_hidden_layers"]
        if value is None:
            return ("full_attention",) * n
        if not isinstance(value, list) or len(value) != n or not all(v in LAYER_TYPES for v in value):
            self.fail(key, f"a list of {n} entries from {LAYER_TYPES}", value)
        if "sliding_attention" in value and self.values.get("sliding_window") is None:
            raise ModelError(f"{self.where}layer_types has sliding layers but {self.where}sliding_window is null")
        return tuple(value)

    def rope_scaling(self, key, raw) -> RopeScaling | None:
        """null, {"rope_type": ...} or the older {"type": ...} spelling; "default" means none."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            self.fail(key, "null or an object", raw)
        rope_type = raw.get("rope_type", raw.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"{self.where}{key}.rope_type {rope_type!r:.40} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        if rope_type == "default":
            return None
        inner = _Grammar(raw, f"{self.where}{key}.")

        def need(name, kind):
            if raw.get(name) is None:
                raise ModelError(f"{self.where}{key}.{name} is missing")
            return getattr(inner, kind)(name, raw[name])

        if rope_type == "linear":
            return RopeScaling("linear", need("factor", "positive_number"))
        scaling = RopeScaling("llama3", need("factor", "positive_number"), need("low_freq_factor", "positive_number"),
                              need("high_freq_factor", "positive_number"),
                              need("original_max_position_embeddings", "positive_int"))
        if scaling.high_freq_factor <= scaling.low_freq_factor:
            raise ModelError(f"{self.where}{key}.high_freq_factor must be greater than low_freq_factor")
        return scaling


def _finite(value) -> bool:
    try:
        return math.isfinite(value) and abs(float(value)) < 1e300  # an int beyond 1e308 has no float
    except OverflowError:
        return False
