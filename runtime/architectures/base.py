"""What a model family is, as data: the config fields it reads, its tensors, how checkpoint tensors
map onto them, its block structure, and how it is written back as a Hugging Face checkpoint.

Everything that knows about a family derives from one `Family` object:
  runtime/config.py      validates a config (HF config.json or a .mxq `model` object) field by field
  runtime/model.py       builds each layer's weights from `layer_tensors` and runs one forward pass
                         whose optional steps (q/k norms, sandwich norms, GeGLU, ...) follow the family
  converter/checkpoint.py  lists, shapes and splits the checkpoint's tensors
  runtime/export_hf.py   writes config.json and re-fuses tensors (`fused`) for transformers
"""
from __future__ import annotations

from dataclasses import dataclass, field

REQUIRED = object()  # Field.default of a field that must be present
MAX_LAYERS = 4096  # far beyond any released model; bounds what a config can make the reader allocate
MAX_HEAD_DIM = 1 << 16


@dataclass(frozen=True)
class Field:
    """One config field (HF spelling; a .mxq `model` object uses the same names).
    kind: positive_int | positive_number | fraction (0 < x <= 1) | boolean | token | tokens |
          optional_positive_int | rope_scaling | layer_types
    default: a value, REQUIRED, or a function of the fields read so far (e.g. head_dim).
    limit: an upper bound (inclusive) for integer kinds, where a huge value would cost memory
    before any tensor is read (per-layer tables, RoPE frequency arrays)."""
    name: str
    kind: str
    default: object = REQUIRED
    limit: int | None = None


@dataclass(frozen=True)
class Refusal:
    """A config feature the runtime does not implement: `name` must be absent or one of `allowed`."""
    name: str
    allowed: tuple
    why: str


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor. `name` is its canonical (.mxq, HF) name, with {i} for the layer index in
    per-layer tensors. `shape` names ModelConfig attributes. `key` is the attribute the model reads
    it as. `when` names a ModelConfig boolean: the tensor exists iff it is true (None: always).
    role: linear (counts toward the budget) | embedding | lm_head | norm | bias."""
    name: str
    key: str
    role: str
    shape: tuple
    when: str | None = None

    def for_layer(self, i: int) -> str:
        return self.name.format(i=i)


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor that holds several canonical tensors stacked along rows, in this order
    (e.g. Phi-3's qkv_proj = q_proj; k_proj; v_proj). {i} is the layer index."""
    source: str
    parts: tuple


@dataclass(frozen=True)
class Family:
    """One model family (variants differ only in data: fields, tensors, defaults)."""
    name: str  # the .mxq model.architecture value
    hf_architectures: tuple  # HF `architectures[0]` values it accepts
    model_type: str  # HF config model_type, for export
    fields: tuple  # Field, in the order they are read (later defaults may use earlier values)
    tensors: tuple  # TensorSpec outside the layers, in file order (embedding, final norm, lm_head)
    layer_tensors: tuple  # TensorSpec of one decoder layer, in file order
    refused: tuple = ()  # Refusal
    fused: tuple = ()  # Fused: checkpoint tensors split into canonical ones at conversion
    unused: tuple = ()  # checkpoint tensor names known to carry nothing the model needs ({i} allowed)
    activation: str = "silu"  # MLP gate activation: silu (SwiGLU) | gelu_tanh (GeGLU)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): Gemma stores w - 1
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) (Gemma)
    hf_fixed: dict = field(default_factory=dict)  # config.json entries that are constant for the family
    hf_omit: tuple = ()  # fields the family's HF config class does not have (derived ones), not exported
    hf_spelling: object = None  # function(config) -> dict: config.json entries whose spelling is the family's
    hf_reader: object = None  # function(raw HF config) -> dict of canonical field values (spellings)

    def all_tensors(self, config) -> list[tuple[str, TensorSpec]]:
        """(name, spec) of every tensor a model with `config` stores, in file order."""
        out = [(self.tensors[0].name, self.tensors[0])]  # the embedding first
        for i in range(config.num_hidden_layers):
            out += [(s.for_layer(i), s) for s in self.layer_tensors if present(s, config)]
        out += [(s.name, s) for s in self.tensors[1:] if present(s, config)]
        return out


def present(spec: TensorSpec, config) -> bool:
    return spec.when is None or bool(getattr(config, spec.when))


_REGISTRY: dict[str, Family] = {}  # model.architecture -> Family
_BY_HF: dict[str, Family] = {}  # HF architectures[0] -> Family
REFUSED_HF = {  # HF architectures that share a family's name but not its checkpoint layout
    "Gemma3ForConditionalGeneration": "the vision-language Gemma 3 is not supported; convert a text-only "
                                      "Gemma3ForCausalLM checkpoint",
}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    for hf in family.hf_architectures:
        _BY_HF[hf] = family
    return family


def families() -> dict[str, Family]:
    return dict(_REGISTRY)


def family(name: str) -> Family | None:
    return _REGISTRY.get(name)


def family_of_hf(hf_architecture: str) -> Family | None:
    return _BY_HF.get(hf_architecture)


def supported_hf() -> list[str]:
    return list(_BY_HF)


# -- pieces the family modules share --------------------------------------------------------------

