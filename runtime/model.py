"""The Llama-family forward pass (llama, mistral, qwen2), written against the backend interface.

    x = embed(ids)                                              # (T, hidden)
    for each layer:
        h = rms_norm(x);  q, k, v = h @ Wq, Wk, Wv (+ biases)   # (T, heads·hd), (T, kv_heads·hd) ×2
        q, k = rope(q), rope(k);  a = attention(q, k, v, cache) # (T, heads·hd)
        x = x + a @ Wo
        h = rms_norm(x);  x = x + (silu(h @ Wgate) * (h @ Wup)) @ Wdown
    logits = rms_norm(x) @ W_lm_head                            # (T, vocab)

Every array operation is a `backend` call, so the same code runs on NumPy or CuPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import ModelError


@dataclass
class Layer:
    input_norm: object  # (hidden,)
    q: object  # weight handles (out, in)
    k: object
    v: object
    o: object
    q_bias: object  # (heads·hd,) or None
    k_bias: object
    v_bias: object
    post_norm: object  # (hidden,)
    gate: object
    up: object
    down: object


class Model:
    """Weights prepared by a backend + the forward pass. Use `new_cache()` and `forward()`."""

    def __init__(self, mxq_file, config: ModelConfig, backend):
        self.config, self.backend = config, backend
        c = config
        tensors = mxq_file.tensors

        def tensor(name, shape, required=True):
            entry = tensors.get(name)
            if entry is None:
                if required:
                    raise ModelError(f"{mxq_file.path}: tensor '{name}' is missing")
                return None
            if tuple(entry.shape) != tuple(shape):
                raise ModelError(f"tensor '{name}' has shape {list(entry.shape)}, the model config "
                                 f"implies {list(shape)}")
            return backend.prepare(entry, mxq_file.blobs(name))

        H, I, hd = c.hidden_size, c.intermediate_size, c.head_dim
        q_dim, kv_dim = c.num_attention_heads * hd, c.num_key_value_heads * hd
        self.embed = tensor("model.embed_tokens.weight", (c.vocab_size, H))
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            biases = c.attention_bias or any(p + f"self_attn.{x}_proj.bias" in tensors for x in "qkv")
            self.layers.append(Layer(
                input_norm=tensor(p + "input_layernorm.weight", (H,)),
                q=tensor(p + "self_attn.q_proj.weight", (q_dim, H)),
                k=tensor(p + "self_attn.k_proj.weight", (kv_dim, H)),
                v=tensor(p + "self_attn.v_proj.weight", (kv_dim, H)),
                o=tensor(p + "self_attn.o_proj.weight", (H, q_dim)),
                q_bias=tensor(p + "self_attn.q_proj.bias", (q_dim,), required=biases),
                k_bias=tensor(p + "self_attn.k_proj.bias", (kv_dim,), required=biases),
                v_bias=tensor(p + "self_attn.v_proj.bias", (kv_dim,), required=biases),
                post_norm=tensor(p + "post_attention_layernorm.weight", (H,)),
                gate=tensor(p + "mlp.gate_proj.weight", (I, H)),
                up=tensor(p + "mlp.up_proj.weight", (I, H)),
                down=tensor(p + "mlp.down_proj.weight", (H, I)),
            ))
        self.norm = tensor("model.norm.weight", (H,))
        if "lm_head.weight" in tensors:
            self.lm_head = tensor("lm_head.weight", (c.vocab_size, H))
        elif c.tie_word_embeddings:
            self.lm_head = self.embed  # tied: the (possibly quantized) embedding matrix
        else:
            raise ModelError(f"{mxq_file.path}: tensor 'lm_head.weight' is missing and the model's "
                             "embeddings are not tied")
        self.inv_freq = backend.upload(c.inv_freq())  # (hd/2,)

    def new_cache(self, capacity: int = 256):
        """An empty KV cache with room for `capacity` positions (it grows when needed)."""
        c = self.config
        return self.backend.new_cache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                      max(1, min(capacity, c.max_position_embeddings)))

    def logits(self, ids) -> np.ndarray:
        """Host float32 logits (len(ids), vocab) of a whole sequence run from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.backend.to_host(self.forward(ids, self.new_cache(len(ids))))

    def forward(self, ids, cache, last_only: bool = False):
        """Run tokens `ids` (T,) that follow the cache's contents. Returns logits as a backend
        array, (T, vocab) or (1, vocab) with last_only; advances cache.length by T."""
        hidden = self.hidden_states(ids, cache)
        if last_only:
            hidden = hidden[-1:]
        return self.logits_from_hidden(hidden)

    def hidden_states(self, ids, cache):
        """Final-norm hidden states (T, hidden) of tokens `ids` following the cache's contents."""
        c, be = self.config, self.backend
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
        positions = np.arange(start, start + T, dtype=np.int64)  # (T,)

        x = be.embedding(self.embed, ids)  # (T, hidden)
        for layer, layer_cache in zip(self.layers, cache.layers):
            # attention block
            h = be.rms_norm(x, layer.input_norm, c.rms_norm_eps)  # (T, hidden)
            q = be.linear(h, layer.q, layer.q_bias)  # (T, n_heads·hd)
            k = be.linear(h, layer.k, layer.k_bias)  # (T, n_kv·hd)
            v = be.linear(h, layer.v, layer.v_bias)  # (T, n_kv·hd)
            q = be.rope(q, positions, self.inv_freq)
            k = be.rope(k, positions, self.inv_freq)
            a = be.attention(q, k, v, layer_cache, start)  # (T, n_heads·hd)
            x = be.linear(a, layer.o, residual=x)  # x + a·Woᵀ (T, hidden)
            # MLP block (SwiGLU)
            h = be.rms_norm(x, layer.post_norm, c.rms_norm_eps)
            m = be.silu_mul(be.linear(h, layer.gate), be.linear(h, layer.up))  # (T, intermediate)
            x = be.linear(m, layer.down, residual=x)  # x + m·Wdownᵀ
        cache.length = start + T
        return be.rms_norm(x, self.norm, c.rms_norm_eps)  # (T, hidden)

    def logits_from_hidden(self, hidden):
        return self.backend.linear(hidden, self.lm_head)  # (T, vocab)
