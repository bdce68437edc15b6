"""Compiled CPU kernels (Numba) for the `lut` scheme: y = x @ Wᵀ straight from the packed file bytes.

    lut_matmul(x, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias, residual, y, n_parts)
    lut_matmul_serial(... the same ...)   on the calling thread only (small matrices)

As in cpu_kernels.py, the packed stream repeats every B bytes (a "unit") holding U codes (code j of a
unit sits at bit j·b; cpu_kernels.unit_shape: 4-bit 2 per byte, 3-bit 8 per 3 bytes ...), and x is first
rearranged into planes, xq[j·NU + u] = x[u·U + j] (zeros past in_features: padding codes add 0).
Per row r, its codebook (row r div codebook_rows, 2^b fp16 levels) is widened to float32 once, then
    y[r] = Σ_u Σ_j level[code_j(u)] · xq[j·NU + u]
with a unit read as one integer (≤ 40 bits) and each code cut out with a shift and a mask; then CSR
outliers, bias, residual. Every packed byte is read from memory once per call.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...format_spec import SUPPORTED_BITS
from .cpu_kernels import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES, half_to_float, unit_shape
from .cpu_weights import readonly

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)


@njit(**PARALLEL)
def lut_matmul(x, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias, residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for a packed lut W (module doc); rows cut into
    n_parts contiguous parts run in parallel."""
    xq = plane_x(x, bits, packed.shape[1])
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        lut_rows(part * step, min(R, (part + 1) * step), x, xq, packed, codebook_bits, codebook_rows, bits,
                 row_ptr, cols, values, bias, residual, y)


@njit(**SERIAL)
def lut_matmul_serial(x, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias, residual, y,
                      n_parts):
    """lut_matmul on the calling thread; n_parts unused."""
    xq = plane_x(x, bits, packed.shape[1])
    lut_rows(0, packed.shape[0], x, xq, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias,
             residual, y)


@njit(**SERIAL)
def plane_x(x, bits, n_bytes):
    """x (T, in) → xq (T, U·NU) in plane order, zeros at padding."""
    T, n_in = x.shape
    U, B = unit_shape(bits)
    NU = n_bytes // B
    xq = np.empty((T, U * NU), np.float32)
    for t in range(T):
        for j in range(U):
            for u in range(NU):
                c = u * U + j
                xq[t, j * NU + u] = x[t, c] if c < n_in else np.float32(0.0)
    return xq


@njit(**SERIAL)
def lut_rows(r0, r1, x, xq, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias, residual, y):
    """y[:, r0:r1] of lut_matmul, given plane_x's xq."""
    T = x.shape[0]
    U, B = unit_shape(bits)
    NU = packed.shape[1] // B
    K = codebook_bits.shape[1]
    mask = np.uint64(K - 1)
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    level = np.empty(K, np.float32)
    acc = np.empty(T, np.float32)
    for r in range(r0, r1):
        book = codebook_bits[r // codebook_rows]
        for k in range(K):
            level[k] = half_to_float(book[k])
        p = packed[r]
        acc[:] = 0.0
        for u in range(NU):
            unit = np.uint64(0)
            for i in range(B):
                unit |= np.uint64(p[u * B + i]) << np.uint64(8 * i)
            for j in range(U):
                w = level[(unit >> np.uint64(j * bits)) & mask]
                for t in range(T):
                    acc[t] += w * xq[t, j * NU + u]
        for t in range(T):
            value = acc[t]
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    value += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                value += bias[r]
            if has_residual:
                value += residual[t, r]
            y[t, r] = value


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    for bits in SUPPORTED_BITS:
        packed = readonly(rng.integers(0, 256, (3, 2 * 32 * bits // 8)).astype(np.uint8))
        book = readonly(np.zeros((3, 1 << bits), np.uint16))
        for kernel in (lut_matmul, lut_matmul_serial):
            kernel(x, packed, book, 1, bits, NO_ROWS, NO_COLS, NO_VALUES, NO_FLOAT, NO_RESIDUAL,
                   np.empty((1, 3), np.float32), 2)