def common_fields(**defaults) -> tuple:
    """The fields every family reads; `defaults` overrides the family's HF defaults by name."""
    d = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "attention_bias": False, **defaults}
    return (
        Field("vocab_size", "positive_int"),
        Field("hidden_size", "positive_int"),
        Field("intermediate_size", "positive_int"),
        Field("num_hidden_layers", "positive_int", limit=MAX_LAYERS),
        Field("num_attention_heads", "positive_int"),
        Field("num_key_value_heads", "positive_int", lambda f: f["num_attention_heads"]),
        Field("head_dim", "positive_int", lambda f: f["hidden_size"] // f["num_attention_heads"], limit=MAX_HEAD_DIM),
        Field("max_position_embeddings", "positive_int", d["max_position_embeddings"]),
        Field("rms_norm_eps", "positive_number", d["rms_norm_eps"]),
        Field("rope_theta", "positive_number", d["rope_theta"]),
        Field("rope_scaling", "rope_scaling", None),
        Field("tie_word_embeddings", "boolean", d["tie_word_embeddings"]),
        Field("attention_bias", "boolean", d["attention_bias"]),
        Field("bos_token_id", "token", None),
        Field("eos_token_id", "tokens", None),
    )


def window_fields(default_layer_types) -> tuple:
    """sliding_window (null: none) and layer_types ("full_attention" | "sliding_attention" per layer);
    `default_layer_types(fields)` gives the family's HF default when a config has no layer_types."""
    return (Field("sliding_window", "optional_positive_int", None),
            Field("layer_types", "layer_types", default_layer_types))


def every_layer_slides(fields) -> list:
    """Mistral, Phi-3: a set sliding_window applies to every layer."""
    kind = "sliding_attention" if fields["sliding_window"] is not None else "full_attention"
    return [kind] * fields["num_hidden_layers"]


def hf_rope(raw: dict) -> dict:
    """The two HF spellings of RoPE settings -> canonical rope_theta/rope_scaling: older top-level
    `rope_theta` + `rope_scaling`, newer (transformers 5) `rope_parameters` holding both. As in
    transformers, a top-level rope_scaling wins over rope_parameters, and rope_parameters' theta over
    a top-level one."""
    out = {key: raw[key] for key in ("rope_theta", "rope_scaling") if key in raw}
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
        if "rope_theta" in params:
            out["rope_theta"] = params["rope_theta"]
        if raw.get("rope_scaling") is None:
            kind = params.get("rope_type", params.get("type", "default"))
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
            out["rope_scaling"] = None if kind == "default" else scaling
    return out


def embedding_and_head() -> tuple:
    return (
        TensorSpec("model.embed_tokens.weight", "embed_tokens", "embedding", ("vocab_size", "hidden_size")),
        TensorSpec("model.norm.weight", "norm", "norm", ("hidden_size",)),
        TensorSpec("lm_head.weight", "lm_head", "lm_head", ("vocab_size", "hidden_size"), when="untied"),
    )


def attention_tensors(qkv_bias: str | None = None, o_bias: str | None = None, qk_norm: bool = False) -> tuple:
    """q/k/v/o projections of a layer; biases exist when the named config boolean is true."""
    p = "model.layers.{i}.self_attn."
    specs = [
        TensorSpec(p + "q_proj.weight", "q", "linear", ("q_dim", "hidden_size")),
        TensorSpec(p + "k_proj.weight", "k", "linear", ("kv_dim", "hidden_size")),
        TensorSpec(p + "v_proj.weight", "v", "linear", ("kv_dim", "hidden_size")),
        TensorSpec(p + "o_proj.weight", "o", "linear", ("hidden_size", "q_dim")),
    ]
    if qkv_bias:
        specs += [TensorSpec(p + "q_proj.bias", "q_bias", "bias", ("q_dim",), when=qkv_bias),
                  TensorSpec(p + "k_proj.bias", "k_bias", "bias", ("kv_dim",), when=qkv_bias),
                  TensorSpec(p + "v_proj.bias", "v_bias", "bias", ("kv_dim",), when=qkv_bias)]
    if o_bias:
        specs.append(TensorSpec(p + "o_proj.bias", "o_bias", "bias", ("hidden_size",), when=o_bias))
    if qk_norm:
        specs += [TensorSpec(p + "q_norm.weight", "q_norm", "norm", ("head_dim",)),
                  TensorSpec(p + "k_norm.weight", "k_norm", "norm", ("head_dim",))]
    return tuple(specs)


def mlp_tensors() -> tuple:
    p = "model.layers.{i}.mlp."
    return (
        TensorSpec(p + "gate_proj.weight", "gate", "linear", ("intermediate_size", "hidden_size")),
        TensorSpec(p + "up_proj.weight", "up", "linear", ("intermediate_size", "hidden_size")),
        TensorSpec(p + "down_proj.weight", "down", "linear", ("hidden_size", "intermediate_size")),
    )


def norm(name: str, key: str) -> TensorSpec:
    return TensorSpec(f"model.layers.{{i}}.{name}.weight", key, "norm", ("hidden_size",))


def llama_like_layer(qkv_bias: str | None = None, o_bias: str | None = None, qk_norm: bool = False) -> tuple:
    """Pre-norm attention then pre-norm MLP (HF calls the MLP's norm post_attention_layernorm)."""
    return (norm("input_layernorm", "attn_norm"), *attention_tensors(qkv_bias, o_bias, qk_norm),
            norm("post_attention_layernorm", "mlp_norm"), *mlp_tensors())


UNUSED_ROTARY = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)  # a buffer older checkpoints saved
