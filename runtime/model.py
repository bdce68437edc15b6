"""The forward pass of every supported family, written against the backend interface. A family's
contract (runtime/architectures) decides which tensors exist; the optional steps below run when
their weights (or config values) are there:

    x = embed(ids) [* sqrt(hidden): Gemma]                                   # (T, hidden)
    for each layer i:
        h = rms_norm(x)
        q, k, v = h @ Wq, Wk, Wv (+ biases)                                  # (T, heads·hd), (T, kv·hd) ×2
        [q, k = rms_norm per head (q_norm, k_norm): Qwen3, Gemma]
        q, k = rope(q), rope(k)          (layer i's frequencies; partial rotary: Phi-3/4)
        a = attention(q, k, v, cache, scale, window of layer i)              # (T, heads·hd)
        x = x + [rms_norm](a @ Wo (+ bias))         (the norm after the branch: Gemma)
        h = rms_norm(x)
        x = x + [rms_norm]((act(h @ Wgate) * (h @ Wup)) @ Wdown)   act = silu | gelu_tanh (Gemma)
    logits = rms_norm(x) @ W_lm_head                                         # (T, vocab)

Every array operation is a `backend` call, so the same code runs on NumPy, CuPy or torch
(the converter's calibration). Gemma's (1 + w) norms are folded into the weights at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .architectures.base import present
from .config import ModelConfig
from .errors import ModelError


@dataclass
class LayerWeights:
    """One decoder layer's prepared weights; None where the family has no such tensor."""
    attn_norm: object = None  # (hidden,)
    q: object = None  # weight handles (out, in)
    k: object = None
    v: object = None
    o: object = None
    q_bias: object = None  # (heads·hd,)
    k_bias: object = None
    v_bias: object = None
    o_bias: object = None  # (hidden,)
    q_norm: object = None  # (head_dim,) applied to every query head
    k_norm: object = None
    attn_out_norm: object = None  # (hidden,) on the attention branch's output
    mlp_norm: object = None  # (hidden,)
    gate: object = None
    up: object = None
    down: object = None
    mlp_out_norm: object = None  # (hidden,) on the MLP branch's output


def _weight(spec, config: ModelConfig, tensor, layer: int | None = None):
    """The prepared weight of one contract tensor (of `layer` for per-layer ones)."""
    name = spec.name if layer is None else spec.for_layer(layer)
    weight = tensor(name, tuple(getattr(config, dim) for dim in spec.shape), required=True)
    if spec.role == "norm" and config.family.norm_offset:
        weight = weight + float(config.family.norm_offset)  # Gemma: (1 + w), folded once (a new array)
    return weight


def model_layer_weights(config: ModelConfig, i: int, tensor) -> LayerWeights:
    """Layer i's weights alone (the converter streams layers): tensor(name, shape, required) →
    prepared weight, for every tensor the family's contract lists for this config."""
    weights = LayerWeights()
    for spec in config.family.layer_tensors:
        if present(spec, config):
            setattr(weights, spec.key, _weight(spec, config, tensor, i))
    return weights


def checked_tensors(entries, where, error, make):
    """The `tensor(name, shape, required=True)` callable Model takes, over `entries` (name -> anything
    with .shape: a file's tensor entries, a checkpoint's): the entry checked against the shape the config
    implies, then make(name, entry). A missing required tensor or another shape raises error(message
    naming `where` and the tensor). Model.from_file and the converter's calibration both load through it."""
    def tensor(name, shape, required=True):
        entry = entries.get(name)
        if entry is None:
            if required:
                raise error(f"{where}: tensor '{name}' is missing")
            return None
        if tuple(entry.shape) != tuple(shape):
            raise error(f"{where}: tensor '{name}' has shape {list(entry.shape)}, the model config "
                        f"implies {list(shape)}")
        return make(name, entry)
    return tensor


