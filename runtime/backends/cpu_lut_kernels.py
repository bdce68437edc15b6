"""Compiled CPU kernels (Numba) for the `lut` scheme: y = x @ Wᵀ straight from the packed file bytes.

    lut_matmul(x, packed, codebook_bits, codebook_rows, bits, row_ptr, cols, values, bias, residual, y, n_parts)
    lut_matmul_serial(... the same ...)   on the calling thread only (small matrices)

As in cpu_kernels.py, the packed stream repeats every B bytes (a "unit") holding U codes (code j of a
unit sits at bit j·b; cpu_kernels.unit_shape: 4-bit 2 per byte, 3-bit 8 per 3 bytes ...), and x is first
rearranged into planes, xq[j·NU + u] = x[u·U + j] (zeros past in_features: padding codes add 0).
Per row r, its codebook (row r div codebook_rows, 2^b fp16 levels) is widened to float32 once, then
    y[r] = Σ_j Σ_u level[code_j(u)] · xq[j·NU + u]
in one loop over the row's units per bit width (`row_dot`): a unit is read as one or two 32-bit words
and each code cut out with a constant shift and a mask, a loop LLVM vectorizes (the table lookups
become gathers); then CSR outliers, bias, residual. Every packed byte is read once per call and token.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ...format_spec import SUPPORTED_BITS
from .cpu_kernels import half_to_float, unit_shape
from .cpu_qdot import _as_i32, word
from .cpu_weights import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly

@intrinsic
def code(typingctx, value, shift, mask):
    """(value >> shift) & mask in 32-bit integer ops (Numba would widen them to 64 bits and halve the
    SIMD width), as a signed table index (an unsigned one keeps LLVM from vectorizing the lookup)."""
    if not all(isinstance(t, types.Integer) for t in (value, shift, mask)):
        return None

    def codegen(context, builder, signature, args):
        v, s, m = (_as_i32(builder, a) for a in args)
        return builder.zext(builder.and_(builder.lshr(v, s), m), ir.IntType(64))

    return types.intp(value, shift, mask), codegen


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
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    level = np.empty(K, np.float32)
    for r in range(r0, r1):
        book = codebook_bits[r // codebook_rows]
        for k in range(K):
            level[k] = half_to_float(book[k])
        p = packed[r]
        for t in range(T):
            value = row_dot(p, bits, level, xq[t], NU)
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    value += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                value += bias[r]
            if has_residual:
                value += residual[t, r]
            y[t, r] = value


@njit(**SERIAL)
def row_dot(p, bits, level, xq, NU):
    """Σ_u Σ_j level[code_j(u)] · xq[j·NU + u] over one packed row: one loop per bit width with every
    code position's shift a constant, so that LLVM vectorizes the loads, shifts and table lookups."""
    if bits == 2:
        return _lut2(p, level, xq, NU)
    if bits == 3:
        return _lut3(p, level, xq, NU)
    if bits == 4:
        return _lut4(p, level, xq, NU)
    if bits == 5:
        return _lut5(p, level, xq, NU)
    if bits == 6:
        return _lut6(p, level, xq, NU)
    return _lut8(p, level, xq, NU)


@njit(inline="always", **SERIAL)
def _lut2(p, lv, xq, NU):
    acc = np.float32(0.0)
    for u in range(NU):
        v = p[u]
        acc += (lv[code(v, 0, 3)] * xq[u] + lv[code(v, 2, 3)] * xq[NU + u] +
                lv[code(v, 4, 3)] * xq[2 * NU + u] + lv[code(v, 6, 3)] * xq[3 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _lut3(p, lv, xq, NU):  # 8 codes in a 24-bit unit
    acc = np.float32(0.0)
    for u in range(NU):
        v = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
        acc += (lv[code(v, 0, 7)] * xq[u] + lv[code(v, 3, 7)] * xq[NU + u] +
                lv[code(v, 6, 7)] * xq[2 * NU + u] + lv[code(v, 9, 7)] * xq[3 * NU + u] +
                lv[code(v, 12, 7)] * xq[4 * NU + u] + lv[code(v, 15, 7)] * xq[5 * NU + u] +
                lv[code(v, 18, 7)] * xq[6 * NU + u] + lv[code(v, 21, 7)] * xq[7 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _lut4(p, lv, xq, NU):
    acc = np.float32(0.0)
    for u in range(NU):
        v = p[u]
        acc += lv[code(v, 0, 15)] * xq[u] + lv[code(v, 4, 15)] * xq[NU + u]
    return acc


@njit(inline="always", **SERIAL)
def _lut5(p, lv, xq, NU):  # 8 codes in a 40-bit unit: a low (bits 0..23) and a high (24..39) word
    acc = np.float32(0.0)
    for u in range(NU):
        lo = word(p[5 * u], p[5 * u + 1], p[5 * u + 2])
        hi = word(p[5 * u + 3], p[5 * u + 4], 0)
        straddle = code(lo, 20, 15) | (code(hi, 0, 1) << 4)  # code 4: bits 20..24
        acc += (lv[code(lo, 0, 31)] * xq[u] + lv[code(lo, 5, 31)] * xq[NU + u] +
                lv[code(lo, 10, 31)] * xq[2 * NU + u] + lv[code(lo, 15, 31)] * xq[3 * NU + u] +
                lv[straddle] * xq[4 * NU + u] + lv[code(hi, 1, 31)] * xq[5 * NU + u] +
                lv[code(hi, 6, 31)] * xq[6 * NU + u] + lv[code(hi, 11, 31)] * xq[7 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _lut6(p, lv, xq, NU):  # 4 codes in a 24-bit unit
    acc = np.float32(0.0)
    for u in range(NU):
        v = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
        acc += (lv[code(v, 0, 63)] * xq[u] + lv[code(v, 6, 63)] * xq[NU + u] +
                lv[code(v, 12, 63)] * xq[2 * NU + u] + lv[code(v, 18, 63)] * xq[3 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _lut8(p, lv, xq, NU):
    acc = np.float32(0.0)
    for u in range(NU):
        acc += lv[p[u]] * xq[u]
    return acc


def examples():
    """(kernel name, arguments) typed as LutWeight calls them (see cpu_kernels.examples)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    for bits in SUPPORTED_BITS:
        packed = readonly(rng.integers(0, 256, (3, 2 * 32 * bits // 8)).astype(np.uint8))
        book = readonly(rng.standard_normal((3, 1 << bits)).astype(np.float16).view(np.uint16))
        for name in ("lut_matmul", "lut_matmul_serial"):
            yield name, (x, packed, book, 1, bits, NO_ROWS, NO_COLS, NO_VALUES, NO_FLOAT, NO_RESIDUAL,
                         np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
