"""Compiled CPU kernels (Numba) for the `vq` scheme: y = x @ Wᵀ straight from the packed file bytes.

    vq_matmul(x, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size,
              row_ptr, cols, values, bias, residual, y, n_parts)
    vq_matmul_serial(... the same ...)   on the calling thread only (small matrices, the ahead-of-time build)

A row of W is ceil(in / dim) vectors of `dim` inputs; vector j holds a k-bit index (k = index_bits = dim·bits:
4, 6 or 8) into the matrix's codebook of 2^k points, and every group_size inputs share a scale (SPEC.md §12):
    W[r, c] = scale[r, c div g] · codebook[index[r, c div dim], c mod dim]
The packed indices repeat every B bytes (a "unit") holding U indices, as in cpu_lut_kernels.py (k = 4: 2 per
byte, 6: 4 per 3 bytes, 8: 1 per byte); a unit's U·dim inputs lie in one group (g is a multiple of U·dim).
x is first rearranged into planes, one per (index position j in a unit, coordinate i):
    xq[(j·dim + i)·NU + u] = x[(u·U + j)·dim + i]           (zeros past in_features: padding adds 0)
Per row, the G scales are decoded from their codes (scale = code·step + min, one fp32 (step, min) per run of 128
scales, SPEC.md §6.2) and spread to one per unit (`unit_scales`: su, zero past the last group), then
    y[r] = Σ_u su[u] · Σ_j Σ_i codebook[i, index_j(u)] · xq[(j·dim + i)·NU + u]
in one loop over the row's units per (k, dim) (`row_dot`): a unit read as one byte or a 24-bit word, each index
cut out with a constant shift and mask, and ONE codebook lookup per dim weights (`codebook` is float32
(dim, 2^k), its coordinate planes: dim gathers of one index); LLVM vectorizes the loop. Then CSR outliers, bias,
residual. Every packed byte is read once per call and token.
"""
from __future__ import annotations

import itertools

import numpy as np
from numba import njit, prange

from ...format_spec.layout import VQ_BITS, VQ_DIMS, VQ_INDEX_BITS
from .cpu_kernels import half_to_float, unit_shape
from .cpu_lut_kernels import code
from .cpu_qdot import word
from .cpu_weights import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)
META_RUN_SHIFT = 7  # runs of 128 scales share one (step, min)


@njit(**PARALLEL)
def vq_matmul(x, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size, row_ptr, cols, values, bias,
              residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for a packed vq W (module doc); rows cut into n_parts
    contiguous parts run in parallel."""
    xq = plane_x(x, index_bits, dim, packed.shape[1])
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        vq_part(part * step, min(R, (part + 1) * step), x, xq, packed, codebook, index_bits, dim, scale_codes,
                scale_meta, group_size, row_ptr, cols, values, bias, residual, y)


@njit(**SERIAL)
def vq_matmul_serial(x, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                     bias, residual, y, n_parts):
    """vq_matmul on the calling thread; n_parts unused."""
    xq = plane_x(x, index_bits, dim, packed.shape[1])
    vq_part(0, packed.shape[0], x, xq, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size,
            row_ptr, cols, values, bias, residual, y)


@njit(**SERIAL)
def plane_x(x, index_bits, dim, n_bytes):
    """x (T, in) → xq (T, U·dim·NU) in plane order (module doc), zeros at padding."""
    T, n_in = x.shape
    U, B = unit_shape(index_bits)
    NU = n_bytes // B
    xq = np.empty((T, U * dim * NU), np.float32)
    for t in range(T):
        for j in range(U):
            for i in range(dim):
                plane = (j * dim + i) * NU
                for u in range(NU):
                    c = (u * U + j) * dim + i
                    xq[t, plane + u] = x[t, c] if c < n_in else np.float32(0.0)
    return xq


@njit(**SERIAL)
def unit_scales(r, scale_codes, scale_meta, units_per_group, su):
    """su[:G·units_per_group] = the decoded scale of row r's group of each unit (G scales, each written
    units_per_group times: a fixed-length loop that LLVM turns into vector stores; su's tail past the last
    group, if any, stays as allocated: zero)."""
    G = scale_codes.shape[1]
    for k in range(G):
        n = r * G + k
        run = n >> META_RUN_SHIFT
        s = np.float32(scale_codes[r, k]) * scale_meta[run, 0] + scale_meta[run, 1]
        base = k * units_per_group
        for u in range(units_per_group):
            su[base + u] = s


@njit(**SERIAL)
def vq_part(r0, r1, x, xq, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size, row_ptr, cols,
            values, bias, residual, y):
    """vq_rows with (index bits, dim) as constants: its own compiled copy per kind (a runtime choice of the inner
    loop inside the row loop made the loop 1.6x slower, measured)."""
    if index_bits == 4:
        vq_rows(r0, r1, x, xq, packed, codebook, 4, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    elif index_bits == 6:
        vq_rows(r0, r1, x, xq, packed, codebook, 6, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    elif dim == 2:
        vq_rows(r0, r1, x, xq, packed, codebook, 8, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    else:
        vq_rows(r0, r1, x, xq, packed, codebook, 8, 4, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)


@njit(inline="always", **SERIAL)
def vq_rows(r0, r1, x, xq, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size, row_ptr, cols,
            values, bias, residual, y):
    """y[:, r0:r1] of vq_matmul, given plane_x's xq."""
    T = x.shape[0]
    U, B = unit_shape(index_bits)
    NU = packed.shape[1] // B
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    units_per_group = group_size // (U * dim)  # g is a multiple of U·dim
    su = np.zeros(max(NU, scale_codes.shape[1] * units_per_group), np.float32)  # (≥ NU,) a scale per unit
    for r in range(r0, r1):
        unit_scales(r, scale_codes, scale_meta, units_per_group, su)
        p = packed[r]
        for t in range(T):
            value = row_dot(p, index_bits, dim, codebook, su, xq[t], NU)
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    value += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                value += bias[r]
            if has_residual:
                value += residual[t, r]
            y[t, r] = value


