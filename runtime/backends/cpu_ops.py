"""Compiled CPU kernels (Numba) for the small per-token operations of a decoder layer.

Each replaces several NumPy calls (each a Python dispatch plus a pass over a temporary) by one
loop; numpy_backend.py uses them for decode-sized inputs (the NumPy versions stay the reference):

    rms_norm(x, w, eps, out)                      out = w · x / sqrt(mean(x²) + eps)      x (T, H)
    rope(x, positions, inv_freq, head_dim, out)   rotate_half RoPE over the first 2·len(inv_freq)
                                                  dims of each head; the rest pass through
    silu_mul(gate, up, out)                       out = silu(gate) · up
    gelu_mul(gate, up, out)                       out = gelu_tanh(gate) · up
    attention_serial(q, kc, vc, start, scale, window, out, n_parts)   causal (optionally windowed)
                                                  attention of T queries at start.. over the cache
                                                  kc, vc (n_kv, capacity, hd) already holding them

Types as the backend passes them: float32 2-D C arrays (the cache 3-D), positions int64 1-D,
inv_freq and w float32 1-D. Reductions accumulate in float32 (fastmath: reassociated, SIMD).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .cpu_kernels import SERIAL

SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
# SwiGLU's and GeGLU's loops divide: Numba's default (Python) error model checks every float division for zero, a
# branch that keeps LLVM from vectorizing the loop. Their divisors are ≥ 1 (1 + e^x).
ELEMENTWISE = dict(SERIAL, error_model="numpy")
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = LN2_HI + LN2_LO (Cephes)
# e^x between the smallest normal float32 and 2^127·(1 + ...): a finite result, as fastmath assumes (a reciprocal of
# an infinity there came out NaN, where NumPy's silu of -200 is -0)
EXP_LOW, EXP_HIGH = np.float32(-87.33654), np.float32(88.0)


@intrinsic
def int_bits_to_float(typingctx, bits):
    """The float32 whose bit pattern is an integer's low 32 bits."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always", **SERIAL)
def exp32(x):
    """e^x in float32 for x clamped to [EXP_LOW, EXP_HIGH], within a few ulp (3 measured over the range; fastmath
    may fold the two-part ln 2): x = n·ln 2 + r, |r| ≤ ln 2 / 2, e^r by
    Cephes' expf polynomial, times 2^n made from its bits. Unlike np.exp (a libm call per value) a loop of it
    vectorizes: SwiGLU's exp over 1536 values measured 2x faster on AVX2."""
    x = min(max(x, EXP_LOW), EXP_HIGH)
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * int_bits_to_float((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(**SERIAL)
def rms_norm(x, w, eps, out):
    T, H = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for c in range(H):
            ss += x[t, c] * x[t, c]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(H) + np.float32(eps))
        for c in range(H):
            out[t, c] = w[c] * (x[t, c] * inv)


@njit(**SERIAL)
def rope(x, positions, inv_freq, head_dim, out):
    T, width = x.shape
    half = inv_freq.shape[0]
    n_heads = width // head_dim
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for t in range(T):
        for i in range(half):
            angle = np.float32(positions[t]) * inv_freq[i]  # float32 angle, as the reference
            cos[i] = np.cos(angle)
            sin[i] = np.sin(angle)
        for h in range(n_heads):
            o = h * head_dim
            for i in range(half):
                x1, x2 = x[t, o + i], x[t, o + half + i]
                out[t, o + i] = x1 * cos[i] - x2 * sin[i]
                out[t, o + half + i] = x2 * cos[i] + x1 * sin[i]
            for i in range(2 * half, head_dim):  # partial rotary: the rest passes through
                out[t, o + i] = x[t, o + i]


@njit(**ELEMENTWISE)
def silu_mul(gate, up, out):
    T, n = gate.shape
    for t in range(T):
        for c in range(n):
            g = gate[t, c]
            out[t, c] = g / (np.float32(1.0) + exp32(-g)) * up[t, c]


@njit(**ELEMENTWISE)
def gelu_mul(gate, up, out):
    T, n = gate.shape
    for t in range(T):
        for c in range(n):
            g = gate[t, c]
            inner = SQRT_2_OVER_PI * (g + np.float32(0.044715) * g * g * g)
            # 0.5·(1 + tanh(u)) = 1 / (1 + e^{-2u})
            out[t, c] = g / (np.float32(1.0) + exp32(np.float32(-2.0) * inner)) * up[t, c]


@njit(inline="always", **SERIAL)
def _head(q, kc, vc, start, scale, window, out, n_rep, head_dim, qh):
    """Query head qh (all T queries) against kv head qh // n_rep: softmax(q·Kᵀ·scale) V."""
    T = q.shape[0]
    kv = qh // n_rep
    o = qh * head_dim
    scores = np.empty(start + T, np.float32)
    acc = np.empty(head_dim, np.float32)
    for t in range(T):
        p = start + t  # this query's position: keys first..p
        first = 0 if window < 0 else max(0, p - window + 1)
        peak = -np.inf
        for j in range(first, p + 1):
            s = np.float32(0.0)
            for d in range(head_dim):
                s += q[t, o + d] * kc[kv, j, d]
            s *= scale
            scores[j] = s
            peak = max(peak, s)
        total = np.float32(0.0)
        for j in range(first, p + 1):
            e = exp32(scores[j] - peak)
            scores[j] = e
            total += e
        acc[:] = 0.0
        for j in range(first, p + 1):
            e = scores[j]
            for d in range(head_dim):
                acc[d] += e * vc[kv, j, d]
        inv = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, o + d] = acc[d] * inv


@njit(**SERIAL)
def attention_serial(q, kc, vc, start, scale, window, out, n_parts):
    """Decode attention on the calling thread; n_parts unused. (Long contexts: cpu_team_kernels.attention_team,
    the query heads over the team's threads.)"""
    n_kv, _, head_dim = kc.shape
    n_heads = q.shape[1] // head_dim
    for qh in range(n_heads):
        _head(q, kc, vc, start, scale, window, out, n_heads // n_kv, head_dim, qh)


def examples():
    """(op name, arguments) typed as the backend calls them (see cpu_kernels.examples)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    yield "rms_norm", (x, np.ones(8, np.float32), 1e-5, np.empty_like(x))
    yield "rope", (x, np.arange(2, dtype=np.int64), np.ones(2, np.float32), 4, np.empty_like(x))
    yield "silu_mul", (x, x, np.empty_like(x))
    yield "gelu_mul", (x, x, np.empty_like(x))
    cache = rng.standard_normal((1, 2, 4)).astype(np.float32)
    yield "attention_serial", (x[:1], cache, cache, 1, np.float32(0.5), -1, np.empty_like(x[:1]), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the backend uses."""
    for name, args in examples():
        globals()[name](*args)
