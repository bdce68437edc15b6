"""Compiled CPU kernels (Numba): products straight from the packed file bytes (lean mode).

    affine_matmul(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                  row_ptr, cols, values, bias, residual, y, n_parts)   y = x @ Wᵀ (+ bias) (+ residual)
    affine_matmul_serial(... the same ...)                              on the calling thread only
    fp16_matmul(x, half_bits, bias, residual, y, n_parts)               the same for an fp16 matrix
    fp16_matmul_serial(... the same ...)                                on the calling thread only

How a row of an affine matrix is multiplied. The packed stream repeats every B bytes (a "unit")
holding U codes (4-bit: 2 per byte; 3-bit: 8 per 3 bytes ...; code j of a unit sits at bit j·b).
x is first rearranged into planes, xq[j·NU + u] = x[u·U + j] (NU units per row; zeros past
in_features, so padding codes contribute nothing), and summed per group (Σx_k). Per row, the
group scales s_k and zeros z_k are decoded from the file's 8-bit codes (value = code·step + min,
one (step, min) per run of 128 values, SPEC.md §6.2), then with w = (q − z)·s (SPEC.md §6.1):
    y[r] = Σ_u s_{k(u)} · Σ_j code_j(u)·xq[j·NU + u]  −  Σ_k s_k·z_k·Σx_k
The first sum is one long SIMD loop over the row's units (`scaled_dot`), compiled once per
(bits, units per group) so that the scale index k(u) = u >> shift has a constant shift. Then CSR
outliers (y[r] += Σ v·x[c]), bias and residual. Rows are split into n_parts parallel parts
(prange); every packed byte is read from memory once per call (T > 1 tokens re-read a row from L1).
Integer codes are handled in 32-bit lanes by two tiny LLVM intrinsics (`word`, `field`): Numba
would widen them to 64 bits and halve the SIMD width.

Array types are fixed (see `warm_up`) so each kernel compiles exactly once:
x, y, residual float32 2-D C; packed, codes, half_bits 2-D C read-only (views of the mmapped
file; CSR row_ptr uint32, cols uint16, values as fp16 bits uint16, 1-D read-only); metas
float32 (runs, 2); bias float32 (out,); the NO_* stand-ins (cpu_weights.py) mark absent arguments.
The *_serial kernels are also built ahead of time into a plain CPython extension (cpu_aot.py).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ...format_spec import SUPPORTED_BITS
from .cpu_weights import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly  # noqa: F401 - re-exported

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)
META_RUN_SHIFT = 7  # runs of 128 metadata values


@intrinsic
def half_to_float(typingctx, bits):
    """fp16 bit pattern (uint16) → float32, one hardware conversion (F16C / NEON) once vectorized."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


I32 = ir.IntType(32)


def _as_i32(builder, value):
    width = value.type.width
    return value if width == 32 else builder.trunc(value, I32) if width > 32 else builder.zext(value, I32)


@intrinsic
def word(typingctx, b0, b1, b2):
    """Three bytes → their little-endian uint32 (32-bit ops: Numba would widen to 64 bits)."""
    if not all(isinstance(t, types.Integer) for t in (b0, b1, b2)):
        return None

    def codegen(context, builder, signature, args):
        b0, b1, b2 = (builder.and_(_as_i32(builder, a), I32(255)) for a in args)
        return builder.or_(b0, builder.or_(builder.shl(b1, I32(8)), builder.shl(b2, I32(16))))

    return types.uint32(b0, b1, b2), codegen


@intrinsic
def field(typingctx, value, shift, mask):
    """float32((value >> shift) & mask) in 32-bit integer ops (vectorizes 16 lanes wide)."""
    if not all(isinstance(t, types.Integer) for t in (value, shift, mask)):
        return None

    def codegen(context, builder, signature, args):
        v, s, m = (_as_i32(builder, a) for a in args)
        return builder.uitofp(builder.and_(builder.lshr(v, s), m), ir.FloatType())

    return types.float32(value, shift, mask), codegen


@njit(**SERIAL)
def unit_shape(bits):
    """(U codes, B bytes) per unit of the packed stream."""
    if bits == 2:
        return 4, 1
    if bits == 3:
        return 8, 3
    if bits == 4:
        return 2, 1
    if bits == 5:
        return 8, 5
    if bits == 6:
        return 4, 3
    return 1, 1