@njit(**SERIAL)
def row_dot(p, index_bits, dim, codebook, su, xq, NU):
    """Σ_u su[u] · (unit u's dot product) over one packed row: one loop per (index bits, dim) with every
    index's shift a constant, so that LLVM vectorizes the loads, shifts and codebook lookups."""
    if index_bits == 4:
        return _vq4d2(p, codebook[0], codebook[1], su, xq, NU)
    if index_bits == 6:
        return _vq6d2(p, codebook[0], codebook[1], su, xq, NU)
    if dim == 2:
        return _vq8d2(p, codebook[0], codebook[1], su, xq, NU)
    return _vq8d4(p, codebook[0], codebook[1], codebook[2], codebook[3], su, xq, NU)


@njit(inline="always", **SERIAL)
def _vq4d2(p, c0, c1, su, xq, NU):  # 2 indices a byte
    acc = np.float32(0.0)
    for u in range(NU):
        v = p[u]
        a, b = code(v, 0, 15), code(v, 4, 15)
        acc += su[u] * (c0[a] * xq[u] + c1[a] * xq[NU + u] + c0[b] * xq[2 * NU + u] + c1[b] * xq[3 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _vq6d2(p, c0, c1, su, xq, NU):  # 4 indices in a 24-bit unit
    acc = np.float32(0.0)
    for u in range(NU):
        v = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
        a, b, c, d = code(v, 0, 63), code(v, 6, 63), code(v, 12, 63), code(v, 18, 63)
        acc += su[u] * (c0[a] * xq[u] + c1[a] * xq[NU + u] + c0[b] * xq[2 * NU + u] + c1[b] * xq[3 * NU + u] +
                        c0[c] * xq[4 * NU + u] + c1[c] * xq[5 * NU + u] + c0[d] * xq[6 * NU + u] +
                        c1[d] * xq[7 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _vq8d2(p, c0, c1, su, xq, NU):  # 1 index a byte
    acc = np.float32(0.0)
    for u in range(NU):
        a = p[u]
        acc += su[u] * (c0[a] * xq[u] + c1[a] * xq[NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _vq8d4(p, c0, c1, c2, c3, su, xq, NU):  # 1 index a byte, 4 coordinates
    acc = np.float32(0.0)
    for u in range(NU):
        a = p[u]
        acc += su[u] * (c0[a] * xq[u] + c1[a] * xq[NU + u] + c2[a] * xq[2 * NU + u] + c3[a] * xq[3 * NU + u])
    return acc


def examples():
    """(kernel name, arguments) typed as VqWeight calls them (see cpu_kernels.examples): every (bits, dim),
    3 rows of 40 inputs in groups of 32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    for bits, dim in itertools.product(VQ_BITS, VQ_DIMS):
        index_bits = bits * dim
        if index_bits not in VQ_INDEX_BITS:
            continue
        n_packs = -(-(-(-40 // dim)) // 32)
        packed = readonly(rng.integers(0, 256, (3, n_packs * index_bits * 4)).astype(np.uint8))
        codebook = readonly(rng.standard_normal((dim, 1 << index_bits)).astype(np.float32))
        scale_codes = readonly(rng.integers(0, 256, (3, 2)).astype(np.uint8))
        scale_meta = readonly(np.full((1, 2), 0.01, np.float32))
        for name in ("vq_matmul", "vq_matmul_serial"):
            yield name, (x, packed, codebook, index_bits, dim, scale_codes, scale_meta, 32, NO_ROWS, NO_COLS,
                         NO_VALUES, NO_FLOAT, NO_RESIDUAL, np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
