"""The inner loop of the compiled affine kernels, written as LLVM vector IR: integer dot products of a
packed row's codes with int8 activations (llama.cpp's idea), one SIMD vector of codes at a time.

    block_dot(p, x_high, x_low, dx, wscale, n_vectors, corr_a, corr_b, n_corr,
              bits, units_per_block, blocks_per_vector, blocks_per_group)
        = Σ_b dx[b] · wscale[b // blocks_per_group] · Σ_{i in block b} code_i · (2^LOW_BITS·x_high + x_low)[i]
          + Σ_{k < n_corr} corr_a[k] · corr_b[k]

p: one packed row (uint8, 1-D); x_high, x_low: the activations as two int8 arrays in *vector order*
(below), in blocks of 32 columns with steps dx (float32, one per block); wscale: the row's weight scale
per group (float32). The last four arguments must be literal integers (each combination is its own
copy of the loop: constant shifts and vector sizes); units_per_block = 32 / U, blocks_per_vector 1 or 2,
blocks_per_group 1, 2 or 4.

Vector order. The packed stream is made of units of U codes in B bytes (code j of a unit at bit j·b);
a vector step covers M = units_per_block·blocks_per_vector consecutive units (32 or 64 columns). Per step,
the B·M bytes are loaded as one vector, split into B byte planes (stride-B shuffles), and code plane j
(code j of every unit: (plane >> shift) & mask | spill from the next plane) is cut from them with
byte-wide shifts and masks; the U code planes are concatenated, so the step's codes form one uint8
vector in plane-major order. (3- and 5-bit codes, which straddle bytes, are instead cut in that same
order from 16-bit windows: one byte shuffle puts each code's two bytes in a 16-bit lane, then a shift
per lane, a mask and a narrowing: WINDOW_BITS.) The activations are in the same order:
    x_high[v·U·M + j·M + i] = high part of x[column (v·M + i)·U + j]        (zero past in_features)
Products are summed four neighbours at a time into int32 lanes (lane_dot: x86 AVX512-VNNI vpdpbusd, one
instruction per 64 codes and activation byte; AVX2 vpmaddubsw + vpmaddwd per 32; elsewhere LLVM's generic
widening multiply-add), the high
part's lanes shifted by LOW_BITS. Four neighbours are four units of one code plane, which lie in one block
(units_per_block ≥ 4), so each lane is scaled by its block's dx · its group's wscale and accumulated in
float32 lanes; the second sum (n_corr a multiple of CORR_PAD: the affine kernels' zero-point term,
−scale·zero per group times Σ x̂ per group, arrays padded with zeros) is added to the same lanes, so a
row ends in one horizontal sum. (As a separate loop over a row's 18 groups it cost ~9 ns of a 4-bit
576-wide row's ~40: its own vector loop, remainder and horizontal sum.)
"""
from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_weights import ACTIVATION_LOW_BITS as LOW_BITS  # x̂ = (2^LOW_BITS·high + low)·dx
from .cpu_weights import DOT_ISAS  # the lowerings' names
from .cpu_weights import UNITS  # bits -> (U codes, B bytes) per unit of the packed stream
from .cpu_weights import activation_low_part  # read when a kernel compiles: ~16-bit (True) or 8-bit activations

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
CHUNK = 64  # codes per integer multiply-add step (one 512-bit vector of bytes)
CORR_PAD = 16  # block_dot's second sum runs over whole vectors of float32 lanes (8 or 16: a multiple of both)
# Widths whose codes are cut from 16-bit windows (_window_codes) rather than from byte planes.
# tools/bench_kernels.py (built ahead of time, 1536×576, one thread, two alternated runs): b5g32 103.5 →
# 84.5 µs, b5g64 93.7 → 71.8, b3g32 89.5 → 83.1, b3g64 83.9 → 72.1; 6 bits measured 1.07× slower with
# windows (its byte planes are 16 units wide and cheap to cut). 2, 4 and 8 bits never straddle a byte.
WINDOW_BITS = (3, 5)


