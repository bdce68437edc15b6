"""The runtime's Backend interface in torch: the converter runs the runtime's own Model with it, so
calibration differentiates exactly the forward pass the runtime executes (one description, two
executions). Float32 on the CPU, every op differentiable.

Weight handles are torch tensors (out, in) (`linear` computes x @ W.T); 1-D weights are torch
tensors (n,); activations are torch float32 (T, features). An embedding handle only needs
`handle[ids]` (a LongTensor of rows), so the converter can pass a row reader instead of a whole
(vocab, hidden) table. Attention over a whole sequence from position 0 (a calibration chunk) never
reads the KV cache, only the incremental case does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..format_spec.affine import dequantize
from ..runtime.backends.base import Backend


class TorchBackend(Backend):
    """on_linear(x, weight), when given, sees the input x (T, in) of every `linear` call before the
    product (calibration accumulates input second moments with it)."""

    name = "torch"
    xp = np  # the KV cache is host numpy arrays, shared zero-copy with torch

    def __init__(self, on_linear=None):
        self.on_linear = on_linear

    # -- weights ----------------------------------------------------------------------------------
    def prepare_matrix(self, entry, blobs):
        return torch.from_numpy(dequantize(blobs, entry.shape, entry.config))  # (out, in) float32

    def upload(self, array):
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def to_host(self, x):
        return x.detach().to(torch.float32).numpy()

    # -- operations -------------------------------------------------------------------------------
    def embedding(self, weight, ids):
        return weight[torch.as_tensor(np.asarray(ids, dtype=np.int64))]  # (T, hidden)

    def linear(self, x, weight, bias=None, residual=None):
        if self.on_linear is not None:
            self.on_linear(x, weight)
        y = x @ weight.T  # (T, out)
        if bias is not None:
            y = y + bias
        if residual is not None:
            y = y + residual
        return y

    def rms_norm(self, x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(self, x, positions, inv_freq, head_dim=None):
        half = inv_freq.shape[0]
        head_dim = 2 * half if head_dim is None else head_dim
        T = x.shape[0]
        angles = torch.from_numpy(np.asarray(positions).astype(np.float32))[:, None] * inv_freq[None]  # (T, half)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # (T, 1, half)
        xh = x.view(T, -1, head_dim)  # (T, n, head_dim)
        x1, x2, rest = xh[..., :half], xh[..., half:2 * half], xh[..., 2 * half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
        return out.reshape(T, -1)

    def attention(self, q, k, v, cache, start, scale=None, window=None):
        """Differentiable in q, k, v. The cache gives the head layout and receives detached copies of
        k and v; keys before `start` are read from it (start == 0: the T tokens are a whole sequence
        and the cache is never read, e.g. a calibration chunk)."""
        T = q.shape[0]
        n_kv, _, head_dim = cache.k.shape
        n_rep = q.shape[1] // (n_kv * head_dim)
        qh = q.view(T, n_kv * n_rep, head_dim).transpose(0, 1)  # (n_heads, T, hd)
        kh = k.view(T, n_kv, head_dim).transpose(0, 1)  # (n_kv, T, hd)
        vh = v.view(T, n_kv, head_dim).transpose(0, 1)
        cache_k, cache_v = torch.from_numpy(cache.k), torch.from_numpy(cache.v)  # (n_kv, capacity, hd)
        cache_k[:, start:start + T] = kh.detach().to(cache_k.dtype)
        cache_v[:, start:start + T] = vh.detach().to(cache_v.dtype)
        if start:
            kh = torch.cat([cache_k[:, :start].to(kh.dtype), kh], dim=1)  # (n_kv, start + T, hd)
            vh = torch.cat([cache_v[:, :start].to(vh.dtype), vh], dim=1)
        kh, vh = kh.repeat_interleave(n_rep, dim=0), vh.repeat_interleave(n_rep, dim=0)  # (n_heads, S, hd)
        if start == 0 and window is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:
            query = torch.arange(start, start + T)[:, None]  # (T, 1) positions
            key = torch.arange(start + T)[None, :]  # (1, S)
            allowed = key <= query
            if window is not None:
                allowed &= key > query - window
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        return out.transpose(0, 1).reshape(T, -1)  # (T, n_heads·hd)

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def gelu_mul(self, gate, up):
        return F.gelu(gate, approximate="tanh") * up

    def scale(self, x, s):
        return x * float(np.float32(s))

    def add(self, a, b):
        return a + b  # never in place: autograd needs a

    def token_nll(self, logits, targets):
        logits = logits.detach().to(torch.float64)
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        nll = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]
        return nll.numpy()