class Model:
    """Weights prepared by a backend + the forward pass. Use `new_cache()` and `forward()`.

    tensor(name, shape, required=True) returns the prepared weight of a canonical tensor name
    (a backend array for 1-D tensors, a weight handle for 2-D ones) and raises for a missing one
    or a wrong shape (or returns None for a missing one when required=False; the model asks only
    for tensors its contract says exist, always with required=True)."""

    def __init__(self, config: ModelConfig, backend, tensor):
        self.config, self.backend = config, backend
        c = config
        spec = {s.key: s for s in c.family.tensors}  # embed_tokens, norm, lm_head
        self.embed_tokens = _weight(spec["embed_tokens"], c, tensor)
        self.layers = [model_layer_weights(c, i, tensor) for i in range(c.num_hidden_layers)]
        self.norm = _weight(spec["norm"], c, tensor)
        # tied: the (possibly quantized) embedding matrix is the head
        self.lm_head = _weight(spec["lm_head"], c, tensor) if present(spec["lm_head"], c) else self.embed_tokens
        backend.prepare_head(self.lm_head)  # (lean CPU: a tied embedding's tiles now, before any KV cache exists)
        self.inv_freq = [backend.upload(c.inv_freq(i)) for i in range(c.num_hidden_layers)]  # (rotary_dim/2,)
        # Backend options are passed only when they differ from the defaults (full rotary, 1/sqrt(hd),
        # no window), so a backend without a feature still runs every family that does not use it.
        self.rope_options = {} if c.rotary_dim == c.head_dim else {"head_dim": c.head_dim}
        self.attention_options = [{k: v for k, v in (("scale", c.attention_scale), ("window", c.layer_window(i)))
                                   if v is not None} for i in range(c.num_hidden_layers)]

    @classmethod
    def from_file(cls, mxq_file, config: ModelConfig, backend) -> "Model":
        """The model of an open .mxq file (format_spec.MxqFile)."""
        tensors = mxq_file.tensors
        c = config
        known = {name for name, _ in c.family.all_tensors(c)}
        unknown = [name for name in tensors if name not in known]
        if unknown:  # e.g. lm_head.weight in a file that says the embeddings are tied
            raise ModelError(f"{mxq_file.path}: tensor '{unknown[0]}' is not part of the {c.architecture} "
                             "model its config describes")

        return cls(config, backend, checked_tensors(tensors, mxq_file.path, ModelError,
                                                    lambda name, entry: backend.prepare(entry, mxq_file.blobs(name))))

    def new_cache(self, capacity: int = 256):
        """An empty KV cache with room for `capacity` positions (it grows when needed)."""
        c = self.config
        return self.backend.new_cache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                      max(1, min(capacity, c.max_position_embeddings)))

    # -- the forward pass, one piece at a time ------------------------------------------------------
    def embed(self, ids):
        """Token ids host int64 (T,) → (T, hidden)."""
        x = self.backend.embedding(self.embed_tokens, ids)
        scale = self.config.embed_scale
        return x if scale is None else self.backend.scale(x, scale)

    def block(self, i: int, x, positions, layer_cache, start: int):
        """Decoder layer i on x (T, hidden) at `positions` (host int64 (T,) = start .. start+T-1),
        writing its keys/values into layer_cache. Returns the new residual stream (T, hidden)."""
        c, be, w = self.config, self.backend, self.layers[i]
        eps = c.rms_norm_eps
        # attention block
        h = be.rms_norm(x, w.attn_norm, eps)  # (T, hidden)
        q, k, v = be.linears(h, (w.q, w.k, w.v), (w.q_bias, w.k_bias, w.v_bias))  # (T, heads·hd), 2× (T, kv·hd)
        if w.q_norm is not None:
            q, k = self.head_norm(q, w.q_norm), self.head_norm(k, w.k_norm)
        q = be.rope(q, positions, self.inv_freq[i], **self.rope_options)
        k = be.rope(k, positions, self.inv_freq[i], **self.rope_options)
        a = be.attention(q, k, v, layer_cache, start, **self.attention_options[i])  # scale, window
        x = self.residual(x, a, w.o, w.o_bias, w.attn_out_norm)
        # MLP block (SwiGLU or GeGLU)
        h = be.rms_norm(x, w.mlp_norm, eps)
        gate, up = be.linears(h, (w.gate, w.up))  # (T, intermediate) each
        m = be.gelu_mul(gate, up) if c.family.activation == "gelu_tanh" else be.silu_mul(gate, up)
        del gate, up  # freed before the down projection (a long prompt's largest arrays)
        return self.residual(x, m, w.down, None, w.mlp_out_norm)

    def blocks(self, x, positions, cache, start: int):
        """Every decoder layer on x (T, hidden), in order. The CPU backend runs decode's layers as one compiled call
        of the same steps (cpu_layers.py; block is its reference)."""
        fused = self.backend.fused_layers(self, x.shape[0])
        y = fused.run(x, positions, cache, start) if fused is not None else None
        if y is not None:
            return y
        for i, layer_cache in enumerate(cache.layers):
            x = self.block(i, x, positions, layer_cache, start)
        return x

    def residual(self, x, branch, weight, bias, out_norm):
        """x + branch·Wᵀ (+ bias), the branch output normed first when the family says so."""
        be = self.backend
        if out_norm is None:
            return be.linear(branch, weight, bias, residual=x)  # fused on a GPU
        return be.add(be.rms_norm(be.linear(branch, weight, bias), out_norm, self.config.rms_norm_eps), x)

    def head_norm(self, x, weight):
        """RMSNorm over every head: (T, n·hd) → (T·n, hd) → norm → (T, n·hd)."""
        T, hd = x.shape[0], self.config.head_dim
        return self.backend.rms_norm(x.reshape(-1, hd), weight, self.config.rms_norm_eps).reshape(T, -1)

    def final_norm(self, x):
        return self.backend.rms_norm(x, self.norm, self.config.rms_norm_eps)  # (T, hidden)

    def head(self, h):
        return self.backend.linear(h, self.lm_head)  # (T, vocab)

    # -- whole sequences ------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Host float32 logits (len(ids), vocab) of a whole sequence run from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.backend.to_host(self.forward(ids, self.new_cache(len(ids))))

    def forward(self, ids, cache, last_only: bool = False):
        """Run tokens `ids` (T,) that follow the cache's contents. Returns logits as a backend
        array, (T, vocab) or (1, vocab) with last_only; advances cache.length by T."""
        return self.head(self.hidden_states(ids, cache, last_only))

    def hidden_states(self, ids, cache, last_only: bool = False):
        """Final-norm hidden states (T, hidden) — (1, hidden) with last_only — of tokens `ids` following
        the cache's contents."""
        c = self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T, start = ids.shape[0], cache.length
        if T == 0:
            raise ModelError("no tokens to run")
        if start + T > c.max_position_embeddings:
            raise ModelError(f"{start + T} tokens exceed the model's context of {c.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ModelError(f"token id {int(ids.max() if ids.max() >= c.vocab_size else ids.min())} "
                             f"is outside the vocabulary (size {c.vocab_size})")
        cache.reserve(start + T)
        chunk = self.backend.prefill_chunk or T  # pieces bound the activations (same result)
        hidden = []
        for c0 in range(0, T, chunk):
            positions = np.arange(start + c0, start + min(T, c0 + chunk), dtype=np.int64)  # (t,)
            x = self.embed(ids[c0:c0 + chunk])  # (t, hidden)
            x = self.blocks(x, positions, cache, start + c0)
            cache.length = start + c0 + len(positions)
            hidden.append(self.final_norm(x[-1:] if last_only else x))
        if last_only:
            return hidden[-1]  # (1, hidden)
        return hidden[0] if len(hidden) == 1 else self.backend.xp.concatenate(hidden)  # (T, hidden)

    def logits_from_hidden(self, hidden):
        return self.head(hidden)
