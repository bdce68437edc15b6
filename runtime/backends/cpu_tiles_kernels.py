"""The compiled side of cpu_tiles.py: repack (file rows → tiles), tile_dequantize (tiles →
float32 rows) and tile_dot (one tile's 16 dot products, LLVM vector IR, prefetching the codes ahead)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_qdot
from .cpu_qdot import lane_dot, literal_codegen
from .cpu_tiles import BLOCK, META_SHIFT, PLANES, TILE_ROWS
from .cpu_weights import ACTIVATION_LOW_BITS as LOW_BITS  # x̂ = (2^LOW_BITS·high + low)·dx

SERIAL = dict(fastmath=True, cache=True, nogil=True)
# tile_dot asks for the codes this many bytes ahead of the block it reads (a prefetch per 64-byte line). In
# decode the codes stream from memory and each block's few loads are followed by ~50 vector operations, so
# the out-of-order window alone keeps too few lines in flight: ~10 GB/s on one thread where a plain read
# streams ~30 GB/s. 2 KiB ≈ one core's bandwidth × memory latency (~15-20 GB/s × ~100 ns). Measured with a
# layer's four decode stacks in decode order on SmolLM2 (tools/bench_team.py, 2 threads): 117 vs 131 µs per
# layer, best of 5 runs, without prefetching; 1536 and 3072 bytes within the noise of 2048. Prefetches past
# the last tile are harmless (a prefetch never faults).
PREFETCH_BYTES = 2048


LOW_PART = tuple(PLANES.get(bits, (0, 0))[0] for bits in range(9))  # PLANES as tuples a kernel can index
HIGH_PART = tuple(PLANES.get(bits, (0, 0))[1] for bits in range(9))


@njit(**SERIAL)
def _planes(bits):
    """PLANES[bits]: the widths of a code's low and high parts."""
    return LOW_PART[bits], HIGH_PART[bits]


@njit(**SERIAL)
def repack(packed, scale_codes, zero_codes, bits, codes, scale_tiles, zero_tiles):
    """The file's packed rows (R, C·bits/8) uint8 and metadata codes (R, G) → tiles: codes (n_tiles,
    C/32 · 64 · bits), scale_tiles and zero_tiles (n_tiles, G · 16); all three zero-filled by the caller."""
    R, row_bytes = packed.shape
    G = scale_codes.shape[1]
    n_cols = row_bytes * 8 // bits
    low, high = _planes(bits)
    low_mask, per_low = (1 << low) - 1, 8 // low
    per_high = 8 // high if high else 1
    block_bytes = 64 * bits
    for r in range(R):
        t, lane = r // TILE_ROWS, r % TILE_ROWS
        row = packed[r]
        tile = codes[t]
        for c in range(n_cols):
            bit = c * bits  # the row is one little-endian bit stream (SPEC.md §5)
            byte, shift = bit >> 3, bit & 7
            value = np.uint32(row[byte]) >> shift
            if shift + bits > 8:
                value |= np.uint32(row[byte + 1]) << (8 - shift)
            value &= (1 << bits) - 1
            b, q, i = c // BLOCK, (c % BLOCK) // 4, c % 4
            v, j = q // per_low, q % per_low
            at = b * block_bytes + v * 64 + lane * 4 + i
            tile[at] = np.uint8(tile[at] | ((value & low_mask) << (j * low)))
            if high:
                v, j = q // per_high, q % per_high
                at = b * block_bytes + low * 64 + v * 64 + lane * 4 + i
                tile[at] = np.uint8(tile[at] | ((value >> low) << (j * high)))
        for k in range(G):
            scale_tiles[t, k * TILE_ROWS + lane] = scale_codes[r, k]
            zero_tiles[t, k * TILE_ROWS + lane] = zero_codes[r, k]


