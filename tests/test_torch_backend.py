"""TorchBackend (the converter's differentiable execution of the runtime Model) against the NumPy
backend (the reference) op by op and on whole models, plus the ops' extensions (partial rotary, sliding
window, attention scale, GeGLU) against their definitions, and gradients against finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fixtures
from mxq.converter.torch_backend import TorchBackend
from mxq.format_spec import MxqFile
from mxq.runtime.backends.base import LayerCache
from mxq.runtime.backends.numpy_backend import NumpyBackend
from mxq.runtime.config import ModelConfig
from mxq.runtime.model import Model
from test_runtime import mixed_plan
from test_runtime_files import write_test_mxq

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def close(ours, reference, tol=2e-5):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    np.testing.assert_allclose(ours, reference, rtol=tol, atol=tol * max(1.0, float(np.abs(reference).max())))


def test_elementwise_ops_match_numpy():
    tb, nb = TorchBackend(), NumpyBackend(threads=1)
    x, w, bias, residual = randn(7, 24), randn(10, 24), randn(10), randn(7, 10)
    t = torch.from_numpy
    close(tb.linear(t(x), t(w), t(bias), t(residual)), x @ w.T + bias + residual)
    gate, up = randn(5, 12) * 4, randn(5, 12)
    close(tb.silu_mul(t(gate), t(up)), nb.silu_mul(gate, up))
    tanh = np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3))
    close(tb.gelu_mul(t(gate), t(up)), 0.5 * gate * (1 + tanh) * up)
    close(tb.scale(t(x), 39.19), x * np.float32(39.19))
    close(tb.add(t(x), t(x)), 2 * x)
    logits, targets = randn(6, 50) * 5, RNG.integers(0, 50, 6)
    np.testing.assert_allclose(tb.token_nll(t(logits), targets), nb.token_nll(logits, targets), rtol=1e-6)
    table, ids = randn(30, 8), np.array([3, 0, 29, 3])
    close(tb.embedding(t(table), ids), table[ids])


def test_rms_norm_matches_numpy():
    tb, nb = TorchBackend(), NumpyBackend(threads=1)
    x, w = randn(7, 24) * 3, randn(24)
    close(tb.rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5), nb.rms_norm(x, w, 1e-5))


def test_rope_matches_numpy_and_partial_rotary_definition():
    tb, nb = TorchBackend(), NumpyBackend(threads=1)
    positions = np.array([0, 1, 5, 77, 1000], dtype=np.int64)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)  # head_dim 16
    x = randn(5, 3 * 16)
    close(tb.rope(torch.from_numpy(x), positions, torch.from_numpy(inv_freq)), nb.rope(x, positions, inv_freq))
    # partial rotary: heads of 24 with 16 rotated dims; the last 8 of each head pass through
    x = randn(5, 3 * 24)
    out = tb.rope(torch.from_numpy(x), positions, torch.from_numpy(inv_freq), head_dim=24).numpy().reshape(5, 3, 24)
    heads = x.reshape(5, 3, 24)
    close(out[..., :16], nb.rope(np.ascontiguousarray(heads[..., :16]).reshape(5, -1), positions, inv_freq).reshape(5, 3, 16))
    np.testing.assert_array_equal(out[..., 16:], heads[..., 16:])


def reference_attention(q, k, v, n_kv, head_dim, scale=None, window=None):
    """Softmax attention of T queries at positions S-T..S-1 over S keys, written out (float64)."""
    T, S = q.shape[0], k.shape[0]
    n_heads = q.shape[1] // head_dim
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    out = np.zeros((T, n_heads, head_dim))
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        qh, kh, vh = (a.reshape(a.shape[0], -1, head_dim)[:, i].astype(np.float64) for a, i in ((q, h), (k, kv), (v, kv)))
        scores = qh @ kh.T * scale  # (T, S)
        p, j = (S - T + np.arange(T))[:, None], np.arange(S)[None, :]
        allowed = (j <= p) & ((j > p - window) if window is not None else True)
        scores = np.where(allowed, scores, -np.inf)
        weights = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h] = (weights / weights.sum(1, keepdims=True)) @ vh
    return out.reshape(T, -1)


@pytest.mark.parametrize("scale,window", [(None, None), (0.3, None), (None, 3), (0.2, 5)])
def test_attention_whole_sequence_and_incremental(scale, window):
    n_heads, n_kv, hd, T = 4, 2, 8, 11
    tb = TorchBackend()
    q, k, v = randn(T, n_heads * hd), randn(T, n_kv * hd), randn(T, n_kv * hd)
    expected = reference_attention(q, k, v, n_kv, hd, scale, window)
    cache = LayerCache(np, n_kv, hd, T)
    t = torch.from_numpy
    close(tb.attention(t(q), t(k), t(v), cache, 0, scale=scale, window=window), expected)
    cache = LayerCache(np, n_kv, hd, T)  # the same sequence as a prefill of 6 and 5 single steps
    parts = [tb.attention(t(q[:6]), t(k[:6]), t(v[:6]), cache, 0, scale=scale, window=window)]
    for s in range(6, T):
        parts.append(tb.attention(t(q[s:s + 1]), t(k[s:s + 1]), t(v[s:s + 1]), cache, s, scale=scale, window=window))
    close(torch.cat(parts), expected)


def test_attention_matches_numpy_backend():
    n_heads, n_kv, hd, T = 6, 2, 16, 9
    q, k, v = randn(T, n_heads * hd), randn(T, n_kv * hd), randn(T, n_kv * hd)
    ours = TorchBackend().attention(*map(torch.from_numpy, (q, k, v)), LayerCache(np, n_kv, hd, T), 0)
    close(ours, NumpyBackend(threads=1).attention(q, k, v, LayerCache(np, n_kv, hd, T), 0))


def test_ops_are_differentiable():
    tb = TorchBackend()
    n_heads, n_kv, hd, T = 4, 2, 6, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, n * hd, generator=g, dtype=torch.float64, requires_grad=True) for n in (n_heads, n_kv, n_kv))
    inv_freq = torch.tensor([1.0, 0.1], dtype=torch.float64)  # rotary dims 4 of head_dim 6

    def attention(q, k, v):
        q, k = tb.rope(q, np.arange(T), inv_freq, head_dim=hd), tb.rope(k, np.arange(T), inv_freq, head_dim=hd)
        return tb.attention(q, k, v, LayerCache(np, n_kv, hd, T), 0, window=3)

    assert torch.autograd.gradcheck(attention, (q, k, v))
    x, w = (torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, w: tb.rms_norm(x, w[0], 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: tb.gelu_mul(x, w) + tb.silu_mul(w, x), (x, w))


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen2"])
def test_runtime_model_on_torch_matches_numpy(tmp_path, fixture):
    """The runtime Model executed by TorchBackend == by the NumPy backend, prefill and decode, on a mixed
    quantized file (TorchBackend dequantizes with the format's reference)."""
    path = write_test_mxq(fixtures.ensure(fixture), tmp_path / "m.mxq", mixed_plan(fixture))
    ids = RNG.integers(0, 200, 12)
    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        results = []
        for backend in (NumpyBackend(threads=1, kernels=False), TorchBackend()):  # the exact NumPy path
            model = Model.from_file(f, config, backend)
            cache = model.new_cache(16)
            prefill = backend.to_host(model.forward(ids[:9], cache))
            steps = [backend.to_host(model.forward(ids[s:s + 1], cache)) for s in range(9, 12)]
            results.append(np.concatenate([prefill] + steps))
    close(results[1], results[0], tol=1e-4)
