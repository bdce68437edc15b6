"""Compiled CPU kernels (Numba) for the `trellis` scheme: y = x @ Wᵀ straight from the rows' bit streams.

    trellis_matmul(x, packed, table, bits, scale_codes, scale_meta, group_size, bias, residual, y, n_parts)
    trellis_matmul_serial(... the same ...)   on the calling thread only (small matrices, the ahead-of-time build)

Row r of W is one bit stream (format_spec/trellis.py, SPEC.md §13): weight c reads the 12-bit window at stream bit
c·K (K = bits, 2–5), an index into the file's table of 4096 levels for K (`table`, float32 (4096,), widened once per
distinct table by cpu_trellis.py), and a scale per group_size inputs stretches it:
    W[r, c] = scale[r, c div g] · table[(stream_r >> c·K) mod 2^12]
The stream is read a "chunk" of 8 weights at a time: chunk i's windows start at bits 8i·K + j·K (j < 8), i.e. at
byte i·K, bit j·K, and end by bit 7K + 12 ≤ 47 of it, so ONE unaligned 64-bit load at byte i·K (`load64`) holds all
eight, each cut out with a constant shift and mask (no walk from one weight to the next: every chunk is
independent). A scale per group (g a multiple of 8: whole chunks) is decoded from its code where the group's sum is
taken (scale = code·step + min, one fp32 (step, min) per run of 128 scales, SPEC.md §6.2).

One token (`quad_dot`): four rows at a time, scalar code — per weight a shift and mask, a table load (the 16 KiB
table stays in L1) and a multiply-add into one of two partial sums per row, the 8 inputs of a chunk loaded once for
the four rows. Scalar on purpose: LLVM's vectorized form (gathers of the table) took 2-3x the time on Zen 4, and
one row at a time 1.4x (measured at 4096×4096 when the kernel was written). The function is compiled with FMA
contraction only (no reassociation: the loop stays scalar). Several tokens (`row_weights`): a row's weights decoded
once into a float32 row the same way, then vectorized dot products, four tokens at a time (`quad_token_dot`).

A row has no padding word (layout.trellis_dims: words_per_row = ceil((12 + (in − 1)·K) / 32)), so a chunk's
64-bit load could pass the row's end (and the last row's: the matrix's): the loops take the chunks whose 8 weights
lie before in_features and whose 8 bytes lie in the row (`safe_chunks`); the few after them are read from the
row's remaining bytes only (`guarded_load`: zeros past them, which only windows past the last weight reach).
Then bias and residual. (Little-endian hosts: the 64-bit load is the stream's next 64 bits.)

Speed (`python tools/bench_trellis.py`, 4096×4096, one thread of a 2-core Zen 4, shared machine): one token
4.6-5.0 ms, 0.28-0.30 ns per weight for every K, 9.3-10x decode's b4g64 tile kernel (0.50 ms); the prototype's
walk (a 64-bit buffer refilled a word at a time, one row at a time) took 10.4-11.4 ms.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ...format_spec.layout import TRELLIS_BITS
from .cpu_weights import NO_FLOAT, NO_RESIDUAL, readonly

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)
SCALAR = dict(fastmath={"contract"}, cache=True, nogil=True)  # FMAs, no reassociation: LLVM keeps the loop scalar
META_RUN_SHIFT = 7  # runs of 128 scales share one (step, min)
CHUNK = 8  # weights per 64-bit load
MASK = np.uint64(0xFFF)  # a 12-bit window
ROWS = 4  # rows quad_dot multiplies at once


@intrinsic
def load64(typingctx, row, at):
    """The 8 bytes of `row` (uint8, 1-D, C) from byte `at` as a little-endian uint64: one unaligned load."""
    if not isinstance(row, types.Array) or row.dtype != types.uint8 or not isinstance(at, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        start = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        return builder.load(builder.bitcast(start, ir.IntType(64).as_pointer()), align=1)

    return types.uint64(row, at), codegen


@njit(**PARALLEL)
def trellis_matmul(x, packed, table, bits, scale_codes, scale_meta, group_size, bias, residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for a trellis W (module doc); rows cut into n_parts
    contiguous parts run in parallel."""
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        trellis_part(part * step, min(R, (part + 1) * step), x, packed, table, bits, scale_codes, scale_meta,
                     group_size, bias, residual, y)


@njit(**SERIAL)
def trellis_matmul_serial(x, packed, table, bits, scale_codes, scale_meta, group_size, bias, residual, y, n_parts):
    """trellis_matmul on the calling thread; n_parts unused."""
    trellis_part(0, packed.shape[0], x, packed, table, bits, scale_codes, scale_meta, group_size, bias, residual, y)


