"""The backend interface: every array operation of the forward pass goes through one of these
methods, so a CUDA backend can run the same `runtime/model.py` with device arrays.

Conventions (all backends):
  * Activations are 2-D float32 backend arrays, one row per token: x (T, features), C-contiguous.
    Heads are packed along the feature axis: q (T, n_heads * head_dim), k/v (T, n_kv_heads * head_dim),
    head h occupying columns [h * head_dim, (h + 1) * head_dim) — the order of HF's q/k/v_proj outputs.
  * Token ids and positions are HOST numpy int64 arrays (T,): small, and the sampler lives on the host.
  * Weights come from `prepare(entry, blobs)`: 1-D tensors (norm weights, biases) become float32
    backend arrays (n,); 2-D tensors become opaque weight handles that `linear` and `embedding`
    accept (a tied lm_head is simply the embedding's handle passed to `linear`).
  * The numpy backend is the reference: a new backend's ops are tested against it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from ...format_spec.rows import nonfinite_problem, structure_problem
from ..errors import ModelError
from .row_blocks import RowBlocks


class Backend(ABC):
    """One device's implementation of the forward pass's operations."""

    name = "abstract"
    schemes = ("fp16", "affine", "lut")  # the 2-D storage schemes prepare_matrix handles
    xp = np  # the array module of this backend's arrays (numpy, cupy): used to allocate the KV cache
    prefill_chunk = None  # Model runs a prompt in pieces of at most this many tokens (None: in one piece)

    # -- weights ----------------------------------------------------------------------------------
    def prepare(self, entry, blobs: dict):
        """Make a tensor usable. `entry` is a format_spec TensorEntry (name, shape, config, role);
        `blobs` maps blob name → zero-copy host numpy view of the mmapped file (SPEC.md §5).
        Returns a float32 backend array (n,) for a 1-D tensor, a weight handle (prepare_matrix) for
        a 2-D one. Raises ModelError naming the tensor for an unsupported scheme/shape or unsound
        CSR outliers."""
        self.check_outliers(entry, blobs)
        scheme = entry.config.scheme
        if len(entry.shape) == 1:
            if scheme != "fp16":
                raise ModelError(f"tensor '{entry.name}': 1-D tensors must be fp16, got {scheme}")
            return self.upload(blobs["data"].astype(np.float32))
        if len(entry.shape) != 2:
            raise ModelError(f"tensor '{entry.name}': expected a 1-D or 2-D tensor, got shape {list(entry.shape)}")
        if scheme == "rows":  # row blocks (SPEC.md §8): each block through prepare_matrix
            return RowBlocks(self, entry, blobs)
        if scheme not in self.schemes:
            raise ModelError(f"tensor '{entry.name}': scheme {scheme!r} is not supported by the {self.name} backend")
        return self.prepare_matrix(entry, blobs)

    @abstractmethod
    def prepare_matrix(self, entry, blobs: dict):
        """The weight handle of a 2-D tensor of one of `schemes` that `linear` and `embedding` accept
        (outliers and shape already checked by `prepare`)."""

    def prepare_head(self, weight) -> None:
        """The handle `weight` will also multiply as the lm_head (a tied embedding): get it ready at load
        (default: nothing to do)."""

    def loaded(self, file) -> None:
        """Every tensor of `file` has its handle: the backend may let go of what it copied (default: nothing)."""

    @abstractmethod
    def upload(self, array: np.ndarray):
        """Host float32 numpy array → backend array (constants such as RoPE inverse frequencies)."""

    @abstractmethod
    def to_host(self, x) -> np.ndarray:
        """Backend array → host numpy float32 array of the same shape."""

    # -- operations -------------------------------------------------------------------------------
    @abstractmethod
    def embedding(self, weight, ids: np.ndarray):
        """Rows `ids` of an embedding handle: ids host int64 (T,) → (T, hidden) float32.
        Quantized tables dequantize only the rows asked for."""

    @abstractmethod
    def linear(self, x, weight, bias=None, residual=None):
        """x (T, in) float32 @ W.T for a weight handle of shape (out, in) → (T, out) float32;
        `bias` is None or a float32 backend array (out,) added to every row; `residual` is None or a
        (T, out) array added too (the residual stream: a GPU fuses it into the decode GEMV).
        T is the prompt length during prefill (matrix–matrix) and 1 during decode."""

    def linears(self, x, weights, biases=None) -> list:
        """[linear(x, W_i, b_i) for each handle]: several products of one input (q, k, v; gate, up), which
        a backend may run as one; biases None or one (None or (out_i,)) per handle."""
        biases = biases or (None,) * len(weights)
        return [self.linear(x, w, b) for w, b in zip(weights, biases)]

    def fused_layers(self, model, n_tokens: int):
        """An object whose run(x, positions, cache, start) runs all of model's decoder layers on n_tokens tokens (or
        returns None: then Model.block runs them), or None when this backend has none (the CPU's: cpu_layers.py)."""
        return None

    @abstractmethod
    def rms_norm(self, x, weight, eps: float):
        """x (T, H), weight (H,) → weight * (x / sqrt(mean(x², axis=-1) + eps)), float32."""

    @abstractmethod
    def rope(self, x, positions: np.ndarray, inv_freq, head_dim: int | None = None):
        """Rotary embedding in HF's rotate_half convention. x (T, n * head_dim); positions host
        int64 (T,); inv_freq backend float32 (rotary_dim // 2,); head_dim defaults to rotary_dim =
        2 * len(inv_freq). With angle a = position * inv_freq (float32 product) and h = rotary_dim / 2,
        for every head and i < h:
            out[i]     = x[i] * cos(a_i) - x[i + h] * sin(a_i)
            out[i + h] = x[i + h] * cos(a_i) + x[i] * sin(a_i)
        and out[j] = x[j] for rotary_dim <= j < head_dim (partial rotary, HF's partial_rotary_factor:
        only the leading rotary_dim dims of each head rotate). Returns a new (T, n * head_dim) array."""

    @abstractmethod
    def attention(self, q, k, v, cache: "LayerCache", start: int, scale: float | None = None,
                  window: int | None = None):
        """Causal grouped-query attention with a KV cache. q (T, n_heads * head_dim), k and v
        (T, n_kv_heads * head_dim), already rotated; the T tokens sit at positions start .. start+T-1.
        Writes k, v into cache.k / cache.v [:, start:start+T, :], then for query head h (which reads
        KV head h // (n_heads // n_kv_heads)) and the token at position p attends over the cache
        positions j with p - window < j <= p (window None: 0 <= j <= p):
            softmax(scale * q·kᵀ) · v      (float32 softmax; scale None: 1 / sqrt(head_dim))
        Returns (T, n_heads * head_dim). The caller has reserved capacity ≥ start + T."""

    @abstractmethod
    def silu_mul(self, gate, up):
        """SwiGLU: silu(gate) * up with silu(g) = g * sigmoid(g); both (T, I) → (T, I)."""

    def gelu_mul(self, gate, up):
        """GeGLU: gelu_tanh(gate) * up, both (T, I) float32 → (T, I), with HF's "gelu_pytorch_tanh"
        gelu_tanh(g) = 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g³))).
        This array-module version serves NumPy and CuPy; a backend may override it with a kernel."""
        f32 = np.float32
        inner = f32(math.sqrt(2.0 / math.pi)) * (gate + f32(0.044715) * gate * gate * gate)
        return f32(0.5) * gate * (f32(1.0) + self.xp.tanh(inner)) * up

    def scale(self, x, s: float):
        """x * float32(s) as a new array of x's shape (Gemma's embedding scale)."""
        return x * np.float32(s)

    @abstractmethod
    def add(self, a, b):
        """Residual sum a + b, both (T, H) → (T, H) (may reuse a's memory: callers never reuse a)."""

    @abstractmethod
    def token_nll(self, logits, targets: np.ndarray) -> np.ndarray:
        """Negative log-likelihood of each target: logits (T, vocab) float32, targets host int64 (T,)
        → host float64 (T,) with nll[t] = logsumexp(logits[t]) - logits[t, targets[t]]."""

    def close(self) -> None:
        """Release what the backend holds (worker threads, device memory pools). Optional."""

    # -- helpers shared by backends ---------------------------------------------------------------
    @staticmethod
    def check_outliers(entry, blobs: dict) -> None:
        """SPEC.md §9: content rules are checked before a runtime uses a tensor: finite float16 blobs, CSR
        outliers, and a `rows` tensor's row_order (a permutation) and each of its blocks' outliers."""
        if len(entry.shape) != 2:
            return
        problem = nonfinite_problem(blobs)
        if problem:
            raise ModelError(f"tensor '{entry.name}': {problem}")
        problem = structure_problem(blobs, entry.shape, entry.config)
        if problem:
            what = "bad row blocks" if entry.config.scheme == "rows" else "bad outliers"
            raise ModelError(f"tensor '{entry.name}': {what}: {problem}")

    def new_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int) -> "KVCache":
        return KVCache(self.xp, n_layers, n_kv_heads, head_dim, capacity)


class LayerCache:
    """Keys and values of one layer: k, v (n_kv_heads, capacity, head_dim) backend arrays of `dtype`
    (float32 on the CPU; a GPU backend may keep float16); positions ≥ the cache's length hold garbage."""

    def __init__(self, xp, n_kv_heads: int, head_dim: int, capacity: int, dtype=np.float32):
        self.xp = xp
        self.k = xp.zeros((n_kv_heads, capacity, head_dim), dtype=dtype)
        self.v = xp.zeros((n_kv_heads, capacity, head_dim), dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self):
        return self.k.dtype

    def reserve(self, n: int) -> None:
        """Make room for n positions (grows by doubling, copying what is stored)."""
        if n <= self.capacity:
            return
        capacity = max(n, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self.xp.zeros((old.shape[0], capacity, old.shape[2]), dtype=old.dtype)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)


class KVCache:
    """The per-layer caches plus how many positions are filled (`length`)."""

    def __init__(self, xp, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype=np.float32):
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.layers = [LayerCache(xp, n_kv_heads, head_dim, capacity, dtype) for _ in range(n_layers)]
        self.length = 0

    def reserve(self, n: int) -> None:
        for layer in self.layers:
            layer.reserve(n)

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