@njit(**SERIAL)
def scaled_dot(p, bits, xq, NU, unit_scale, shift):
    """Σ_u unit_scale[u >> shift] · Σ_j code_j(u)·xq[j·NU + u] over the NU units of a packed row p.

    Each (bits, shift) pair gets its own copy of the loop (the helpers are inlined with a constant
    shift): then 2^shift consecutive units share one scale load instead of a gather per lane."""
    if bits == 4:  # shift 4..6 (g = 32..128)
        if shift == 4:
            return _dot4(p, xq, NU, unit_scale, 4)
        if shift == 5:
            return _dot4(p, xq, NU, unit_scale, 5)
        return _dot4(p, xq, NU, unit_scale, 6)
    if bits == 3:  # shift 2..4
        if shift == 2:
            return _dot3(p, xq, NU, unit_scale, 2)
        if shift == 3:
            return _dot3(p, xq, NU, unit_scale, 3)
        return _dot3(p, xq, NU, unit_scale, 4)
    if bits == 2:  # shift 3..5
        if shift == 3:
            return _dot2(p, xq, NU, unit_scale, 3)
        if shift == 4:
            return _dot2(p, xq, NU, unit_scale, 4)
        return _dot2(p, xq, NU, unit_scale, 5)
    if bits == 5:  # shift 2..4
        if shift == 2:
            return _dot5(p, xq, NU, unit_scale, 2)
        if shift == 3:
            return _dot5(p, xq, NU, unit_scale, 3)
        return _dot5(p, xq, NU, unit_scale, 4)
    if bits == 6:  # shift 3..5
        if shift == 3:
            return _dot6(p, xq, NU, unit_scale, 3)
        if shift == 4:
            return _dot6(p, xq, NU, unit_scale, 4)
        return _dot6(p, xq, NU, unit_scale, 5)
    if shift == 5:  # 8 bits: shift 5..7
        return _dot8(p, xq, NU, unit_scale, 5)
    if shift == 6:
        return _dot8(p, xq, NU, unit_scale, 6)
    return _dot8(p, xq, NU, unit_scale, 7)