@njit(**SERIAL)
def trellis_part(r0, r1, x, packed, table, bits, scale_codes, scale_meta, group_size, bias, residual, y):
    """y[:, r0:r1] of trellis_matmul: one token ROWS rows at a time (quad_dot, then each row's tail_dot; a last
    partial quad repeats its last row), several tokens a row at a time (row_weights, then quad_token_dot per four
    tokens)."""
    T, n_in = x.shape
    safe = safe_chunks(n_in, packed.shape[1], bits)
    if T == 1:
        sums = np.empty(ROWS, np.float32)
        for r in range(r0, r1, ROWS):
            last = r1 - 1
            quad_dot(packed, r, min(r + 1, last), min(r + 2, last), min(r + 3, last), bits, table, scale_codes,
                     scale_meta, group_size, x[0], safe, sums)
            for i in range(min(ROWS, r1 - r)):
                value = sums[i] + tail_dot(packed[r + i], r + i, bits, table, scale_codes, scale_meta, group_size,
                                           x[0], safe)
                y[0, r + i] = finished(value, 0, r + i, bias, residual)
        return
    w = np.empty(n_in, np.float32)
    sums = np.empty(ROWS, np.float32)
    for r in range(r0, r1):
        row_weights(packed[r], r, bits, table, scale_codes, scale_meta, group_size, safe, w)
        for t0 in range(0, T, ROWS):
            quad_token_dot(w, x, t0, sums)
            for i in range(min(ROWS, T - t0)):
                y[t0 + i, r] = finished(sums[i], t0 + i, r, bias, residual)


@njit(inline="always", **SERIAL)
def finished(value, t, r, bias, residual):
    """y[t, r]'s value + bias[r] + residual[t, r] (each where given)."""
    if bias.size > 0:
        value += bias[r]
    if residual.size > 0:
        value += residual[t, r]
    return value


