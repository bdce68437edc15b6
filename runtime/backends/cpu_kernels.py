"""Compiled CPU kernels (Numba): lean mode's products, from the packed file bytes or from their tiles.

    affine_matmul(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                  row_ptr, cols, values, bias, residual, y, n_parts)   y = x̂ @ Wᵀ (+ bias) (+ residual)
    affine_matmul_serial(... the same ...)                              on the calling thread only
    tile_x(x, n_blocks), tile_rows_for(...)                             x rounded for the tiles of 16 rows
                                                                       (cpu_tiles.py) and their rows: what the
                                                                       kernel stacks run (cpu_stack_kernels.py)
    fp16_matmul(x, half_bits, bias, residual, y, n_parts)               y = x @ Wᵀ ... for an fp16 matrix
    fp16_matmul_serial(... the same ...)                                on the calling thread only
    affine_dequantize(...)                                              rows of W as float32 (prefill)
    repack(...)                                                         file rows → tiles (cpu_tiles_kernels.py)
    tile_dequantize(...)                                                tiles → rows of W as float32 (lookups)

How a row of an affine matrix is multiplied by affine_matmul (llama.cpp's idea: integer dot products; the
tile kernels of the stacks compute the same sums 16 rows at a time, see cpu_tiles.py). x is first
rounded once per call, per block of BLOCK = 32 columns, to x̂ = (2^LOW_BITS·high + low)·dx with high and
low int8 and one step dx_b per block: ~16-bit precision, or 8 bits where the low part is left zero
($MXQ_ACTIVATIONS=8: ACTIVATION_LOW_PART, cpu_weights.activation_low_part) (quantize_x; the same as
cpu_weights.quantize_activations), laid out in cpu_qdot's order (the packed stream's unit/plane order,
zeros past in_features so padding codes contribute nothing). Per row, the group scales s_k and zeros
z_k are decoded from the file's 8-bit codes (value = code·step + min, one (step, min) per run of 128
values, SPEC.md §6.2); with w = (q − z)·s (SPEC.md §6.1) and x̂_c = x̂q_c·dx_b:
    y[r] = Σ_b s_{k(b)}·dx_b · Σ_{c in block b} q_c·x̂q_c  −  Σ_k s_k·z_k·Σ_{c in group k} x̂_c
The first sum is cpu_qdot.block_dot: uint8 codes × int8 activations summed in int32 lanes (one
vpdpbusd per 64 codes and activation byte on AVX512-VNNI, cpu_qdot.lane_dot), scaled per block in float32; it is compiled
once per (bits, blocks per vector step, blocks per group) — affine_rows_for picks the copy — and adds
the second sum (−s_k·z_k per group times xsum) to the same float32 lanes before its one horizontal sum. Then CSR
outliers (y[r] += Σ v·x̂[c]), bias and residual. Rows are split into n_parts parallel parts (prange);
every packed byte is read from memory once per call (T > 1 tokens re-read a row from L1).
So the decode products are W·x̂, not W·x: |x̂ − x| ≤ max|x_b|/127/2^9 per element (SmolLM2 at 4.25 bpw, every
product of a 16-chunk WikiText-2 evaluation: perplexity within 0.1%, see the README), or max|x_b|/127/2 with 8-bit
activations ($MXQ_ACTIVATIONS=8: +0.05% there).
Integer codes are handled in 32-bit lanes by two tiny LLVM intrinsics (`word`, `field`) in the
dequantization: Numba would widen them to 64 bits and halve the SIMD width.

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
from .cpu_qdot import CORR_PAD, block_dot, field, word
from .cpu_tiles import TILE_ROWS
from .cpu_tiles_kernels import PREFETCH_BYTES, prefetch, repack, tile_dequantize, tile_dot
from .cpu_weights import ACTIVATION_BLOCK as BLOCK
from .cpu_weights import ACTIVATION_LOW_BITS as LOW_BITS
from .cpu_weights import activation_low_part
from .cpu_weights import NO_COLS, NO_FLOAT, NO_MAP, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly  # noqa: F401 - re-exported

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)
# No fastmath: the activations round exactly as the NumPy reference. Said explicitly: a kernel that leaves
# fastmath unset inherits its caller's when a fastmath kernel compiles it first (Numba's CPU target,
# inherit_if_not_set), and x̂ then moved by 1-2 ulps (127/amax as a reciprocal estimate).
EXACT = dict(fastmath=False, cache=True, nogil=True)
META_RUN_SHIFT = 7  # runs of 128 metadata values
ACTIVATION_LOW_PART = activation_low_part()  # x rounded to ~16 bits (high + low int8 parts) or 8 (low zero): cpu_weights


@intrinsic
def half_to_float(typingctx, bits):
    """fp16 bit pattern (uint16) → float32, one hardware conversion (F16C / NEON) once vectorized."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


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


