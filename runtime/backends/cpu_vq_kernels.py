"""Compiled CPU kernels (Numba) for the `vq` scheme: y = x @ Wᵀ straight from the packed file bytes.

    vq_matmul(x, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size,
              row_ptr, cols, values, bias, residual, y, n_parts)
    vq_matmul_serial(... the same ...)   on the calling thread only (small matrices, the ahead-of-time build)
    vq_grid_matmul(x, packed, book, index_bits, grid_step, scale_codes, scale_meta, group_size,
                   row_ptr, cols, values, bias, residual, y, n_parts)
    vq_grid_matmul_serial(... the same ...)   a 4-D codebook on the 8-bit grid (SPEC.md §12.5): integer dot
                                              products (grid_rows; cpu_team_kernels runs it on decode's team)

A row of W is ceil(in / dim) vectors of `dim` inputs; vector j holds a k-bit index (k = index_bits = dim·bits:
4, 6, 8, or 12 with a file's shared codebook) into the matrix's codebook of 2^k points, and every group_size inputs
share a scale (SPEC.md §12):
    W[r, c] = scale[r, c div g] · codebook[index[r, c div dim], c mod dim]
Dim 2 (k = 4, 6, 8; `vq_rows`): the packed indices repeat every B bytes (a "unit") holding U indices, as in
cpu_lut_kernels.py (k = 4: 2 per byte, 6: 4 per 3 bytes, 8: 1 per byte); a unit's U·dim inputs lie in one group
(g is a multiple of U·dim). x is first rearranged into planes, one per (index position j in a unit, coordinate i):
    xq[(j·dim + i)·NU + u] = x[(u·U + j)·dim + i]           (zeros past in_features: padding adds 0)
Per row, the G scales are decoded from their codes (scale = code·step + min, one fp32 (step, min) per run of 128
scales, SPEC.md §6.2) and spread to one per unit (`unit_scales`: su, zero past the last group), then
    y[r] = Σ_u su[u] · Σ_j Σ_i codebook[i, index_j(u)] · xq[(j·dim + i)·NU + u]
in one loop over the row's units per k (`row_dot`): a unit read as one byte or a 24-bit word, each index cut out
with a constant shift and mask, and ONE codebook lookup per dim weights (`codebook` is float32 (dim, 2^k), its
coordinate planes: dim gathers of one index); LLVM vectorizes the loop. Then CSR outliers, bias, residual. Every
packed byte is read once per call and token.

A row's packed bytes (packed.shape[1]) hold its ceil(in / dim) indices padded to whole uint32 words (format 1.8:
a multiple of packing.word_unit(k) indices, so its last pack of 32 may be partial) or to whole packs of 32 (files
of format ≤ 1.7, SPEC.md §12.1): the kernels take either width and never read past a row's bytes. For dim 2 both
are whole units (a word holds whole units; 6 bits: 3 words hold 16 indices, 4 units), so the unit loops take any
row as it is. Whatever the padding slots hold, they meet xq's zeros past in_features: they add nothing (for
finite codebook points).

Dim 4 (k = 8, or 12 with a shared codebook of 4096 points; `points_rows`): `codebook` is the fp16 codebook's own
bytes typed float32 (2^k, 2) — a point's 4 coordinates are one 64-bit word, and a 12-bit codebook's 32 KiB stay in
L1 where float32 planes (64 KiB) would not — and xq is x in its own order (zeros past in_features, up to whole
packs). Per row, the G scales are decoded into su (`row_scales`), then a pack at a time (32 indices, 128 inputs,
in 32 bytes for k = 8, 48 for k = 12; `points_dot`, LLVM vector IR): the 32 indices its bytes zero-extended (8
bits) or cut from 16-bit windows of them (12 bits), the 32 points gathered as 64-bit words (x86: 4 vpgatherdq) and
widened to 128 float32 weights already in input order, scaled by their groups' scales, and multiplied by each
token's 128 inputs: the gathers, the cost, are made once per row for all tokens. The whole packs are read with a
prefetch PREFETCH_BYTES ahead (`_prefetch`): streaming a row from memory, the hardware prefetchers alone fell behind
(same-run A/B, one thread, one token, the caches flushed before each call: 4096×4096 1.43x faster at 8 bits, 1.07x at
12; 576×1536 and 1536×576 1.05-1.11x; with warm caches, and for 4 tokens, 1.0x). A word-padded row's partial last
pack (8 bits: 4 … 28 indices in 1 … 7 words; 12 bits: 8, 16 or 24 in 3, 6 or 9 words) is done after its whole
packs as one more pack: its words read by a masked load (zeros past them: nothing past the row's end is read),
only its own indices' points gathered (the others: zero weights), against xq's zeros past in_features; SmolLM2's
576-input rows at 12 bits (4 packs and 16 indices) take 0.97-1.0x the time of their 1.7 form (5 whole packs).
12 bits, 4096×4096, one thread of a 2-core AVX-512 Xeon, one token, in one process: 1.64 ms, against 3.92 ms for
the planar loop above with float32 planes (4 gathers of 32 bits per index), 2.87 ms for it with 64-bit gathers of
float32 points (2 per index), 3.87 ms with one 64-bit gather of the fp16 point and a conversion per coordinate
(those three: the inner loop alone, without decoding scales). 8 bits (v2d4g64, rows of format 1.8) against the
planar loop with float32 planes it replaced, one thread, µs and × the b4g64 tile kernel's time in the same run
(`tools/bench_vq.py --shapes 576x1536,1536x576,4096x4096 --tokens 1,4 --threads 1,2`, two runs of each, the CPU
shared with another job): one token, 576×1536 167-172 → 72-74 (7.1-7.3x → 3.1-3.2x), 1536×576 184-187 → 93-94
(8.6-8.8x → 4.6x), 4096×4096 2890-3140 → 1330-1340 (4.4-4.8x → 1.8-1.9x); 4 tokens, 576×1536 543-544 → 137-143
(7.3-7.6x → 2.0x), 1536×576 587-605 → 163-167 (8.3-8.4x → 2.4-2.6x), 4096×4096 9820-9940 → 3640-3644 (7.5-8.4x →
2.8x).
"""
from __future__ import annotations