@njit(**SERIAL)
def safe_chunks(n_in, n_bytes, bits):
    """How many chunks from a row's first the loops read with load64: whole chunks before in_features whose 8
    bytes lie in the row's n_bytes."""
    fits = (n_bytes - CHUNK) // bits + 1 if n_bytes >= CHUNK else 0
    return min(n_in // CHUNK, fits)


@njit(inline="always", **SERIAL)
def group_scale(r, k, scale_codes, scale_meta):
    """The decoded scale of row r's group k."""
    run = (r * scale_codes.shape[1] + k) >> META_RUN_SHIFT
    return np.float32(scale_codes[r, k]) * scale_meta[run, 0] + scale_meta[run, 1]


@njit(inline="always", **SERIAL)
def level(v, j, bits, table):
    """table[window j of a chunk's 64 bits v]."""
    return table[(v >> np.uint64(j * bits)) & MASK]


@njit(**SCALAR)
def quad_dot(packed, r0, r1, r2, r3, bits, table, scale_codes, scale_meta, group_size, x, safe, sums):
    """sums[i] = Σ_c W[r_i, c]·x[c] over the first `safe` chunks of rows r0..r3 (module doc); each K its own copy
    (constant shifts: one bextr a window on x86)."""
    p0, p1, p2, p3 = packed[r0], packed[r1], packed[r2], packed[r3]
    if bits == 2:
        _quad(p0, p1, p2, p3, r0, r1, r2, r3, 2, table, scale_codes, scale_meta, group_size, x, safe, sums)
    elif bits == 3:
        _quad(p0, p1, p2, p3, r0, r1, r2, r3, 3, table, scale_codes, scale_meta, group_size, x, safe, sums)
    elif bits == 4:
        _quad(p0, p1, p2, p3, r0, r1, r2, r3, 4, table, scale_codes, scale_meta, group_size, x, safe, sums)
    else:
        _quad(p0, p1, p2, p3, r0, r1, r2, r3, 5, table, scale_codes, scale_meta, group_size, x, safe, sums)


@njit(inline="always", **SCALAR)
def _quad(p0, p1, p2, p3, r0, r1, r2, r3, bits, table, scale_codes, scale_meta, group_size, x, safe, sums):
    per_group = group_size // CHUNK
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for k in range(scale_codes.shape[1]):
        a0 = a1 = b0 = b1 = c0 = c1 = d0 = d1 = np.float32(0.0)  # two partial sums per row
        for i in range(k * per_group, min(safe, (k + 1) * per_group)):
            at, c = i * bits, i * CHUNK
            v0, v1, v2, v3 = load64(p0, at), load64(p1, at), load64(p2, at), load64(p3, at)
            for j in range(0, CHUNK, 2):  # (unrolled: a constant trip count)
                xa, xb = x[c + j], x[c + j + 1]
                a0 += level(v0, j, bits, table) * xa
                b0 += level(v1, j, bits, table) * xa
                c0 += level(v2, j, bits, table) * xa
                d0 += level(v3, j, bits, table) * xa
                a1 += level(v0, j + 1, bits, table) * xb
                b1 += level(v1, j + 1, bits, table) * xb
                c1 += level(v2, j + 1, bits, table) * xb
                d1 += level(v3, j + 1, bits, table) * xb
        t0 += group_scale(r0, k, scale_codes, scale_meta) * (a0 + a1)
        t1 += group_scale(r1, k, scale_codes, scale_meta) * (b0 + b1)
        t2 += group_scale(r2, k, scale_codes, scale_meta) * (c0 + c1)
        t3 += group_scale(r3, k, scale_codes, scale_meta) * (d0 + d1)
    sums[0], sums[1], sums[2], sums[3] = t0, t1, t2, t3


@njit(**SERIAL)
def guarded_load(p, at):
    """load64(p, at) of a row p's bytes from `at`, reading none past the row's end (zeros there)."""
    if at + CHUNK <= p.size:
        return load64(p, at)
    if p.size >= CHUNK:  # the row's last 8 bytes, shifted down to `at`
        return load64(p, p.size - CHUNK) >> np.uint64(8 * (at + CHUNK - p.size))
    v = np.uint64(0)
    for i in range(at, p.size):
        v |= np.uint64(p[i]) << np.uint64(8 * (i - at))
    return v


@njit(**SERIAL)
def tail_dot(p, r, bits, table, scale_codes, scale_meta, group_size, x, safe):
    """Σ_c W[r, c]·x[c] over the weights after the first `safe` chunks of row p (guarded_load)."""
    n_in = x.size
    total = np.float32(0.0)
    for i in range(safe, -(-n_in // CHUNK)):
        v = guarded_load(p, i * bits)
        s = group_scale(r, i * CHUNK // group_size, scale_codes, scale_meta)
        for j in range(min(CHUNK, n_in - i * CHUNK)):
            total += s * level(v, j, bits, table) * x[i * CHUNK + j]
    return total


@njit(**SCALAR)
def row_weights(p, r, bits, table, scale_codes, scale_meta, group_size, safe, w):
    """w[c] = W[r, c] for every c < in_features (w's size) of row p; each K its own copy (as quad_dot)."""
    if bits == 2:
        _weights(p, r, 2, table, scale_codes, scale_meta, group_size, safe, w)
    elif bits == 3:
        _weights(p, r, 3, table, scale_codes, scale_meta, group_size, safe, w)
    elif bits == 4:
        _weights(p, r, 4, table, scale_codes, scale_meta, group_size, safe, w)
    else:
        _weights(p, r, 5, table, scale_codes, scale_meta, group_size, safe, w)


@njit(inline="always", **SCALAR)
def _weights(p, r, bits, table, scale_codes, scale_meta, group_size, safe, w):
    n_in = w.size
    per_group = group_size // CHUNK
    for k in range(scale_codes.shape[1]):
        s = group_scale(r, k, scale_codes, scale_meta)
        for i in range(k * per_group, min(safe, (k + 1) * per_group)):
            v = load64(p, i * bits)
            for j in range(CHUNK):
                w[i * CHUNK + j] = s * level(v, j, bits, table)
    for i in range(safe, -(-n_in // CHUNK)):
        v = guarded_load(p, i * bits)
        s = group_scale(r, i * CHUNK // group_size, scale_codes, scale_meta)
        for j in range(min(CHUNK, n_in - i * CHUNK)):
            w[i * CHUNK + j] = s * level(v, j, bits, table)


@njit(**SERIAL)
def quad_token_dot(w, x, t0, sums):
    """sums[i] = Σ_c w[c]·x[t0 + i, c] for four tokens from t0 (past the last token: the last again), vectorized:
    w read once, four independent sums (a token at a time, bound by its sum's latency, took 1.4x the time)."""
    last = x.shape[0] - 1
    x0, x1, x2, x3 = x[t0], x[min(t0 + 1, last)], x[min(t0 + 2, last)], x[min(t0 + 3, last)]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for c in range(w.size):
        wc = w[c]
        a0 += wc * x0[c]
        a1 += wc * x1[c]
        a2 += wc * x2[c]
        a3 += wc * x3[c]
    sums[0], sums[1], sums[2], sums[3] = a0, a1, a2, a3


def examples():
    """(kernel name, arguments) typed as TrellisWeight calls them (see cpu_kernels.examples): every K, 3 rows of
    200 inputs in groups of 32 (the last chunks past the 64-bit loads' reach: guarded_load)."""
    rng = np.random.default_rng(0)
    n_in = 200
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    table = readonly(rng.standard_normal(4096).astype(np.float32))
    scale_codes = readonly(rng.integers(0, 64, (3, -(-n_in // 32))).astype(np.uint8))
    scale_meta = readonly(np.full((1, 2), 0.01, np.float32))
    for bits in TRELLIS_BITS:
        words = -(-(12 + (n_in - 1) * bits) // 32)
        packed = readonly(rng.integers(0, 256, (3, 4 * words)).astype(np.uint8))
        for name in ("trellis_matmul", "trellis_matmul_serial"):
            yield name, (x, packed, table, bits, scale_codes, scale_meta, 32, NO_FLOAT, NO_RESIDUAL,
                         np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