@njit(inline="always", **SERIAL)
def _dot2(p, xq, NU, unit_scale, shift):
    acc = np.float32(0.0)
    for u in range(NU):
        v = p[u]
        acc += unit_scale[u >> shift] * (field(v, 0, 3) * xq[u] + field(v, 2, 3) * xq[NU + u]
                                         + field(v, 4, 3) * xq[2 * NU + u] + field(v, 6, 3) * xq[3 * NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _dot3(p, xq, NU, unit_scale, shift):
    acc = np.float32(0.0)
    for u in range(NU):
        w = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
        d = np.float32(0.0)
        for j in range(8):
            d += field(w, 3 * j, 7) * xq[j * NU + u]
        acc += unit_scale[u >> shift] * d
    return acc


@njit(inline="always", **SERIAL)
def _dot4(p, xq, NU, unit_scale, shift):
    acc = np.float32(0.0)
    for u in range(NU):
        v = p[u]
        acc += unit_scale[u >> shift] * (field(v, 0, 15) * xq[u] + field(v, 4, 15) * xq[NU + u])
    return acc


@njit(inline="always", **SERIAL)
def _dot5(p, xq, NU, unit_scale, shift):  # a 40-bit unit as a low (bits 0..23) and a high (24..39) word
    acc = np.float32(0.0)
    for u in range(NU):
        lo = word(p[5 * u], p[5 * u + 1], p[5 * u + 2])
        hi = word(p[5 * u + 3], p[5 * u + 4], 0)
        d = np.float32(0.0)
        for j in range(4):  # codes 0..3: bits 0..19
            d += field(lo, 5 * j, 31) * xq[j * NU + u]
        d += (field(lo, 20, 15) + np.float32(16.0) * field(hi, 0, 1)) * xq[4 * NU + u]  # bits 20..24
        for j in range(5, 8):  # codes 5..7: bits 25..39
            d += field(hi, 5 * j - 24, 31) * xq[j * NU + u]
        acc += unit_scale[u >> shift] * d
    return acc


@njit(inline="always", **SERIAL)
def _dot6(p, xq, NU, unit_scale, shift):
    acc = np.float32(0.0)
    for u in range(NU):
        w = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
        d = np.float32(0.0)
        for j in range(4):
            d += field(w, 6 * j, 63) * xq[j * NU + u]
        acc += unit_scale[u >> shift] * d
    return acc


@njit(inline="always", **SERIAL)
def _dot8(p, xq, NU, unit_scale, shift):
    acc = np.float32(0.0)
    for u in range(NU):
        acc += unit_scale[u >> shift] * (field(p[u], 0, 255) * xq[u])
    return acc


@njit(**PARALLEL)
def affine_matmul(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                  row_ptr, cols, values, bias, residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for a packed affine W (see the module doc);
    the rows are cut into n_parts contiguous parts run in parallel (one per thread)."""
    xq, xsum = plane_x(x, bits, group_size, packed.shape[1], scale_codes.shape[1])
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        affine_rows(part * step, min(R, (part + 1) * step), x, packed, scale_codes, scale_meta, zero_codes,
                    zero_meta, bits, group_size, row_ptr, cols, values, bias, residual, y, xq, xsum)


@njit(**SERIAL)
def affine_matmul_serial(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                         row_ptr, cols, values, bias, residual, y, n_parts):
    """affine_matmul on the calling thread (small matrices: no worker wake-ups); n_parts unused."""
    xq, xsum = plane_x(x, bits, group_size, packed.shape[1], scale_codes.shape[1])
    affine_rows(0, packed.shape[0], x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                row_ptr, cols, values, bias, residual, y, xq, xsum)


@njit(**SERIAL)
def plane_x(x, bits, group_size, n_bytes, G):
    """x (T, in) → xq (T, U·NU) in plane order with zeros at padding, and xsum (T, G) = Σx per group."""
    T, n_in = x.shape
    U, B = unit_shape(bits)
    NU = n_bytes // B  # units per row
    xq = np.empty((T, U * NU), np.float32)
    xsum = np.zeros((T, G), np.float32)
    for t in range(T):
        for j in range(U):
            for u in range(NU):
                c = u * U + j
                xq[t, j * NU + u] = x[t, c] if c < n_in else np.float32(0.0)
        for c in range(n_in):
            xsum[t, c // group_size] += x[t, c]
    return xq, xsum


@njit(**SERIAL)
def affine_rows(r0, r1, x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                row_ptr, cols, values, bias, residual, y, xq, xsum):
    """y[:, r0:r1] of affine_matmul, given plane_x's xq and xsum."""
    T = x.shape[0]
    G = scale_codes.shape[1]
    U, B = unit_shape(bits)
    NU = packed.shape[1] // B
    shift = 0  # log2(units per group)
    while (1 << shift) * U < group_size:
        shift += 1
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    scale = np.empty(G, np.float32)  # this row's decoded scales and zeros
    zero = np.empty(G, np.float32)
    for r in range(r0, r1):
        for k in range(G):
            run = (r * G + k) >> META_RUN_SHIFT
            scale[k] = np.float32(scale_codes[r, k]) * scale_meta[run, 0] + scale_meta[run, 1]
            zero[k] = np.float32(zero_codes[r, k]) * zero_meta[run, 0] + zero_meta[run, 1]
        for t in range(T):
            acc = scaled_dot(packed[r], bits, xq[t], NU, scale, shift)
            for k in range(G):
                acc -= scale[k] * zero[k] * xsum[t, k]
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    acc += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                acc += bias[r]
            if has_residual:
                acc += residual[t, r]
            y[t, r] = acc


@njit(**PARALLEL)
def fp16_matmul(x, half_bits, bias, residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for W stored as fp16 bit patterns (uint16)."""
    R = half_bits.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        fp16_rows(part * step, min(R, (part + 1) * step), x, half_bits, bias, residual, y)


@njit(**SERIAL)
def fp16_matmul_serial(x, half_bits, bias, residual, y, n_parts):
    """fp16_matmul on the calling thread; n_parts unused."""
    fp16_rows(0, half_bits.shape[0], x, half_bits, bias, residual, y)


@njit(**SERIAL)
def fp16_rows(r0, r1, x, half_bits, bias, residual, y):
    """y[:, r0:r1] of fp16_matmul."""
    T, n_in = x.shape
    has_bias, has_residual = bias.size > 0, residual.size > 0
    for r in range(r0, r1):
        w = half_bits[r]
        for t in range(T):
            acc = np.float32(0.0)
            for c in range(n_in):
                acc += half_to_float(w[c]) * x[t, c]
            if has_bias:
                acc += bias[r]
            if has_residual:
                acc += residual[t, r]
            y[t, r] = acc


@njit(**SERIAL)
def affine_dequantize(packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size, r0, w):
    """w (R, U·NU) float32 = rows r0 .. r0+R of the packed affine W in the natural column order,
    (code − zero)·scale (SPEC.md §6.1), padding columns included (w[:, :in_features] is W; outliers
    not included): the prefill path's dequantization in one pass (NumPy's takes several)."""
    R = w.shape[0]
    G = scale_codes.shape[1]
    U, B = unit_shape(bits)
    NU = packed.shape[1] // B
    shift = 0  # log2(units per group)
    while (1 << shift) * U < group_size:
        shift += 1
    scale = np.empty(G, np.float32)
    zero = np.empty(G, np.float32)
    for i in range(R):
        r = r0 + i
        for k in range(G):
            run = (r * G + k) >> META_RUN_SHIFT
            scale[k] = np.float32(scale_codes[r, k]) * scale_meta[run, 0] + scale_meta[run, 1]
            zero[k] = np.float32(zero_codes[r, k]) * zero_meta[run, 0] + zero_meta[run, 1]
        p, out = packed[r], w[i]
        if bits == 4:
            for u in range(NU):
                k = u >> shift
                out[2 * u] = (field(p[u], 0, 15) - zero[k]) * scale[k]
                out[2 * u + 1] = (field(p[u], 4, 15) - zero[k]) * scale[k]
        elif bits == 2:
            for u in range(NU):
                k = u >> shift
                for j in range(4):
                    out[4 * u + j] = (field(p[u], 2 * j, 3) - zero[k]) * scale[k]
        elif bits == 8:
            for u in range(NU):
                k = u >> shift
                out[u] = (field(p[u], 0, 255) - zero[k]) * scale[k]
        elif bits == 3 or bits == 6:
            for u in range(NU):
                k = u >> shift
                v = word(p[3 * u], p[3 * u + 1], p[3 * u + 2])
                for j in range(U):
                    out[U * u + j] = (field(v, bits * j, (1 << bits) - 1) - zero[k]) * scale[k]
        else:  # 5 bits: a 40-bit unit as a low (bits 0..23) and a high (24..39) word
            for u in range(NU):
                k = u >> shift
                lo = word(p[5 * u], p[5 * u + 1], p[5 * u + 2])
                hi = word(p[5 * u + 3], p[5 * u + 4], 0)
                for j in range(4):
                    out[8 * u + j] = (field(lo, 5 * j, 31) - zero[k]) * scale[k]
                out[8 * u + 4] = (field(lo, 20, 15) + np.float32(16.0) * field(hi, 0, 1) - zero[k]) * scale[k]
                for j in range(5, 8):
                    out[8 * u + j] = (field(hi, 5 * j - 24, 31) - zero[k]) * scale[k]


def examples():
    """(kernel name, arguments) for every kernel and bit width, typed as the weights call them: warm_up
    compiles them; the ahead-of-time build (cpu_aot_build.py) exports the serial ones for these types."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    for bits in SUPPORTED_BITS:
        G = 2
        packed = readonly(rng.integers(0, 256, (3, G * 32 * bits // 8)).astype(np.uint8))
        codes = readonly(rng.integers(0, 256, (3, G)).astype(np.uint8))
        meta = np.full((1, 2), 0.01, np.float32)
        for name in ("affine_matmul", "affine_matmul_serial"):
            yield name, (x, packed, codes, meta, codes, meta, bits, 32, NO_ROWS, NO_COLS, NO_VALUES, NO_FLOAT,
                         NO_RESIDUAL, np.empty((1, 3), np.float32), 2)
        yield "affine_dequantize", (packed, codes, meta, codes, meta, bits, 32, 1, np.empty((2, G * 32), np.float32))
    half_bits = readonly(rng.standard_normal((3, 40)).astype(np.float16).view(np.uint16))
    for name in ("fp16_matmul", "fp16_matmul_serial"):
        yield name, (x, half_bits, NO_FLOAT, NO_RESIDUAL, np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