@njit(**PARALLEL)
def affine_matmul(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                  row_ptr, cols, values, bias, residual, y, n_parts):
    """y (T, out) = x (T, in) @ Wᵀ + bias + residual for a packed affine W (see the module doc);
    the rows are cut into n_parts contiguous parts run in parallel (one per thread)."""
    n_blocks = scale_codes.shape[1] * group_size // BLOCK  # 32-column blocks per row
    pair = n_blocks % 2 == 0
    high, low, dx, xsum, x_hat = quantize_x(x, bits, group_size, n_blocks, pair)
    w = (packed, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr, cols, values, bias, residual, y, high, low, dx,
         xsum, x_hat, NO_MAP)
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        affine_rows_for(part * step, min(R, (part + 1) * step), w, bits, group_size, pair)


@njit(**SERIAL)
def affine_matmul_serial(x, packed, scale_codes, scale_meta, zero_codes, zero_meta, bits, group_size,
                         row_ptr, cols, values, bias, residual, y, n_parts):
    """affine_matmul on the calling thread (small matrices: no worker wake-ups); n_parts unused."""
    n_blocks = scale_codes.shape[1] * group_size // BLOCK
    pair = n_blocks % 2 == 0
    high, low, dx, xsum, x_hat = quantize_x(x, bits, group_size, n_blocks, pair)
    w = (packed, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr, cols, values, bias, residual, y, high, low, dx,
         xsum, x_hat, NO_MAP)
    affine_rows_for(0, packed.shape[0], w, bits, group_size, pair)


@njit(**EXACT)
def quantize_x(x, bits, group_size, n_blocks, pair):
    """x (T, in) → its ~16-bit (or 8-bit: ACTIVATION_LOW_PART) form per block of BLOCK columns (cpu_weights.quantize_activations):
    x̂ = (2^LOW_BITS·high + low)·dx with high, low int8 (T, n_blocks·BLOCK) in cpu_qdot's order with 32-column
    blocks, two per SIMD vector if pair (zeros at padding); dx (T, n_blocks) the blocks' steps; xsum (T, G
    padded: padded_groups) = Σ x̂ per weight group; and x_hat (T, in) in the natural order (for the outliers)."""
    q, dx, x_hat = round_x(x, n_blocks)
    high, low, xsum = layout_x(q, dx, bits, group_size, n_blocks, pair)
    return high, low, dx, xsum, x_hat


@njit(**EXACT)
def round_x(x, n_blocks):
    """The rounding of quantize_x, in the natural column order: q int32 (T, n_blocks·BLOCK) = 2^LOW_BITS·high
    + low, dx (T, n_blocks) and x_hat (T, in) = q·dx (blocks past in_features: zero)."""
    T, n_in = x.shape
    q = np.zeros((T, n_blocks * BLOCK), np.int32)
    dx = np.zeros((T, n_blocks), np.float32)
    x_hat = np.zeros((T, n_in), np.float32)
    fine = np.float32(1 << LOW_BITS)
    for t in range(T):
        for b in range(n_blocks):
            c0, c1 = b * BLOCK, min(n_in, (b + 1) * BLOCK)
            amax = np.float32(0.0)
            for c in range(c0, c1):
                amax = max(amax, abs(x[t, c]))
            if amax == 0.0:
                continue
            inv = np.float32(np.float32(127.0) / amax)  # float32 throughout, as the NumPy reference
            step = np.float32(amax / np.float32(127.0) / fine)
            for c in range(c0, c1):
                v = np.float32(x[t, c] * inv)
                h = min(127.0, max(-127.0, np.rint(v)))
                lo = 0.0  # 8-bit activations: no low part
                if ACTIVATION_LOW_PART:
                    lo = min(127.0, max(-127.0, np.rint(np.float32((v - np.float32(h)) * fine))))
                q[t, c] = int(h) * (1 << LOW_BITS) + int(lo)
                x_hat[t, c] = np.float32(q[t, c]) * step
            dx[t, b] = step
    return q, dx, x_hat