def dot_isas() -> list[str]:
    """The lowerings of the integer dot products this CPU can run, best first: "vnni" (x86 AVX512-VNNI with VL:
    vpdpbusd), "avx2" (x86 AVX2: vpmaddubsw + vpmaddwd, as llama.cpp's AVX2 kernels), "generic" (LLVM's widening
    multiply-add: aarch64 and others)."""
    features = llvm.get_host_cpu_features()
    vnni = bool(features.get("avx512vnni")) and bool(features.get("avx512vl"))
    runs = {"vnni": vnni, "avx2": bool(features.get("avx2")), "generic": True}
    return [isa for isa in DOT_ISAS if runs[isa]]


DOT_ISA = dot_isas()[0]  # read when a kernel compiles (tests set it first to compile another lowering)


def _indices(values) -> ir.Constant:
    values = list(values)
    return ir.Constant(ir.VectorType(I32, len(values)), values)


def _splat(vector_type, value) -> ir.Constant:
    return ir.Constant(vector_type, [value] * vector_type.count)


def _concat(builder, vectors):
    """Concatenate equal-length vectors (a power-of-two count) into one."""
    while len(vectors) > 1:
        n = vectors[0].type.count
        vectors = [builder.shuffle_vector(a, b, _indices(range(2 * n))) for a, b in zip(vectors[0::2], vectors[1::2])]
    return vectors[0]


def _block_codes(builder, raw, bits, M):
    """raw <B·M x i8> (M units) → codes <U·M x i8>, plane-major (code j of unit i at j·M + i)."""
    U, B = UNITS[bits]
    if bits in WINDOW_BITS:
        return _window_codes(builder, raw, bits, M)
    V = ir.VectorType(I8, M)
    planes = [raw] if B == 1 else [builder.shuffle_vector(raw, raw, _indices(range(k, B * M, B))) for k in range(B)]
    codes = []
    for j in range(U):
        byte, shift = divmod(j * bits, 8)
        low = min(bits, 8 - shift)  # bits of code j in this byte plane; the rest start the next one
        c = builder.lshr(planes[byte], _splat(V, shift)) if shift else planes[byte]
        if shift + low < 8:
            c = builder.and_(c, _splat(V, (1 << low) - 1))
        if low < bits:
            spill = builder.and_(planes[byte + 1], _splat(V, (1 << (bits - low)) - 1))
            c = builder.or_(c, builder.shl(spill, _splat(V, low)))
        codes.append(c)
    return _concat(builder, codes)


def _window_codes(builder, raw, bits, M):
    """_block_codes for codes that straddle bytes (WINDOW_BITS): each code's two bytes gathered by one byte
    shuffle into a 16-bit lane (code j of unit i lies in bytes j·b//8 and the next of the unit), shifted right
    by its own j·b % 8 and masked, then narrowed to bytes: a handful of wide vector instructions (x86: a
    byte permute, vpsrlvw, vpand, vpmovwb) instead of shuffles and shifts on B·U narrow vectors."""
    U, B = UNITS[bits]
    lanes = ir.VectorType(I16, U * M)
    order, shifts = [], []  # byte pairs, little-endian: lane (j·M + i) ← bytes (i·B + j·b//8, +1)
    for j in range(U):
        byte, shift = divmod(j * bits, 8)
        for i in range(M):
            first = i * B + byte
            order += [first, min(first + 1, B * M - 1)]  # the last unit's high byte past the end: masked off
            shifts.append(shift)
    pairs = builder.bitcast(builder.shuffle_vector(raw, raw, _indices(order)), lanes)
    codes = builder.and_(builder.lshr(pairs, ir.Constant(lanes, shifts)), _splat(lanes, (1 << bits) - 1))
    return builder.trunc(codes, ir.VectorType(I8, U * M))


def lane_dot(builder, codes, xs, bits, acc=None):
    """codes <w x i8> (unsigned, below 2^bits) · xs <w x i8> (signed) → <w/4 x i32>, lane l = Σ of products
    4l .. 4l+3 (+ acc, the same type, when given)."""
    w = codes.type.count
    lanes = ir.VectorType(I32, w // 4)
    if DOT_ISA == "vnni":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                            f"llvm.x86.avx512.vpdpbusd.{8 * w}")
        return builder.call(fn, [_splat(lanes, 0) if acc is None else acc, builder.bitcast(codes, lanes), builder.bitcast(xs, lanes)])
    if DOT_ISA == "avx2":
        if bits < 8:
            total = _madd_avx2(builder, codes, xs)
        else:  # 8-bit codes as two nibbles, 16·high + low: each product pair then fits vpmaddubsw's int16
            high = _madd_avx2(builder, builder.lshr(codes, _splat(codes.type, 4)), xs)
            low = _madd_avx2(builder, builder.and_(codes, _splat(codes.type, 15)), xs)
            total = builder.add(builder.shl(high, _splat(lanes, 4)), low)
    else:
        wide = ir.VectorType(I32, w)
        products = builder.mul(builder.zext(codes, wide), builder.sext(xs, wide))
        quarters = [builder.shuffle_vector(products, products, _indices(range(q, w, 4))) for q in range(4)]
        total = builder.add(builder.add(quarters[0], quarters[1]), builder.add(quarters[2], quarters[3]))
    return total if acc is None else builder.add(acc, total)