@njit(cache=True, nogil=True)  # no fastmath: the NumPy path's float32 operations, in its order (cpu_weights.meta_rows)
def tile_dequantize(codes, scale_tiles, zero_tiles, meta, ids, bits, group_size, out):
    """out (len(ids), C) float32 = rows ids of a matrix in tiles, dequantized: (code − zero)·scale (SPEC.md
    §6.1), scale and zero = metadata code · step + min of the row's run, in natural column order (the file's
    padding columns included). repack's layout read back; ids must be rows of the matrix (the caller checks).
    What an embedding's lookups read once its codes live in tiles: not the file, whose pages a lookup
    faults in 64 KiB at a time (the kernel's fault-around) and keeps resident."""
    n_cols = out.shape[1]
    G = scale_tiles.shape[1] // TILE_ROWS
    low, high = _planes(bits)
    low_mask, per_low = (1 << low) - 1, 8 // low
    high_mask, per_high = (1 << high) - 1, (8 // high if high else 1)
    block_bytes = 64 * bits
    for n in range(ids.size):
        r = ids[n]
        t, lane = r // TILE_ROWS, r % TILE_ROWS
        tile = codes[t]
        for k in range(G):
            run = 4 * ((r * G + k) >> META_SHIFT)
            scale = np.float32(scale_tiles[t, k * TILE_ROWS + lane]) * meta[run] + meta[run + 1]
            zero = np.float32(zero_tiles[t, k * TILE_ROWS + lane]) * meta[run + 2] + meta[run + 3]
            for c in range(k * group_size, min(n_cols, (k + 1) * group_size)):
                b, q, i = c // BLOCK, (c % BLOCK) // 4, c % 4
                at = b * block_bytes + lane * 4 + i
                value = (np.uint32(tile[at + (q // per_low) * 64]) >> ((q % per_low) * low)) & low_mask
                if high:
                    part = np.uint32(tile[at + (low + q // per_high) * 64]) >> ((q % per_high) * high)
                    value |= (part & high_mask) << low
                out[n, c] = (np.float32(value) - zero) * scale


# -- the tile's dot product, as LLVM vector IR -------------------------------------------------------------
I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
VI = ir.VectorType(I32, TILE_ROWS)
V8 = ir.VectorType(I32, 8)
VF = ir.VectorType(F32, TILE_ROWS)
V64 = ir.VectorType(I64, TILE_ROWS)
VB = ir.VectorType(I8, 64)
MASK = ir.VectorType(ir.IntType(1), TILE_ROWS)


def _splat(builder, vector_type, value, lanes=TILE_ROWS):
    """value (a scalar IR value) in every lane."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, I32(0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


def emit_prefetch(builder, address) -> None:
    """A prefetch of the cache line at `address` (an i8*): read, kept in every cache level, data. Never faults."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [address, I32(0), I32(3), I32(1)])


@intrinsic
def prefetch(typingctx, address):
    """emit_prefetch for an integer address, in a kernel (cpu_kernels.fp16_rows)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        emit_prefetch(builder, builder.inttoptr(args[0], I8.as_pointer()))
        return context.get_dummy_value()

    return types.void(address), codegen


def _const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def _row_half(builder, codes, half):
    """The 32 bytes of rows 8·half .. 8·half + 7 of a <64 x i8> quad (an AVX2 register's worth)."""
    return builder.shuffle_vector(codes, codes, ir.Constant(ir.VectorType(I32, 32), list(range(32 * half, 32 * half + 32))))


def _quad_codes(builder, vectors, q, low, high):
    """The codes of column quad q of a block (<64 x i8>: byte 4l + i = row l's code at column 4q + i), cut from the
    block's low-part vectors and, for 3, 5 and 6 bits, ORed with its high part."""
    v, j = divmod(q, 8 // low)
    c = vectors[v]
    if j:
        c = builder.lshr(c, _const(VB, j * low))
    if low < 8:
        c = builder.and_(c, _const(VB, (1 << low) - 1))
    if high:
        v, j = divmod(q, 8 // high)
        h = vectors[low + v]
        if j:
            h = builder.lshr(h, _const(VB, j * high))
        h = builder.and_(h, _const(VB, (1 << high) - 1))
        c = builder.or_(c, builder.shl(h, _const(VB, low)))
    return c


def _byte_total(builder, codes_q, x_high, x_low, x_at, bits):
    """Σ_q codes_q · x̂q per row (<16 x i32>) as two int8 passes, high and low bytes (cpu_qdot.lane_dot: vpdpbusd on
    VNNI), each 4-column activation broadcast to every lane; two accumulator chains per pass (8-bit activations:
    the high pass only)."""
    sums_high, sums_low = [_const(VI, 0)] * 2, [_const(VI, 0)] * 2
    passes = ((sums_high, x_high), (sums_low, x_low)) if cpu_qdot.activation_low_part() else ((sums_high, x_high),)
    for q, c in enumerate(codes_q):
        at = builder.add(x_at, ir.Constant(x_at.type, 4 * q))
        for sums, x in passes:
            x4 = builder.load(builder.bitcast(builder.gep(x.data, [at]), I32.as_pointer()), align=1)
            sums[q % 2] = lane_dot(builder, c, builder.bitcast(_splat(builder, VI, x4), VB), bits, sums[q % 2])
    return builder.add(builder.shl(builder.add(*sums_high), _const(VI, LOW_BITS)), builder.add(*sums_low))


def _word_total(builder, codes_q, x_high, x_low, x_at, bits):
    """_byte_total's integers on AVX2 with half the multiplies: the block's activations as int16
    x̂q = 2^LOW_BITS·high + low (|x̂q| ≤ 2^15 − 129: exact), the codes' bytes read as 16-bit words and split into
    even bytes (columns 4q, 4q+2 of a row) and odd bytes (4q+1, 4q+3), each multiplied by the matching pair of
    x̂q broadcast: one vpmaddwd per 32 code bytes and pair. Rows 0-7 and 8-15 (the two 32-byte halves) in two
    accumulator chains each."""
    V16W, V32B, V32W = ir.VectorType(I16, 16), ir.VectorType(I8, BLOCK), ir.VectorType(I16, BLOCK)
    madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8, [V16W, V16W]), "llvm.x86.avx2.pmadd.wd")
    xh, xl = (builder.load(builder.bitcast(builder.gep(x.data, [x_at]), V32B.as_pointer()), align=1) for x in (x_high, x_low))
    xq = builder.add(builder.shl(builder.sext(xh, V32W), _const(V32W, LOW_BITS)), builder.sext(xl, V32W))
    order = [4 * q + i for q in range(BLOCK // 4) for i in (0, 2, 1, 3)]  # int32 element 2q: columns 4q, 4q+2; 2q+1: 4q+1, 4q+3
    pairs = builder.bitcast(builder.shuffle_vector(xq, xq, ir.Constant(ir.VectorType(I32, BLOCK), order)), VI)
    chains = [[_const(V8, 0)] * 2 for _ in range(2)]  # [rows 0-7, rows 8-15] × two chains
    for q, c in enumerate(codes_q):
        even_x, odd_x = (builder.bitcast(builder.shuffle_vector(pairs, pairs, ir.Constant(V8, [e] * 8)), V16W)
                         for e in (2 * q, 2 * q + 1))
        for half, chain in enumerate(chains):
            words = builder.bitcast(_row_half(builder, c, half), V16W)
            even, odd = builder.and_(words, _const(V16W, 0xFF)), builder.lshr(words, _const(V16W, 8))
            product = builder.add(builder.call(madd, [even, even_x]), builder.call(madd, [odd, odd_x]))
            chain[q % 2] = builder.add(chain[q % 2], product)
    return builder.shuffle_vector(builder.add(*chains[0]), builder.add(*chains[1]), ir.Constant(VI, list(range(TILE_ROWS))))


def _high_total(builder, codes_q, x_high, x_at, bits):
    """_byte_total's integers when the activations are 8-bit ($MXQ_ACTIVATIONS=8, cpu_weights.activation_low_part:
    the low part is zero) on AVX2: vpmaddubsw of the code bytes by the quad's 4 int8 activations broadcast (neighbour pairs summed
    into int16, |pair| ≤ 2·(2^b − 1)·127), summed in int16 over as many quads as cannot overflow (8 at 4 bits, 2 at
    6), then one vpmaddwd by ones per row half (rows 0-7, 8-15: the two 32-byte halves) into int32; shifted by
    LOW_BITS (x̂q = 2^LOW_BITS·high). 8-bit codes go as two nibbles, 16·high + low. Half the multiplies of ~16-bit
    activations' two vpmaddwd per 32 code bytes, and the codes' bytes are used as they are."""
    V16W, V32B = ir.VectorType(I16, 16), ir.VectorType(I8, 32)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16W, [V32B, V32B]), "llvm.x86.avx2.pmadd.ub.sw")
    madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8, [V16W, V16W]), "llvm.x86.avx2.pmadd.wd")
    x4s = []
    for q in range(len(codes_q)):
        at = builder.add(x_at, ir.Constant(x_at.type, 4 * q))
        x4 = builder.load(builder.bitcast(builder.gep(x_high.data, [at]), I32.as_pointer()), align=1)
        x4s.append(builder.bitcast(_splat(builder, V8, x4, 8), V32B))
    if bits < 8:
        terms = {0: list(enumerate(codes_q))}  # weight shift → (quad, code bytes)
    else:
        terms = {4: [(q, builder.lshr(c, _const(VB, 4))) for q, c in enumerate(codes_q)],
                 0: [(q, builder.and_(c, _const(VB, 15))) for q, c in enumerate(codes_q)]}
    largest_code = 15 if bits == 8 else (1 << bits) - 1  # 8 bits: as nibbles
    per_sum = 32767 // (2 * largest_code * 127)  # quads an int16 sum holds exactly
    halves = []
    for half in range(2):
        total = None
        for shift, quads in terms.items():
            for first in range(0, len(quads), per_sum):
                sums = [builder.call(maddubs, [_row_half(builder, c, half), x4s[q]]) for q, c in quads[first:first + per_sum]]
                while len(sums) > 1:  # pairwise: a short dependency chain
                    sums = [builder.add(a, b) for a, b in zip(sums[0::2], sums[1::2])] + sums[len(sums) & ~1:]
                part = builder.call(madd, [sums[0], _const(V16W, 1)])
                part = builder.shl(part, _const(V8, shift)) if shift else part
                total = part if total is None else builder.add(total, part)
        halves.append(total)
    both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(VI, list(range(TILE_ROWS))))
    return builder.shl(both, _const(VI, LOW_BITS))


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _make_tile_dot(bits: int, blocks_per_group: int):
    low, high = PLANES[bits]
    block_bytes = 64 * bits

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:9], args[:9])]
        codes, scale_codes, zero_codes, meta, x_high, x_low, dx, xsum, out = arrays
        n_groups, first_row, last_run = (context.cast(builder, a, t, types.int64)
                                         for a, t in zip(args[9:12], signature.args[9:12]))
        rows = builder.add(_splat(builder, VI, builder.trunc(first_row, I32)), ir.Constant(VI, list(range(TILE_ROWS))))
        row_start = builder.mul(rows, _splat(builder, VI, builder.trunc(n_groups, I32)))  # (r·G) per lane
        last = _splat(builder, VI, builder.trunc(last_run, I32))
        meta_at = _splat(builder, V64, builder.ptrtoint(meta.data, I64))
        acc = cgutils.alloca_once_value(builder, _const(VF, 0.0))
        lane_run = cgutils.alloca_once_value(builder, _const(VI, -1))
        lane_meta = [cgutils.alloca_once_value(builder, _const(VF, 0.0)) for _ in range(4)]  # s step, s min, z step, z min
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(VF, [ir.VectorType(F32.as_pointer(), TILE_ROWS), I32, MASK, VF]),
            "llvm.masked.gather.v16f32.v16p0")
        with cgutils.for_range(builder, n_groups) as loop:
            k = loop.index
            group_acc = _const(VF, 0.0)
            x_sum = None
            for bb in range(blocks_per_group):
                b = builder.add(builder.mul(k, ir.Constant(k.type, blocks_per_group)), ir.Constant(k.type, bb))
                base = builder.gep(codes.data, [builder.mul(b, ir.Constant(b.type, block_bytes))])
                for v in range(bits):
                    emit_prefetch(builder, builder.gep(base, [ir.Constant(b.type, PREFETCH_BYTES + 64 * v)]))
                vectors = [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(b.type, 64 * v)]), VB.as_pointer()),
                                        align=1) for v in range(bits)]  # low part's `low` vectors, then high's
                x_at = builder.mul(b, ir.Constant(b.type, BLOCK))
                codes_q = [_quad_codes(builder, vectors, q, low, high) for q in range(8)]
                if cpu_qdot.DOT_ISA != "avx2":  # Σ code · x̂q per row: <16 x i32>
                    total = _byte_total(builder, codes_q, x_high, x_low, x_at, bits)
                elif cpu_qdot.activation_low_part():
                    total = _word_total(builder, codes_q, x_high, x_low, x_at, bits)
                else:
                    total = _high_total(builder, codes_q, x_high, x_at, bits)
                step = _splat(builder, VF, builder.load(builder.gep(dx.data, [b])))
                group_acc = _fma(builder, builder.sitofp(total, VF), step, group_acc)
                s = builder.load(builder.gep(xsum.data, [b]))
                x_sum = s if x_sum is None else builder.fadd(x_sum, s)
            # the 16 lanes' scale and zero of group k: code·step + min of each lane's metadata run
            run = builder.ashr(builder.add(row_start, _splat(builder, VI, builder.trunc(k, I32))), _const(VI, META_SHIFT))
            run = builder.select(builder.icmp_signed(">", run, last), last, run)  # padding rows: any valid run
            changed = builder.icmp_signed("!=", run, builder.load(lane_run))
            any_changed = builder.icmp_unsigned("!=", builder.bitcast(changed, ir.IntType(TILE_ROWS)),
                                                ir.Constant(ir.IntType(TILE_ROWS), 0))
            with builder.if_then(any_changed, likely=False):
                address = builder.add(meta_at, builder.mul(builder.sext(run, V64), _const(V64, 16)))
                for i, slot in enumerate(lane_meta):
                    pointers = builder.inttoptr(builder.add(address, _const(V64, 4 * i)),
                                                ir.VectorType(F32.as_pointer(), TILE_ROWS))
                    builder.store(builder.call(gather, [pointers, I32(4), changed, builder.load(slot)]), slot)
                builder.store(run, lane_run)
            s_step, s_min, z_step, z_min = (builder.load(slot) for slot in lane_meta)
            at = builder.mul(k, ir.Constant(k.type, TILE_ROWS))
            scale_code = builder.load(builder.bitcast(builder.gep(scale_codes.data, [at]), ir.VectorType(I8, TILE_ROWS).as_pointer()), align=1)
            zero_code = builder.load(builder.bitcast(builder.gep(zero_codes.data, [at]), ir.VectorType(I8, TILE_ROWS).as_pointer()), align=1)
            scale = _fma(builder, builder.uitofp(scale_code, VF), s_step, s_min)
            zero = _fma(builder, builder.uitofp(zero_code, VF), z_step, z_min)
            zero_term = builder.fmul(builder.fneg(scale), zero, flags=("fast",))
            total = _fma(builder, group_acc, scale, builder.load(acc))
            builder.store(_fma(builder, zero_term, _splat(builder, VF, x_sum), total), acc)
        builder.store(builder.load(acc), builder.bitcast(out.data, VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


_CODEGENS: dict = {}


@intrinsic
def tile_dot(typingctx, codes, scale_codes, zero_codes, meta, x_high, x_low, dx, xsum, out, n_groups, first_row,
             last_run, bits, blocks_per_group):
    """out[l] (16 float32) = Σ_k scale_lk · Σ_{b in group k} dx[b] · Σ_{c in block b} code_lc · x̂q_c
                             − Σ_k scale_lk · zero_lk · Σ_{b in group k} xsum[b]
    for lane l = row first_row + l of one tile (the module doc's layout): codes, scale_codes, zero_codes its
    arrays (1-D uint8), meta the matrix's (runs · 4) float32 runs (last_run the last index), x_high and
    x_low int8 (in natural column order; x̂q = 2^LOW_BITS·high + low), dx and xsum float32 per 32-column block
    (the block's step and Σ x̂). bits and blocks_per_group must be literal integers."""
    literals = (bits, blocks_per_group)
    lowered = literal_codegen(_CODEGENS, _make_tile_dot, literals)
    if lowered is None:
        return None
    return types.void(codes, scale_codes, zero_codes, meta, x_high, x_low, dx, xsum, out, n_groups, first_row, last_run,
                      *literals), lowered