@njit(**EXACT)
def layout_x(q, dx, bits, group_size, n_blocks, pair):
    """round_x's first n_blocks blocks as one weight layout wants them: high, low int8 (T, n_blocks·BLOCK)
    in cpu_qdot's order for `bits` (two blocks per SIMD vector if pair) and xsum (T, padded_groups(G)) = Σ x̂ per
    group (zeros past G).
    (Loops over the order's structure — vector, code plane, unit — instead of dividing column numbers.)"""
    T = q.shape[0]
    U, B = unit_shape(bits)
    M = (BLOCK // U) * (2 if pair else 1)  # units per SIMD vector
    high = np.empty((T, n_blocks * BLOCK), np.int8)
    low = np.empty((T, n_blocks * BLOCK), np.int8)
    xsum = np.zeros((T, padded_groups(n_blocks * BLOCK // group_size)), np.float32)  # zeros past G
    for t in range(T):
        for v in range(n_blocks * BLOCK // (U * M)):
            for j in range(U):  # code plane j: code j of units v·M .. v·M + M − 1
                for i in range(M):
                    c = (v * M + i) * U + j
                    h = (q[t, c] + (1 << (LOW_BITS - 1))) >> LOW_BITS  # low in −127 .. 127 < 2^(LOW_BITS−1)
                    high[t, v * U * M + j * M + i], low[t, v * U * M + j * M + i] = h, q[t, c] - h * (1 << LOW_BITS)
        for b in range(n_blocks):
            total = 0
            for c in range(b * BLOCK, (b + 1) * BLOCK):
                total += q[t, c]
            xsum[t, b * BLOCK // group_size] += np.float32(total) * dx[t, b]
    return high, low, xsum


@njit(**SERIAL)
def padded_groups(G):
    """G rounded up to a whole number of cpu_qdot.CORR_PAD (the zero-point arrays block_dot sums)."""
    return -(-G // CORR_PAD) * CORR_PAD


@njit(**SERIAL)
def affine_rows_for(r0, r1, w, bits, group_size, pair):
    """affine_rows with (bits, units per activation block, blocks per vector step: 2 if pair else 1,
    blocks per weight group) as constants: each combination is its own compiled loop (Numba types the
    constant arguments as literals)."""
    if not pair:
        if bits == 2:
            affine_rows(r0, r1, w, 2, 8, 1, 1)
        elif bits == 3:
            affine_rows(r0, r1, w, 3, 4, 1, 1)
        elif bits == 4:
            affine_rows(r0, r1, w, 4, 16, 1, 1)
        elif bits == 5:
            affine_rows(r0, r1, w, 5, 4, 1, 1)
        elif bits == 6:
            affine_rows(r0, r1, w, 6, 8, 1, 1)
        else:
            affine_rows(r0, r1, w, 8, 32, 1, 1)
    elif group_size == 32:
        if bits == 2:
            affine_rows(r0, r1, w, 2, 8, 2, 1)
        elif bits == 3:
            affine_rows(r0, r1, w, 3, 4, 2, 1)
        elif bits == 4:
            affine_rows(r0, r1, w, 4, 16, 2, 1)
        elif bits == 5:
            affine_rows(r0, r1, w, 5, 4, 2, 1)
        elif bits == 6:
            affine_rows(r0, r1, w, 6, 8, 2, 1)
        else:
            affine_rows(r0, r1, w, 8, 32, 2, 1)
    elif group_size == 64:
        if bits == 2:
            affine_rows(r0, r1, w, 2, 8, 2, 2)
        elif bits == 3:
            affine_rows(r0, r1, w, 3, 4, 2, 2)
        elif bits == 4:
            affine_rows(r0, r1, w, 4, 16, 2, 2)
        elif bits == 5:
            affine_rows(r0, r1, w, 5, 4, 2, 2)
        elif bits == 6:
            affine_rows(r0, r1, w, 6, 8, 2, 2)
        else:
            affine_rows(r0, r1, w, 8, 32, 2, 2)
    else:  # group_size 128
        if bits == 2:
            affine_rows(r0, r1, w, 2, 8, 2, 4)
        elif bits == 3:
            affine_rows(r0, r1, w, 3, 4, 2, 4)
        elif bits == 4:
            affine_rows(r0, r1, w, 4, 16, 2, 4)
        elif bits == 5:
            affine_rows(r0, r1, w, 5, 4, 2, 4)
        elif bits == 6:
            affine_rows(r0, r1, w, 6, 8, 2, 4)
        else:
            affine_rows(r0, r1, w, 8, 32, 2, 4)


@njit(**SERIAL)
def affine_rows(r0, r1, w, bits, units_per_block, blocks_per_vector, blocks_per_group):
    """y[:, r0:r1] of affine_matmul; w = (packed, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr,
    cols, values, bias, residual, y, quantize_x's high, low, dx, xsum, x_hat, and out_rows: row r's column of
    y, bias and residual — out_rows[r], or r itself when out_rows is empty); the last four: constants
    (cpu_qdot.block_dot's)."""
    packed, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum, \
        x_hat, out_rows = w
    T, n_blocks = dx.shape
    G = scale_codes.shape[1]
    n_vectors = n_blocks // blocks_per_vector
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    mapped = out_rows.size > 0
    scale = np.empty(G, np.float32)  # this row's decoded scales
    zero_term = np.zeros(padded_groups(G), np.float32)  # −scale·zero per group (zeros past G, as xsum)
    for r in range(r0, r1):
        run = (r * G) >> META_RUN_SHIFT
        if run == (r * G + G - 1) >> META_RUN_SHIFT:  # the row's values lie in one metadata run (most rows)
            s_step, s_min, z_step, z_min = scale_meta[run, 0], scale_meta[run, 1], zero_meta[run, 0], zero_meta[run, 1]
            for k in range(G):
                scale[k] = np.float32(scale_codes[r, k]) * s_step + s_min
                zero_term[k] = -scale[k] * (np.float32(zero_codes[r, k]) * z_step + z_min)
        else:
            for k in range(G):
                run = (r * G + k) >> META_RUN_SHIFT
                scale[k] = np.float32(scale_codes[r, k]) * scale_meta[run, 0] + scale_meta[run, 1]
                zero_term[k] = -scale[k] * (np.float32(zero_codes[r, k]) * zero_meta[run, 0] + zero_meta[run, 1])
        for t in range(T):  # Σ_b s·dx·Σ q·x̂q − Σ_k s_k·z_k·xsum_k in one pass (cpu_qdot.block_dot)
            acc = block_dot(packed[r], high[t], low[t], dx[t], scale, n_vectors, zero_term, xsum[t], zero_term.size,
                            bits, units_per_block, blocks_per_vector, blocks_per_group)
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    acc += half_to_float(values[i]) * x_hat[t, cols[i]]
            o = out_rows[r] if mapped else r
            if has_bias:
                acc += bias[o]
            if has_residual:
                acc += residual[t, o]
            y[t, o] = acc


@intrinsic
def pointer(typingctx, address):
    """An integer address → void* (for numba.carray: the arrays a stack table points to)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(address), codegen


@njit(**SERIAL)
def block_amax(x, t, c0, c1):
    """max |x[t, c0:c1]| (a max is exact in any order: fastmath lets it vectorize)."""
    amax = np.float32(0.0)
    for c in range(c0, c1):
        amax = max(amax, abs(x[t, c]))
    return amax


@njit(**EXACT)
def tile_x(x, n_blocks):
    """x (T, in) → what the tile kernels take, in one pass: high, low int8 (T, n_blocks·BLOCK) in the natural
    column order, dx (T, n_blocks) and xsum (T, n_blocks) = Σ x̂ per block, and x_hat (T, in): the rounding of
    round_x (x̂ = (2^LOW_BITS·high + low)·dx, the same numbers), without its int32 intermediate."""
    T, n_in = x.shape
    high = np.zeros((T, n_blocks * BLOCK), np.int8)
    low = np.zeros((T, n_blocks * BLOCK), np.int8)
    dx = np.zeros((T, n_blocks), np.float32)
    xsum = np.zeros((T, n_blocks), np.float32)
    x_hat = np.zeros((T, n_in), np.float32)
    fine = np.float32(1 << LOW_BITS)
    for t in range(T):
        for b in range(n_blocks):
            c0, c1 = b * BLOCK, min(n_in, (b + 1) * BLOCK)
            amax = block_amax(x, t, c0, c1) if c0 < c1 else np.float32(0.0)
            if amax == 0.0:
                continue
            inv = np.float32(np.float32(127.0) / amax)  # float32 throughout, as the NumPy reference
            step = np.float32(amax / np.float32(127.0) / fine)
            total = np.float32(0.0)  # Σ q: integers below 2^24, exact in float32
            for c in range(c0, c1):  # float32 ops only (exact on these integers): the loop vectorizes
                v = np.float32(x[t, c] * inv)
                h = np.float32(min(127.0, max(-127.0, np.rint(v))))
                lo = np.float32(0.0)  # 8-bit activations: no low part
                if ACTIVATION_LOW_PART:
                    lo = np.float32(min(127.0, max(-127.0, np.rint(np.float32((v - h) * fine)))))
                q = h * fine + lo
                x_hat[t, c] = q * step
                total += q
                high[t, c], low[t, c] = np.int8(h), np.int8(lo)
            dx[t, b] = step
            xsum[t, b] = total * step
    return high, low, dx, xsum, x_hat


@njit(**SERIAL)
def tile_rows_for(t0, t1, w, bits, group_size):
    """tile_rows with (bits, blocks per group) as constants: each combination its own compiled loop."""
    if group_size == 32:
        if bits == 2:
            tile_rows(t0, t1, w, 2, 1)
        elif bits == 3:
            tile_rows(t0, t1, w, 3, 1)
        elif bits == 4:
            tile_rows(t0, t1, w, 4, 1)
        elif bits == 5:
            tile_rows(t0, t1, w, 5, 1)
        elif bits == 6:
            tile_rows(t0, t1, w, 6, 1)
        else:
            tile_rows(t0, t1, w, 8, 1)
    elif group_size == 64:
        if bits == 2:
            tile_rows(t0, t1, w, 2, 2)
        elif bits == 3:
            tile_rows(t0, t1, w, 3, 2)
        elif bits == 4:
            tile_rows(t0, t1, w, 4, 2)
        elif bits == 5:
            tile_rows(t0, t1, w, 5, 2)
        elif bits == 6:
            tile_rows(t0, t1, w, 6, 2)
        else:
            tile_rows(t0, t1, w, 8, 2)
    else:  # group_size 128
        if bits == 2:
            tile_rows(t0, t1, w, 2, 4)
        elif bits == 3:
            tile_rows(t0, t1, w, 3, 4)
        elif bits == 4:
            tile_rows(t0, t1, w, 4, 4)
        elif bits == 5:
            tile_rows(t0, t1, w, 5, 4)
        elif bits == 6:
            tile_rows(t0, t1, w, 6, 4)
        else:
            tile_rows(t0, t1, w, 8, 4)


@njit(**SERIAL)
def tile_rows(t0, t1, w, bits, blocks_per_group):
    """Tiles t0 .. t1-1 of one affine matrix; w = (codes, scale_tiles, zero_tiles, meta (cpu_tiles.py), row_ptr,
    cols, values, bias, residual, y, tile_x's high, low, dx, xsum, x_hat, out_rows: row r's column of y, bias and
    residual — out_rows[r], or r itself when out_rows is empty — and the matrix's row count)."""
    codes, scale_tiles, zero_tiles, meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum, x_hat, \
        out_rows, R = w
    T = dx.shape[0]
    G = scale_tiles.shape[1] // TILE_ROWS
    last_run = meta.shape[0] // 4 - 1
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    mapped = out_rows.size > 0
    out = np.empty(TILE_ROWS, np.float32)
    for tile in range(t0, t1):
        r0 = tile * TILE_ROWS
        for t in range(T):
            tile_dot(codes[tile], scale_tiles[tile], zero_tiles[tile], meta, high[t], low[t], dx[t], xsum[t], out, G, r0,
                     last_run, bits, blocks_per_group)
            for lane in range(min(TILE_ROWS, R - r0)):
                r = r0 + lane
                acc = out[lane]
                if has_outliers:
                    for i in range(row_ptr[r], row_ptr[r + 1]):
                        acc += half_to_float(values[i]) * x_hat[t, cols[i]]
                o = out_rows[r] if mapped else r
                if has_bias:
                    acc += bias[o]
                if has_residual:
                    acc += residual[t, o]
                y[t, o] = acc


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
    """y[:, r0:r1] of fp16_matmul; each row's lines asked for PREFETCH_BYTES ahead (as tile_dot's codes)."""
    T, n_in = x.shape
    has_bias, has_residual = bias.size > 0, residual.size > 0
    row_bytes = 2 * n_in
    for r in range(r0, r1):
        ahead = half_bits.ctypes.data + r * row_bytes + PREFETCH_BYTES
        for offset in range(0, row_bytes, 64):
            prefetch(ahead + offset)
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
        if bits == 4:
            tiles = np.zeros((1, G * 64 * bits), np.uint8)
            yield "repack", (packed, codes, codes, bits, tiles, np.zeros((1, G * 16), np.uint8), np.zeros((1, G * 16), np.uint8))
            lanes = np.zeros((1, G * 16), np.uint8)  # the types cpu_tiles.build makes: writable arrays
            yield "tile_dequantize", (tiles, lanes, lanes, np.zeros(4, np.float32), np.arange(2, dtype=np.int64), bits, 32,
                                      np.empty((2, G * 32), np.float32))
    half_bits = readonly(rng.standard_normal((3, 40)).astype(np.float16).view(np.uint16))
    for name in ("fp16_matmul", "fp16_matmul_serial"):
        yield name, (x, half_bits, NO_FLOAT, NO_RESIDUAL, np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