def _madd_avx2(builder, codes, xs):
    """lane_dot on AVX2, 32 bytes at a time: vpmaddubsw (unsigned · signed bytes, neighbour pairs summed into
    saturating int16) then vpmaddwd by ones (int16 pairs into int32). Exact for codes below 128: a pair is at
    most 2 · 127 · 127 < 2^15."""
    V8, V16, V32 = ir.VectorType(I32, 8), ir.VectorType(I16, 16), ir.VectorType(I8, 32)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16, [V32, V32]), "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8, [V16, V16]), "llvm.x86.avx2.pmadd.wd")
    w = codes.type.count
    assert w % 32 == 0, w
    parts = []
    for start in range(0, w, 32):
        c, x = codes, xs
        if w > 32:
            half = _indices(range(start, start + 32))
            c, x = builder.shuffle_vector(codes, codes, half), builder.shuffle_vector(xs, xs, half)
        parts.append(builder.call(maddwd, [builder.call(maddubs, [c, x]), _splat(V16, 1)]))
    return _concat(builder, parts)


def _make_block_dot(bits: int, units_per_block: int, blocks_per_vector: int, blocks_per_group: int):
    U, B = UNITS[bits]
    M = units_per_block * blocks_per_vector  # units per vector step
    codes_per_vector = U * M
    width = min(CHUNK, codes_per_vector)  # codes per multiply-add
    n_lanes = width // 4
    lanes_per_plane = M // 4
    # lane l → which block of the vector step it sums (a vector step of several blocks is one multiply-add)
    lane_block = [((l % lanes_per_plane) * 4) // units_per_block for l in range(n_lanes)]
    group_shift = blocks_per_group.bit_length() - 1  # blocks per group: 1, 2 or 4

    def codegen(context, builder, signature, args):
        p_type, x_type, _, d_type, s_type, _, a_type, b_type = signature.args[:8]
        p = context.make_array(p_type)(context, builder, args[0])
        x_high = context.make_array(x_type)(context, builder, args[1])
        x_low = context.make_array(x_type)(context, builder, args[2])
        dx = context.make_array(d_type)(context, builder, args[3])
        ws = context.make_array(s_type)(context, builder, args[4])
        n_vectors = args[5]
        corr_a = context.make_array(a_type)(context, builder, args[6])
        corr_b = context.make_array(b_type)(context, builder, args[7])
        n_corr = args[8]
        VF = ir.VectorType(F32, n_lanes)
        acc = cgutils.alloca_once_value(builder, _splat(VF, 0.0))

        def per_lane(ptr):  # the blocks_per_vector floats at ptr → one per lane (by lane_block)
            if blocks_per_vector == 1:
                value = builder.load(ptr)
                return builder.shuffle_vector(builder.insert_element(ir.Constant(VF, ir.Undefined), value, I32(0)),
                                              ir.Constant(VF, ir.Undefined), _indices([0] * n_lanes))
            pair = builder.load(builder.bitcast(ptr, ir.VectorType(F32, blocks_per_vector).as_pointer()), align=4)
            return builder.shuffle_vector(pair, pair, _indices(lane_block))

        with cgutils.for_range(builder, n_vectors) as loop:
            v = loop.index
            raw_ptr = builder.gep(p.data, [builder.mul(v, ir.Constant(v.type, B * M))])
            raw = builder.load(builder.bitcast(raw_ptr, ir.VectorType(I8, B * M).as_pointer()), align=1)
            codes = _block_codes(builder, raw, bits, M)
            offset = builder.mul(v, ir.Constant(v.type, codes_per_vector))
            total = None
            passes = ((LOW_BITS, x_high), (0, x_low)) if activation_low_part() else ((LOW_BITS, x_high),)
            for half, x in passes:  # Σ code·(2^LOW_BITS·high + low) in int32 lanes (8-bit x̂: low is zero)
                x_ptr = builder.bitcast(builder.gep(x.data, [offset]), ir.VectorType(I8, codes_per_vector).as_pointer())
                xs = builder.load(x_ptr, align=1)
                for start in range(0, codes_per_vector, width):
                    step = _indices(range(start, start + width))
                    part = lane_dot(builder, builder.shuffle_vector(codes, codes, step) if width < codes_per_vector else codes,
                                    builder.shuffle_vector(xs, xs, step) if width < codes_per_vector else xs, bits)
                    if half:
                        part = builder.shl(part, _splat(part.type, half))
                    total = part if total is None else builder.add(total, part)
            first_block = builder.mul(v, ir.Constant(v.type, blocks_per_vector))
            steps = per_lane(builder.gep(dx.data, [first_block]))  # the blocks' activation steps
            if blocks_per_group == 1:  # one weight group per block: its scales lane by lane as well
                scales = per_lane(builder.gep(ws.data, [first_block]))
            else:  # the vector step lies in one group
                group = builder.lshr(first_block, ir.Constant(v.type, group_shift))
                value = builder.load(builder.gep(ws.data, [group]))
                scales = builder.shuffle_vector(builder.insert_element(ir.Constant(VF, ir.Undefined), value, I32(0)),
                                                ir.Constant(VF, ir.Undefined), _indices([0] * n_lanes))
            lane_scale = builder.fmul(steps, scales, flags=("fast",))
            product = builder.fmul(builder.sitofp(total, VF), lane_scale, flags=("fast",))
            builder.store(builder.fadd(builder.load(acc), product, flags=("fast",)), acc)
        n_corr_vectors = builder.udiv(n_corr, ir.Constant(n_corr.type, n_lanes))
        with cgutils.for_range(builder, n_corr_vectors) as loop:  # + Σ corr_a·corr_b, n_lanes at a time
            at = builder.mul(loop.index, ir.Constant(loop.index.type, n_lanes))
            a = builder.load(builder.bitcast(builder.gep(corr_a.data, [at]), VF.as_pointer()), align=4)
            b = builder.load(builder.bitcast(builder.gep(corr_b.data, [at]), VF.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(a, b, flags=("fast",)), flags=("fast",)), acc)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32, VF]),
                                                f"llvm.vector.reduce.fadd.v{n_lanes}f32")
        return builder.call(reduce, [ir.Constant(F32, 0.0), builder.load(acc)], fastmath=("fast",))

    return codegen