import itertools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...format_spec.layout import VQ_BITS, VQ_DIMS, VQ_SHARED_INDEX_BITS
from ...format_spec.packing import word_unit
from .cpu_kernels import half_to_float, padded_groups, quantize_x, unit_shape
from .cpu_lut_kernels import code
from .cpu_qdot import _as_i32, _indices, _splat, block_dot, literal_codegen, word
from .cpu_weights import ACTIVATION_BLOCK as BLOCK
from .cpu_weights import NO_COLS, NO_FLOAT, NO_MAP, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly

PARALLEL = dict(parallel=True, fastmath=True, cache=True, nogil=True)
SERIAL = dict(fastmath=True, cache=True, nogil=True)
META_RUN_SHIFT = 7  # runs of 128 scales share one (step, min)
PACK_INDICES, PACK_INPUTS = 32, 128  # points_dot's pack: 32 indices of 4-D points (§5.1: k words) cover 128 inputs


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
    """x (T, in) → xq (T, U·dim·NU) in plane order (module doc), zeros at padding, for rows of n_bytes; dim 4:
    (T, 128·ceil(n_bytes / pack_bytes)) in x's own order (points_dot multiplies whole packs of points, a partial
    last pack padded)."""
    T, n_in = x.shape
    if dim == 4:
        xq = np.empty((T, max(n_in, -(-n_bytes // pack_bytes(index_bits)) * PACK_INPUTS)), np.float32)
        xq[:, :n_in] = x
        xq[:, n_in:] = 0.0
        return xq
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
def pack_bytes(index_bits):
    """Bytes of points_dot's pack of 32 indices: 32 (8 bits), 48 (12 bits)."""
    return PACK_INDICES * index_bits // 8


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
    """vq_rows (dim 2) or points_rows (dim 4) with (index bits, dim) as constants: its own compiled copy per kind (a
    runtime choice of the inner loop inside the row loop made the loop 1.6x slower, measured)."""
    if index_bits == 4:
        vq_rows(r0, r1, x, xq, packed, codebook, 4, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    elif index_bits == 6:
        vq_rows(r0, r1, x, xq, packed, codebook, 6, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    elif index_bits == 12:
        points_rows(r0, r1, x, xq, packed, codebook, 12, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                    bias, residual, y)
    elif dim == 2:
        vq_rows(r0, r1, x, xq, packed, codebook, 8, 2, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                bias, residual, y)
    else:
        points_rows(r0, r1, x, xq, packed, codebook, 8, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                    bias, residual, y)


@njit(inline="always", **SERIAL)
def vq_rows(r0, r1, x, xq, packed, codebook, index_bits, dim, scale_codes, scale_meta, group_size, row_ptr, cols,
            values, bias, residual, y):
    """y[:, r0:r1] of vq_matmul for dim 2, given plane_x's xq."""
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
            value = row_dot(p, index_bits, codebook, su, xq[t], NU)
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    value += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                value += bias[r]
            if has_residual:
                value += residual[t, r]
            y[t, r] = value


@njit(**SERIAL)
def row_dot(p, index_bits, codebook, su, xq, NU):
    """Σ_u su[u] · (unit u's dot product) over one packed row of 2-D points: one loop per index bits with every
    index's shift a constant, so that LLVM vectorizes the loads, shifts and codebook lookups."""
    if index_bits == 4:
        return _vq4d2(p, codebook[0], codebook[1], su, xq, NU)
    if index_bits == 6:
        return _vq6d2(p, codebook[0], codebook[1], su, xq, NU)
    return _vq8d2(p, codebook[0], codebook[1], su, xq, NU)


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


# -- dim 4 (8-bit and 12-bit indices): one pack of 32 points at a time in LLVM vector IR --------------------------
PREFETCH_BYTES = 1024  # points_dot's prefetch distance: packed bytes ahead of the pack it reads
LANES = 16  # float32 lanes of points_dot's sums per token
I1, I8, I16, I32, I64 = (ir.IntType(bits) for bits in (1, 8, 16, 32, 64))
F16, F32 = ir.HalfType(), ir.FloatType()
FAST = ("fast",)


@njit(inline="always", **SERIAL)
def points_rows(r0, r1, x, xq, packed, codebook, index_bits, scale_codes, scale_meta, group_size, row_ptr, cols,
                values, bias, residual, y):
    """y[:, r0:r1] of vq_matmul for dim 4 (index_bits 8 or 12, a constant), given plane_x's xq (x's own order): per
    row, each pack's points gathered and scaled once and multiplied by every token (points_dot; module doc). A row
    of n_bytes (whole words): n_packs whole packs of B = pack_bytes bytes, then tail_words = (n_bytes − B·n_packs)
    / 4 words of a partial last pack (format 1.8; none when rows are whole packs)."""
    T = x.shape[0]
    n_bytes = packed.shape[1]
    B = pack_bytes(index_bits)
    n_packs = n_bytes // B
    tail_words = (n_bytes - n_packs * B) // 4
    per_pack = PACK_INPUTS // group_size  # groups per pack: 4, 2 or 1
    su = np.zeros(max(per_pack * -(-n_bytes // B), scale_codes.shape[1]), np.float32)  # (≥ G,) zero padded
    sums = np.empty((T, LANES), np.float32)
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    for r in range(r0, r1):
        row_scales(r, scale_codes, scale_meta, su)
        if per_pack == 4:  # (the scales' spread over a pack's lanes: a constant of points_dot)
            points_dot(packed[r], codebook, su, xq, sums, n_packs, tail_words, index_bits, 4)
        elif per_pack == 2:
            points_dot(packed[r], codebook, su, xq, sums, n_packs, tail_words, index_bits, 2)
        else:
            points_dot(packed[r], codebook, su, xq, sums, n_packs, tail_words, index_bits, 1)
        for t in range(T):  # (as vq_rows: written out, a helper's array arguments cost 1.13x in reference counts)
            value = sums[t, 0]
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    value += half_to_float(values[i]) * x[t, cols[i]]
            if has_bias:
                value += bias[r]
            if has_residual:
                value += residual[t, r]
            y[t, r] = value


@njit(inline="always", **SERIAL)
def row_scales(r, scale_codes, scale_meta, su):
    """su[:G] = row r's G decoded scales (code·step + min), one vectorized loop per run of 128 scales over 1-D views
    (indexing the 2-D codes from a run's first scale kept LLVM from vectorizing it: 4x slower, measured)."""
    G = scale_codes.shape[1]
    codes = scale_codes[r]
    first = r * G  # the row's first scale in the runs' row-major order
    k = 0
    while k < G:
        run = (first + k) >> META_RUN_SHIFT
        n = min(G, ((run + 1) << META_RUN_SHIFT) - first) - k
        step, low = scale_meta[run, 0], scale_meta[run, 1]
        part_codes, part = codes[k:k + n], su[k:k + n]
        for j in range(n):
            part[j] = np.float32(part_codes[j]) * step + low
        k += n


def _pack_indices(builder, raw, index_bits: int):
    """raw <4k x i8>, a pack of k-bit indices → its 32 indices <32 x i16>: 8 bits, its bytes; 12 bits, index j is
    bits 12j … 12j + 11 of the pack's bit string, the 16-bit little-endian window at byte 12j div 8 (one byte
    shuffle) shifted right by 12j mod 8 (0 or 4)."""
    if index_bits == 8:
        return builder.zext(raw, ir.VectorType(I16, PACK_INDICES))
    order, shifts = [], []
    for j in range(PACK_INDICES):
        byte, shift = divmod(12 * j, 8)
        order += [byte, byte + 1]
        shifts.append(shift)
    windows = builder.bitcast(builder.shuffle_vector(raw, raw, _indices(order)), ir.VectorType(I16, len(shifts)))
    return builder.and_(builder.lshr(windows, ir.Constant(windows.type, shifts)), _splat(windows.type, 4095))


def _lanes_below(builder, n, count: int):
    """<count x i1>: lane j on when j < n (an integer value, < 2^31)."""
    first = builder.insert_element(ir.Constant(ir.VectorType(I32, count), ir.Undefined), _as_i32(builder, n), I32(0))
    return builder.icmp_unsigned("<", _indices(range(count)), builder.shuffle_vector(first, first,
                                                                                      _indices([0] * count)))


def _tail_bytes(builder, start, n_words, n_bytes: int):
    """The first n_words (< n_bytes / 4) words of a row's partial last pack of n_bytes at `start` (i8*) →
    <n_bytes x i8>, zeros past them: a masked load, which touches no byte past the row (x86: vpmaskmovd or a masked
    vmovdqu32)."""
    vector = ir.VectorType(I32, n_bytes // 4)
    mask = _lanes_below(builder, n_words, vector.count)
    load = cgutils.get_or_insert_function(  # typed-pointer mangling, as in _gather_points
        builder.module, ir.FunctionType(vector, [vector.as_pointer(), I32, mask.type, vector]),
        f"llvm.masked.load.v{vector.count}i32.p0v{vector.count}i32")
    words = builder.call(load, [builder.bitcast(start, vector.as_pointer()), I32(1), mask, ir.Constant(vector, 0)])
    return builder.bitcast(words, ir.VectorType(I8, n_bytes))


def _prefetch(builder, address):
    """A hint to bring the cache line at `address` (i8*) into the caches (x86: prefetcht0): it never faults and
    reads no value, so it may name an address past the matrix. Streaming a row's packs from memory, the hardware
    prefetchers alone fell behind the gathers (module doc)."""
    prefetch = cgutils.get_or_insert_function(  # (address, 0: read, 3: keep in every level, 1: data)
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8")
    builder.call(prefetch, [address, I32(0), I32(3), I32(1)])


def _gather_points(builder, book, indices, mask):
    """The fp16 points book[indices] (book: i64*, a point's 4 coordinates in one 64-bit word; indices <32 x i16>)
    → <128 x float>: coordinate i of point j at lane 4j + i, i.e. the pack's 128 weights in input order (unscaled);
    the points of lanes off in `mask` (<32 x i1>) are not read: zeros. One 64-bit gather per point (x86:
    vpgatherdq, 8 points at a time) and one conversion per 16 weights."""
    n = indices.type.count
    # getelementptr i64, i64* book, <n x i32> indices → <n x i64*> (llvmlite infers a scalar pointer: set the type;
    # 32-bit offsets from one base, which LLVM's x86 gathers take as such: 1.1x faster than 64-bit addresses)
    pointers = ir.GEPInstr(builder.block, book, [builder.zext(indices, ir.VectorType(I32, n))], True, "points",
                           source_etype=I64)
    pointers.type = ir.VectorType(I64.as_pointer(), n)
    builder._insert(pointers)
    words = ir.VectorType(I64, n)
    gather = cgutils.get_or_insert_function(  # typed-pointer mangling: LLVM ≥ 15 remangles it for opaque pointers
        builder.module, ir.FunctionType(words, [pointers.type, I32, mask.type, words]),
        f"llvm.masked.gather.v{n}i64.v{n}p0i64")
    points = builder.call(gather, [pointers, I32(2), mask, ir.Constant(words, 0)])
    halves = builder.bitcast(builder.bitcast(points, ir.VectorType(I16, 4 * n)), ir.VectorType(F16, 4 * n))
    return builder.fpext(halves, ir.VectorType(F32, 4 * n))  # (alignment 2 above: the fp16 blob's)


def _lane_sums(builder, v):
    """<N x float> → <LANES x float>: halves added until LANES lanes remain."""
    while v.type.count > LANES:
        n = v.type.count // 2
        v = builder.fadd(builder.shuffle_vector(v, v, _indices(range(n))),
                         builder.shuffle_vector(v, v, _indices(range(n, 2 * n))), flags=FAST)
    return v


def _make_points_dot(index_bits: int, per_pack: int):
    n_bytes = pack_bytes.py_func(index_bits)  # a pack's

    def codegen(context, builder, signature, args):
        p, book, su, xq, sums = (context.make_array(t)(context, builder, a)
                                 for t, a in zip(signature.args[:5], args[:5]))
        n_packs, tail_words = args[5], args[6]
        T, width = cgutils.unpack_tuple(builder, xq.shape, 2)
        VF, VS, VA = ir.VectorType(F32, PACK_INPUTS), ir.VectorType(F32, per_pack), ir.VectorType(F32, LANES)
        book_words = builder.bitcast(book.data, I64.as_pointer())
        every_point = ir.Constant(ir.VectorType(I1, PACK_INDICES), [1] * PACK_INDICES)

        def pack_weights(k, raw, points):  # (128,) pack k's weights from its bytes raw <n_bytes x i8>: the points on
            # in `points` (<32 x i1>; off: 0), each scaled by its group's scale
            scale = builder.load(builder.bitcast(builder.gep(su.data, [builder.mul(k, k.type(per_pack))]),
                                                 VS.as_pointer()), align=4)
            scales = builder.shuffle_vector(scale, scale, _indices(
                [lane * per_pack // PACK_INPUTS for lane in range(PACK_INPUTS)]))
            indices = _pack_indices(builder, raw, index_bits)
            return builder.fmul(_gather_points(builder, book_words, indices, points), scales, flags=FAST)

        def each_pack(body):  # body(k, pack k's weights) for the whole packs, then the partial last one if any
            with cgutils.for_range(builder, n_packs) as loop:
                start = builder.gep(p.data, [builder.mul(loop.index, loop.index.type(n_bytes))])
                raw = builder.load(builder.bitcast(start, ir.VectorType(I8, n_bytes).as_pointer()), align=1)
                _prefetch(builder, builder.gep(start, [I32(PREFETCH_BYTES)]))
                body(loop.index, pack_weights(loop.index, raw, every_point))
            with builder.if_then(builder.icmp_signed("!=", tail_words, tail_words.type(0))):
                start = builder.gep(p.data, [builder.mul(n_packs, n_packs.type(n_bytes))])
                # the indices its words hold whole: 32·tail_words / k
                n_points = builder.udiv(builder.mul(tail_words, tail_words.type(32)), tail_words.type(index_bits))
                body(n_packs, pack_weights(n_packs, _tail_bytes(builder, start, tail_words, n_bytes),
                                           _lanes_below(builder, n_points, PACK_INDICES)))

        def add(k, weights, t, total):  # total += Σ weights · xq[t, pack k's columns], folded to LANES lanes
            column = builder.add(builder.mul(t, width), builder.mul(k, k.type(PACK_INPUTS)))
            inputs = builder.load(builder.bitcast(builder.gep(xq.data, [column]), VF.as_pointer()), align=4)
            part = _lane_sums(builder, builder.fmul(weights, inputs, flags=FAST))
            builder.store(builder.fadd(builder.load(total, align=4), part, flags=FAST), total, align=4)

        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32, VA]),
                                                f"llvm.vector.reduce.fadd.v{LANES}f32")
        lanes = builder.bitcast(sums.data, VA.as_pointer())  # (T,) vectors: sums' rows

        def finish(total, t):  # sums[t, 0] = Σ of total's lanes
            value = builder.call(reduce, [F32(0.0), builder.load(total, align=4)], fastmath=FAST)
            builder.store(value, builder.gep(sums.data, [builder.mul(t, t.type(LANES))]))

        one = cgutils.alloca_once_value(builder, _splat(VA, 0.0))  # one token: its sums in a register

        def one_token(k, weights):
            add(k, weights, T.type(0), one)

        def every_token(k, weights):  # the pack's weights made once for every token; its lanes in sums[t]
            with cgutils.for_range(builder, T) as token:
                add(k, weights, token.index, builder.gep(lanes, [token.index]))

        with builder.if_else(builder.icmp_signed("==", T, T.type(1))) as (single, several):
            with single:  # 1.15x faster than through memory (measured)
                each_pack(one_token)
                finish(one, T.type(0))
            with several:
                with cgutils.for_range(builder, T) as token:
                    builder.store(_splat(VA, 0.0), builder.gep(lanes, [token.index]), align=4)
                each_pack(every_token)
                with cgutils.for_range(builder, T) as token:
                    finish(builder.gep(lanes, [token.index]), token.index)
        return context.get_dummy_value()

    return codegen


_POINTS_DOT: dict = {}


@intrinsic
def points_dot(typingctx, p, book, su, xq, sums, n_packs, tail_words, index_bits, per_pack):
    """sums[t, 0] = Σ_k Σ_c W[c] · xq[t, 128k + c] over the row's packs (module doc): n_packs whole ones of
    B = 4·index_bits bytes (each with a prefetch PREFETCH_BYTES ahead: a hint, no read), then (tail_words > 0) a
    partial last one of tail_words words (< B / 4), read by a masked load, its indices past them neither read nor
    gathered. p uint8 (n_packs·B + 4·tail_words,), the packed row; book float32 (2^index_bits, 2), the fp16
    codebook's bytes; su float32 (≥ per_pack·P,), the row's scales (zeros past G), P = n_packs + (1 with a partial
    pack); xq float32 (T, ≥ 128·P); sums float32 (T, LANES), token t's total in sums[t, 0] (the rest: the partial
    sums of several tokens); index_bits (a literal): 8 or 12; per_pack (a literal): groups per pack,
    128 / group_size. All C-contiguous."""
    lowered = literal_codegen(_POINTS_DOT, _make_points_dot, (index_bits, per_pack))
    arrays = (p, book, su, xq, sums)
    if lowered is None or not all(isinstance(n, types.Integer) for n in (n_packs, tail_words)) or any(
            not isinstance(a, types.Array) or a.layout != "C" for a in arrays):
        return None
    return types.void(p, book, su, xq, sums, n_packs, tail_words, index_bits, per_pack), lowered


# -- dim 4 on an 8-bit grid (SPEC.md §12.5): the points gathered as bytes, integer dot products as affine's -----------
@njit(**PARALLEL)
def vq_grid_matmul(x, packed, book, index_bits, grid_step, scale_codes, scale_meta, group_size, row_ptr, cols, values,
                   bias, residual, y, n_parts):
    """y (T, out) = x̂ (T, in) @ Wᵀ + bias + residual for a packed 4-D vq W whose codebook is on an 8-bit grid
    (book uint8 (2^k, 4): the codes + 128, point = (book − 128)·grid_step): module doc of grid_rows; rows cut into
    n_parts contiguous parts run in parallel."""
    n_blocks = scale_codes.shape[1] * group_size // BLOCK
    pair = n_blocks % 2 == 0
    high, low, dx, xsum, x_hat = quantize_x(x, 8, group_size, n_blocks, pair)
    a = (packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum,
         x_hat, NO_MAP)
    R = packed.shape[0]
    step = -(-R // n_parts)
    for part in prange(n_parts):
        grid_part(part * step, min(R, (part + 1) * step), a, index_bits, group_size, pair)


@njit(**SERIAL)
def vq_grid_matmul_serial(x, packed, book, index_bits, grid_step, scale_codes, scale_meta, group_size, row_ptr, cols,
                          values, bias, residual, y, n_parts):
    """vq_grid_matmul on the calling thread; n_parts unused."""
    n_blocks = scale_codes.shape[1] * group_size // BLOCK
    pair = n_blocks % 2 == 0
    high, low, dx, xsum, x_hat = quantize_x(x, 8, group_size, n_blocks, pair)
    a = (packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum,
         x_hat, NO_MAP)
    grid_part(0, packed.shape[0], a, index_bits, group_size, pair)


@njit(**SERIAL)
def grid_part(r0, r1, a, index_bits, group_size, pair):
    """Rows r0 .. r1-1 (grid_rows; `a`: its arrays) with the index bits as a constant (points_codes' literal), then
    grid_rows_for's."""
    if index_bits == 12:
        grid_rows_for(r0, r1, a, 12, group_size, pair)
    else:
        grid_rows_for(r0, r1, a, 8, group_size, pair)


@njit(inline="always", **SERIAL)
def grid_rows_for(r0, r1, a, index_bits, group_size, pair):
    """grid_rows with (blocks per vector step, blocks per group) as constants (block_dot's literals; an odd block
    count means groups of 32: one block each)."""
    if not pair:
        grid_rows(r0, r1, a, index_bits, 1, 1)
    elif group_size == 32:
        grid_rows(r0, r1, a, index_bits, 2, 1)
    elif group_size == 64:
        grid_rows(r0, r1, a, index_bits, 2, 2)
    else:
        grid_rows(r0, r1, a, index_bits, 2, 4)


@njit(inline="always", **SERIAL)
def grid_rows(r0, r1, a, index_bits, blocks_per_vector, blocks_per_group):
    """y[:, r0:r1] of vq_grid_matmul (row r into column out_rows[r] of y, bias and residual; r itself when out_rows is
    empty), a = (packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low,
    dx, xsum, x_hat, out_rows): x̂ as quantize_x gives it for 8-bit codes (high and low may be wider than the row's
    G groups: a kernel stack's, cpu_stack_kernels.py). Per row: its packs' points gathered as 32-bit words of 4 bytes (the codes + 128)
    into `codes`, which is then an 8-bit affine row in input order with zero 128: the G scales decoded (code·step
    + min) times grid_step, and cpu_qdot.block_dot multiplies it by every token's x̂ (quantize_x: the affine
    kernels' activation rounding) — Σ_b s·dx·Σ (c + 128)·x̂q − Σ_k 128·s_k·xsum_k = Σ s·c·grid_step·x̂. The
    gathers, the cost, are made once per row for all tokens (points_codes); codes past the row's last gathered
    pack (up to the G groups' inputs) meet x̂'s zeros past in_features, as do the padding indices."""
    packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum, \
        x_hat, out_rows = a
    T = dx.shape[0]
    G = scale_codes.shape[1]
    n_blocks = G * blocks_per_group  # the row's blocks of x̂ (groups of 32: one block each)
    n_bytes = packed.shape[1]
    B = pack_bytes(index_bits)
    n_packs = n_bytes // B
    tail_words = (n_bytes - n_packs * B) // 4
    codes = np.zeros(max(n_blocks * BLOCK, PACK_INPUTS * -(-n_bytes // B)), np.uint8)
    scale = np.empty(G, np.float32)
    zero_term = np.zeros(padded_groups(G), np.float32)  # −128·scale per group (zeros past G, as xsum)
    has_outliers, has_bias, has_residual = row_ptr.size > 1, bias.size > 0, residual.size > 0
    mapped = out_rows.size > 0
    n_vectors = n_blocks // blocks_per_vector
    for r in range(r0, r1):
        row_scales(r, scale_codes, scale_meta, scale)
        for k in range(G):
            scale[k] *= grid_step
            zero_term[k] = np.float32(-128.0) * scale[k]
        points_codes(packed[r], book, codes, n_packs, tail_words, index_bits)
        for t in range(T):
            acc = block_dot(codes, high[t], low[t], dx[t], scale, n_vectors, zero_term, xsum[t], zero_term.size,
                            8, 32, blocks_per_vector, blocks_per_group)
            if has_outliers:
                for i in range(row_ptr[r], row_ptr[r + 1]):
                    acc += half_to_float(values[i]) * x_hat[t, cols[i]]
            o = out_rows[r] if mapped else r
            if has_bias:
                acc += bias[o]
            if has_residual:
                acc += residual[t, o]
            y[t, o] = acc


def _make_points_codes(index_bits: int):
    n_bytes = pack_bytes.py_func(index_bits)
    V32 = ir.VectorType(I32, PACK_INDICES)

    def codegen(context, builder, signature, args):
        p, book, codes = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:3], args[:3]))
        n_packs, tail_words = args[3], args[4]
        book_words = builder.bitcast(book.data, I32.as_pointer())
        out = builder.bitcast(codes.data, V32.as_pointer())

        def gather(k, raw, mask):  # pack k's 32 points (4 bytes each) → codes[128k : 128k + 128]
            indices = builder.zext(_pack_indices(builder, raw, index_bits), V32)
            pointers = ir.GEPInstr(builder.block, book_words, [indices], True, "points", source_etype=I32)
            pointers.type = ir.VectorType(I32.as_pointer(), PACK_INDICES)  # (as _gather_points)
            builder._insert(pointers)
            load = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V32, [pointers.type, I32, mask.type, V32]),
                f"llvm.masked.gather.v{PACK_INDICES}i32.v{PACK_INDICES}p0i32")
            points = builder.call(load, [pointers, I32(4), mask, ir.Constant(V32, 0)])
            builder.store(points, builder.gep(out, [k]), align=4)

        every_point = ir.Constant(ir.VectorType(I1, PACK_INDICES), [1] * PACK_INDICES)
        with cgutils.for_range(builder, n_packs) as loop:
            start = builder.gep(p.data, [builder.mul(loop.index, loop.index.type(n_bytes))])
            raw = builder.load(builder.bitcast(start, ir.VectorType(I8, n_bytes).as_pointer()), align=1)
            _prefetch(builder, builder.gep(start, [I32(PREFETCH_BYTES)]))
            gather(loop.index, raw, every_point)
        with builder.if_then(builder.icmp_signed("!=", tail_words, tail_words.type(0))):
            start = builder.gep(p.data, [builder.mul(n_packs, n_packs.type(n_bytes))])
            n_points = builder.udiv(builder.mul(tail_words, tail_words.type(32)), tail_words.type(index_bits))
            gather(n_packs, _tail_bytes(builder, start, tail_words, n_bytes), _lanes_below(builder, n_points,
                                                                                           PACK_INDICES))
        return context.get_dummy_value()

    return codegen


_POINTS_CODES: dict = {}


@intrinsic
def points_codes(typingctx, p, book, codes, n_packs, tail_words, index_bits):
    """codes[128k + 4j + i] = book[index j of pack k, i] for the row's n_packs whole packs of B = 4·index_bits bytes
    (each with a prefetch PREFETCH_BYTES ahead) and, tail_words > 0, a partial last one read by a masked load (its
    points past the words' whole indices: zero bytes). p uint8 (n_packs·B + 4·tail_words,), the packed row; book uint8
    (2^index_bits, 4), a point's 4 bytes one 32-bit word (x86: vpgatherdd, 16 points at a time); codes uint8
    (≥ 128·P,), P = n_packs + (1 with a partial pack); index_bits (a literal): 8 or 12. All C-contiguous."""
    lowered = literal_codegen(_POINTS_CODES, _make_points_codes, (index_bits,))
    arrays = (p, book, codes)
    if lowered is None or not all(isinstance(n, types.Integer) for n in (n_packs, tail_words)) or any(
            not isinstance(a, types.Array) or a.layout != "C" for a in arrays):
        return None
    return types.void(p, book, codes, n_packs, tail_words, index_bits), lowered


def examples():
    """(kernel name, arguments) typed as VqWeight calls them (see cpu_kernels.examples): every (bits, dim),
    3 rows of 200 inputs in groups of 32, rows padded to whole words (format 1.8); 12-bit indices last (the
    ahead-of-time build's smoke test runs the last example of each kernel: the gathers and fp16 conversions of
    points_dot, on a row of one whole pack and a partial one)."""
    rng = np.random.default_rng(0)
    n_in = 200
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    for bits, dim in sorted(itertools.product(VQ_BITS, VQ_DIMS), key=lambda kind: kind[0] * kind[1]):
        index_bits = bits * dim
        if index_bits not in VQ_SHARED_INDEX_BITS:
            continue
        unit = word_unit(index_bits)
        n_slots = -(-(-(-n_in // dim)) // unit) * unit  # 12 bits: 56 indices, a pack and 24 (36 bytes)
        packed = readonly(rng.integers(0, 256, (3, n_slots * index_bits // 8)).astype(np.uint8))
        points = rng.standard_normal((1 << index_bits, dim)).astype(np.float16)
        codebook = readonly(points.view(np.float32) if dim == 4 else points.astype(np.float32).T)
        scale_codes = readonly(rng.integers(0, 256, (3, -(-n_in // 32))).astype(np.uint8))
        scale_meta = readonly(np.full((1, 2), 0.01, np.float32))
        for name in ("vq_matmul", "vq_matmul_serial"):
            yield name, (x, packed, codebook, index_bits, dim, scale_codes, scale_meta, 32, NO_ROWS, NO_COLS,
                         NO_VALUES, NO_FLOAT, NO_RESIDUAL, np.empty((1, 3), np.float32), 2)
        if dim == 4:  # the same rows with a codebook on the 8-bit grid (its codes + 128 as bytes)
            book = readonly(rng.integers(1, 256, (1 << index_bits, 4)).astype(np.uint8))
            for name in ("vq_grid_matmul", "vq_grid_matmul_serial"):
                yield name, (x, packed, book, index_bits, np.float32(1 / 64), scale_codes, scale_meta, 32, NO_ROWS,
                             NO_COLS, NO_VALUES, NO_FLOAT, NO_RESIDUAL, np.empty((1, 3), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the weights use."""
    for name, args in examples():
        globals()[name](*args)