_CODEGENS: dict = {}


def literal_codegen(codegens: dict, make, literals):
    """The lowering of an intrinsic compiled once per value of its literal integer arguments: make(*values)
    → codegen, kept in `codegens`; None (no typing) unless every one of `literals` is an IntegerLiteral."""
    if not all(isinstance(t, types.IntegerLiteral) for t in literals):
        return None
    key = tuple(t.literal_value for t in literals)
    if key not in codegens:
        codegens[key] = make(*key)
    codegen = codegens[key]

    def lowered(context, builder, signature, args):
        return codegen(context, builder, signature, args)

    return lowered


@intrinsic
def block_dot(typingctx, p, x_high, x_low, dx, wscale, n_vectors, corr_a, corr_b, n_corr, bits, units_per_block,
              blocks_per_vector, blocks_per_group):
    """See the module doc. p uint8, x_high and x_low int8, dx, wscale, corr_a and corr_b float32: 1-D
    C-contiguous; n_vectors and n_corr (a multiple of CORR_PAD) integers."""
    literals = (bits, units_per_block, blocks_per_vector, blocks_per_group)
    lowered = literal_codegen(_CODEGENS, _make_block_dot, literals)
    if lowered is None or not isinstance(n_vectors, types.Integer) or not isinstance(n_corr, types.Integer):
        return None
    return types.float32(p, x_high, x_low, dx, wscale, n_vectors, corr_a, corr_b, n_corr, *literals), lowered


# -- scalar helpers of the kernels' unpacking loops (32-bit integer ops: Numba would widen to 64 bits) --------
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
