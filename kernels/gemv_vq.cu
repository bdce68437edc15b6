// The `vq` scheme on the device (format_spec/SPEC.md §12; NumPy reference: format_spec/vq.py):
//   W[r, c] = scale[r, c / g] · codebook[index[r, c / D], c % D]   (+ CSR outliers)
// Every D consecutive inputs of a row form a vector whose K = B·D-bit index picks one of the tensor's
// 2^K codebook points (fp16, D coordinates each). Indices are packed exactly like affine codes with
// K bits (affine.cuh), a row's V = ceil(in / D) indices in W = words_per_row words (qweight's width, from
// the host): up to format 1.7 padded to whole packs of 32 (W = ceil(V / 32)·K), from 1.8 only to whole
// words (SPEC §12.1: W = ceil(V / u)·u·K / 32, u = 32 / gcd(K, 32)), so that the last pack may hold fewer
// than K words. The scales are double-quantized exactly as affine's (affine.cuh: decode_meta; uint8 codes
// (out, G), G = ceil(in / g), fp16 (step, min) per run of 128).
//
// The unit of work is a *chunk* of 32 columns = 32 / D vectors: their 32·B index bits are exactly
// words [q·B, q·B + B) of the row (a pack is D chunks; 32·B-bit chunks start on word boundaries) and,
// as g ≥ 32, chunk q lies in one scale group (q·32 / g). Chunks past in_features (the tail of the last
// pack) are never touched. When B divides W (pack-padded rows, B = 3, and word-padded ones with
// in % 32 == 0) every chunk of a row is whole and 4·B-byte aligned, so chunk q is loaded like a B-bit
// affine pack (load_pack<B>: 8-byte loads for B = 2, 16-byte for B = 4). Otherwise (word-padded rows,
// B = 2 or 4, in % 32 ≠ 0) rows start misaligned for those vector loads and a row's last chunk is
// partial (1 .. B − 1 of its words exist): such a matrix takes one-word loads, a word past the row's W
// reading as 0 (padding indices 0, as the writer's). No kernel reads past a row's W words.
//
// gemv_vq_b{B}_d{D}, (B, D) ∈ {(2,2), (3,2), (4,2), (2,4), (3,4)} — fused dequant + GEMV at batch 1: y = W·x (+ residual)
//   (const uint32_t* qweight,      (out, words_per_row)
//    const half_t*   codebook,     (2^K, D); K = 12: 16-byte aligned for the vector staging loads
//                                  (a 2-aligned one is staged with 2-byte loads)
//    const uint8_t*  scale_codes,  (out, G)
//    const half_t*   scale_meta,   (ceil(out·G / 128), 2)
//    const uint32_t* row_ptr, const uint16_t* cols, const half_t* vals,   CSR outliers or all NULL
//    const float* x,               (in,)
//    const float* residual,        (out,) or NULL; may equal y
//    float* y,                     (out,)
//    int out_features, int in_features,
//    int words_per_row,            qweight.shape[1]: W above (either layout)
//    int group_size)               group_size ∈ {32, 64, 128}
//   block = (32·k, 1, 1) for k = 1..8 warps, grid = (ceil(out / (k·4)), 1, 1)  (registry.gemv_launch).
//
// The work split is gemv_lut's with chunks for packs: each warp owns 4 consecutive rows, lane l takes
// chunks l, l+32, … (coalesced vector loads, every index byte read once), the activation is staged
// per block in swizzled shared-memory tiles of 128 chunks (16 KiB) and each lane copies its chunk's
// 32 activations into registers once for its 4 rows. The block first stages the codebook in shared
// memory (VqBook): for K ≤ 8 widened to fp32 (2^K points of D floats: at most 256·4 floats = 4 KiB; one
// float2 / float4 load per vector); for K = 12 (b3d4: 4096 points, the shared codebooks of format 1.7)
// as stored, fp16 (32 KiB, one 8-byte load per vector, its 4 coordinates widened in registers), with
// x tiles of 64 chunks (8 KiB) so that the block's static shared memory is 40 KiB (< 48 KiB on every
// target; occupancy is then bounded by shared memory: 1 block per SM on sm_75, 2 on sm_86/89, and the
// 3 of VQ_MIN_BLOCKS on sm_80/87/90). Per chunk and row:
//   acc_r += s · Σ_v point[index_v] · x_v      (two fp32 FMA chains of 16, then one FMA)
// with s the chunk's decoded scale. Padding columns of the last chunk see x = 0 (a non-finite codebook
// coordinate there still propagates, as a padding level does in gemv_lut). Outliers are fused,
// then the transposed butterfly (common.cuh) reduces the 4 row sums.
//
// dequant_vq_b{B}_d{D}_f32 — rows of W (outliers included) as fp32, for prefill GEMMs and the quantized
// embedding gather; bit-exact with format_spec.vq.dequantize_vq (one fp32 multiply point · scale, an
// outlier one fp32 add more). K ≤ 8: the codebook widened in shared memory and a tile of chunks per
// thread, as in dequant_lut; K = 12: staging a 32 KiB codebook per row (one block per row) would cost
// far more than the row itself, so threads stride the row's columns (coalesced stores), each reading
// its vector's index (pack_code_dynamic) and its fp16 coordinate straight from the codebook (__ldg,
// L1/L2-resident):
//   (qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals,
//    const int32_t* row_ids (n_rows,) or NULL, float* out (n_rows, ld_out),
//    int n_rows, int out_features, int in_features, int ld_out, int words_per_row, int group_size)
//   block = (32·k, 1, 1), k = 1..4, grid = (n_rows, 1, 1)  (registry.dequant_launch). A row id outside
//   [0, out_features) yields a zero row.
#include "affine.cuh"

namespace mxq {

constexpr int VQ_ROWS_PER_WARP = 4;
constexpr int VQ_TILE_CHUNKS = 128;  // activation chunks (of 32 columns) staged per tile
constexpr int VQ_MAX_THREADS = 256;
// Occupancy hint for ptxas: 3 resident 256-thread blocks per SM (≤ 80 registers; no spills on any target,
// tools/kernel_report.py), and ≤ 20.5 KiB of shared memory per block fits 3 blocks even on sm_75 (b3d4's
// 40 KiB do not: its occupancy is bounded by shared memory, see above).
constexpr int VQ_MIN_BLOCKS = 3;
constexpr int VQ_DEQUANT_MAX_THREADS = 128;
constexpr int VQ_WIDE_INDEX_BITS = 12;  // b3d4: the fp16 codebook stays fp16 in shared memory

// One codebook point in registers: D fp32 coordinates.
template <int D> struct VqPoint;
template <> struct VqPoint<2> { typedef float2 type; };
template <> struct VqPoint<4> { typedef float4 type; };

// The codebook in shared memory, per index width K and dimension D: `Stored` is one point's shared-memory
// form, stage() fills it (every thread of the block calls it; the caller places the barrier), point()
// reads point i into registers with one vector load. TILE_CHUNKS: the GEMV's x tile, sized so that the
// block's static shared memory stays under 48 KiB.
template <int K, int D>
struct VqBook {  // K ≤ 8: widened to fp32 once, 2^K·D·4 bytes ≤ 4 KiB
    typedef typename VqPoint<D>::type Stored;
    static constexpr int TILE_CHUNKS = VQ_TILE_CHUNKS;
    __device__ static void stage(Stored* book, const half_t* __restrict__ codebook) {
        float* flat = reinterpret_cast<float*>(book);
        for (int i = threadIdx.x; i < (1 << K) * D; i += blockDim.x) flat[i] = load_f16(codebook, i);
    }
    __device__ static Stored point(const Stored* book, uint32_t i) { return book[i]; }
    __device__ static float coordinate(const Stored* book, uint32_t i, int k) {
        return reinterpret_cast<const float*>(book)[i * D + k];
    }
};

template <>
struct VqBook<VQ_WIDE_INDEX_BITS, 4> {  // 4096 points of 4 fp16: 32 KiB as stored, 8 bytes per point
    typedef uint2 Stored;
    static constexpr int TILE_CHUNKS = VQ_TILE_CHUNKS / 2;  // 8 KiB of x: 40 KiB in all
    static constexpr int N_WORDS = (1 << VQ_WIDE_INDEX_BITS) * 4 / 2;  // 32-bit words of the codebook
    __device__ static void stage(Stored* book, const half_t* __restrict__ codebook) {
        if ((reinterpret_cast<size_t>(codebook) & 15) == 0) {  // 16-byte loads: 8 per thread at 256 threads
            const uint4* src = reinterpret_cast<const uint4*>(codebook);
            uint4* dst = reinterpret_cast<uint4*>(book);
            for (int i = threadIdx.x; i < N_WORDS / 4; i += blockDim.x) dst[i] = __ldg(src + i);
        } else {  // only 2-byte aligned (never from the file, whose blobs are 64-aligned)
            const unsigned short* src = reinterpret_cast<const unsigned short*>(codebook);
            unsigned short* dst = reinterpret_cast<unsigned short*>(book);
            for (int i = threadIdx.x; i < 2 * N_WORDS; i += blockDim.x) dst[i] = __ldg(src + i);
        }
    }
    __device__ static float4 point(const Stored* book, uint32_t i) {
        const uint2 p = book[i];
        float4 f;
        f.x = h2f_bits((unsigned short)(p.x & 0xffffu));
        f.y = h2f_bits((unsigned short)(p.x >> 16));
        f.z = h2f_bits((unsigned short)(p.y & 0xffffu));
        f.w = h2f_bits((unsigned short)(p.y >> 16));
        return f;
    }
};

// log2(group_size / 32): chunk q lies in scale group q >> vq_chunk_shift (group_size ∈ {32, 64, 128}).
__device__ __forceinline__ int vq_chunk_shift(int group_size) { return __ffs(group_size) - 6; }

// Index v (0 .. 32/D − 1) of a chunk held in registers (B words, K-bit indices, little-endian bit
// string as in pack_code); v must be a compile-time constant after unrolling.
template <int K, int B>
__device__ __forceinline__ uint32_t chunk_index(const uint32_t (&w)[B], int v) {
    constexpr uint32_t MASK = (1u << K) - 1u;
    const int bit = v * K, wi = bit >> 5, sh = bit & 31;
    if (sh + K <= 32) return (w[wi] >> sh) & MASK;
    return __funnelshift_r(w[wi], w[wi + 1], sh) & MASK;  // 6-, 12-bit indices: low bits in wi, high in wi + 1
}

// The B words of chunk q of a row of words_per_row words: WHOLE (B divides words_per_row: every chunk whole and
// 4·B-byte aligned) with load_pack's vector loads, else one word at a time, the words past the row as 0.
template <int B, bool WHOLE>
__device__ __forceinline__ void load_chunk(const uint32_t* __restrict__ row, int q, int words_per_row,
                                           uint32_t (&w)[B]) {
    if constexpr (WHOLE) {
        load_pack<B>(row, q, w);
    } else {
        const int n = words_per_row - q * B;  // the chunk's words in the row: B but in the row's last chunk
#pragma unroll
        for (int i = 0; i < B; ++i) w[i] = 0u;
#pragma unroll
        for (int i = 0; i < B && i < n; ++i) w[i] = __ldg(row + q * B + i);
    }
}

// a0 / a1 += the point's coordinates · x[0 .. D), alternating between the two chains.
__device__ __forceinline__ void point_fma(const float2 pt, const float* xv, float& a0, float& a1) {
    a0 = fmaf(pt.x, xv[0], a0);
    a1 = fmaf(pt.y, xv[1], a1);
}
__device__ __forceinline__ void point_fma(const float4 pt, const float* xv, float& a0, float& a1) {
    a0 = fmaf(pt.x, xv[0], a0);
    a1 = fmaf(pt.y, xv[1], a1);
    a0 = fmaf(pt.z, xv[2], a0);
    a1 = fmaf(pt.w, xv[3], a1);
}

// dst[0 .. D) = point · s, each one fp32 rounding (the reference's).
__device__ __forceinline__ void store_scaled(float* dst, const float2 pt, float s) {
    dst[0] = __fmul_rn(pt.x, s);
    dst[1] = __fmul_rn(pt.y, s);
}
__device__ __forceinline__ void store_scaled(float* dst, const float4 pt, float s) {
    dst[0] = __fmul_rn(pt.x, s);
    dst[1] = __fmul_rn(pt.y, s);
    dst[2] = __fmul_rn(pt.z, s);
    dst[3] = __fmul_rn(pt.w, s);
}

// gemv_vq's tile loop for one chunk layout (load_chunk<B, WHOLE>): acc[i] += row i's chunks · x, lane l taking
// chunks l, l + 32, … of every tile (x_tile and book: gemv_vq's shared memory).
template <int B, int D, bool WHOLE>
__device__ __forceinline__ void gemv_vq_tiles(
    float4* x_tile, const typename VqBook<B * D, D>::Stored* book, const uint32_t* const (&row_words)[VQ_ROWS_PER_WARP],
    const size_t (&meta_base)[VQ_ROWS_PER_WARP], const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const float* __restrict__ x, int in_features, int words_per_row,
    int chunk_shift, bool warp_active, float (&acc)[VQ_ROWS_PER_WARP]) {
    constexpr int K = B * D;                 // index bits
    typedef VqBook<K, D> Book;
    constexpr int VPC = CODES_PER_PACK / D;  // vectors per chunk
    constexpr int RPW = VQ_ROWS_PER_WARP;
    constexpr int TILE = Book::TILE_CHUNKS;
    const int n_chunks = (in_features + CODES_PER_PACK - 1) / CODES_PER_PACK;
    const int lane = threadIdx.x & 31;

    for (int tile = 0; tile < n_chunks; tile += TILE) {
        const int tile_chunks = min(TILE, n_chunks - tile);
        if (tile > 0) __syncthreads();  // every warp is done with the previous tile
        stage_x_packs(x_tile, x, tile, tile_chunks, in_features);
        __syncthreads();  // (the first one also publishes the codebook)
        if (warp_active) {
            for (int ql = lane; ql < tile_chunks; ql += 32) {
                float xv[CODES_PER_PACK];
                load_x_pack(x_tile, ql, xv);
                const int q = tile + ql;
                const int group = q >> chunk_shift;
#pragma unroll
                for (int i = 0; i < RPW; ++i) {
                    uint32_t w[B];
                    load_chunk<B, WHOLE>(row_words[i], q, words_per_row, w);  // chunk q: words [q·B, q·B + B)
                    const float s = decode_meta(scale_codes, scale_meta, meta_base[i] + group);
                    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
                    for (int v = 0; v < VPC; ++v)
                        point_fma(Book::point(book, chunk_index<K, B>(w, v)), xv + v * D, a0, a1);
                    acc[i] = fmaf(s, a0 + a1, acc[i]);
                }
            }
        }
    }
}

template <int B, int D>
__device__ __forceinline__ void gemv_vq(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols,
    const half_t* __restrict__ vals, const float* __restrict__ x, const float* residual, float* y, int out_features,
    int in_features, int words_per_row, int group_size) {
    typedef VqBook<B * D, D> Book;
    constexpr int N_POINTS = 1 << (B * D);
    constexpr int RPW = VQ_ROWS_PER_WARP;
    __shared__ float4 x_tile[Book::TILE_CHUNKS * 8];  // swizzled: chunk q, slot k → unit q·8 + (k + q) % 8
    __shared__ typename Book::Stored book[N_POINTS];  // (2^K, D): fp32, or fp16 for K = 12

    const int n_groups = (in_features + group_size - 1) / group_size;
    const int chunk_shift = vq_chunk_shift(group_size);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int row0 = (blockIdx.x * n_warps + warp) * RPW;
    const bool warp_active = row0 < out_features;

    Book::stage(book, codebook);
    const uint32_t* row_words[RPW];
    size_t meta_base[RPW];
    warp_rows<RPW>(qweight, words_per_row, n_groups, row0, out_features, row_words, meta_base);
    float acc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[i] = 0.0f;
    if (words_per_row % B == 0)  // the same layout for every row of the matrix
        gemv_vq_tiles<B, D, true>(x_tile, book, row_words, meta_base, scale_codes, scale_meta, x, in_features,
                                  words_per_row, chunk_shift, warp_active, acc);
    else
        gemv_vq_tiles<B, D, false>(x_tile, book, row_words, meta_base, scale_codes, scale_meta, x, in_features,
                                   words_per_row, chunk_shift, warp_active, acc);

    if (!warp_active) return;  // no barrier follows
    add_csr_outliers<RPW>(acc, lane, row0, out_features, row_ptr, cols, vals, x);
    static_assert(RPW == 4, "store_4rows (common.cuh) is written for 4 rows per warp");
    store_4rows(acc, lane, row0, out_features, residual, y);
}

// K ≤ 8: the codebook widened in shared memory, a chunk per thread (see the header).
template <int B, int D>
__device__ __forceinline__ void dequant_vq_staged(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols,
    const half_t* __restrict__ vals, const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows,
    int out_features, int in_features, int ld_out, int words_per_row, int group_size) {
    constexpr int K = B * D;
    typedef VqBook<K, D> Book;
    constexpr int N_POINTS = 1 << K;
    constexpr int VPC = CODES_PER_PACK / D;
    __shared__ typename Book::Stored book[N_POINTS];
    __shared__ float tile[VQ_DEQUANT_MAX_THREADS * (CODES_PER_PACK + 1)];  // thread t's chunk: [t·33, t·33 + 32)

    const int n_chunks = (in_features + CODES_PER_PACK - 1) / CODES_PER_PACK;
    const int n_groups = (in_features + group_size - 1) / group_size;
    const int chunk_shift = vq_chunk_shift(group_size);
    const bool whole = words_per_row % B == 0;  // load_chunk's layout
    const int out_row = blockIdx.x;
    if (out_row >= n_rows) return;  // uniform over the block
    const int r = row_ids != nullptr ? __ldg(row_ids + out_row) : out_row;
    float* dst = out + (size_t)out_row * ld_out;
    if (r < 0 || r >= out_features) {
        for (int c = threadIdx.x; c < in_features; c += blockDim.x) dst[c] = 0.0f;
        return;
    }
    Book::stage(book, codebook);
    const uint32_t* row = qweight + (size_t)r * words_per_row;
    const size_t meta_base = (size_t)r * n_groups;
    // Tiles of blockDim.x chunks, decoded into shared memory (row stride 33: conflict-free), then
    // written out coalesced, as in dequant_lut.
    for (int q0 = 0; q0 < n_chunks; q0 += blockDim.x) {
        __syncthreads();  // the codebook is in place; the previous tile is written out
        const int q = q0 + threadIdx.x;
        if (q < n_chunks) {
            uint32_t w[B];
            if (whole)
                load_chunk<B, true>(row, q, words_per_row, w);
            else
                load_chunk<B, false>(row, q, words_per_row, w);
            const float s = decode_meta(scale_codes, scale_meta, meta_base + (q >> chunk_shift));
            float* t = tile + threadIdx.x * (CODES_PER_PACK + 1);
#pragma unroll
            for (int v = 0; v < VPC; ++v) store_scaled(t + v * D, Book::point(book, chunk_index<K, B>(w, v)), s);
        }
        __syncthreads();
        const int c0 = q0 * CODES_PER_PACK;
        const int n_cols = min((int)blockDim.x * CODES_PER_PACK, in_features - c0);
        for (int i = threadIdx.x; i < n_cols; i += blockDim.x)
            dst[c0 + i] = tile[(i >> 5) * (CODES_PER_PACK + 1) + (i & 31)];
    }
    if (row_ptr == nullptr) return;
    __syncthreads();  // the plain values are written before the outliers overwrite theirs
    const uint32_t end = __ldg(row_ptr + r + 1);
    for (uint32_t e = __ldg(row_ptr + r) + threadIdx.x; e < end; e += blockDim.x) {
        const int c = __ldg(cols + e);
        const int v = c / D;  // vector v: index v % 32 of pack v / 32
        const uint32_t index = pack_code_dynamic<K>(row + (size_t)(v / CODES_PER_PACK) * K, v % CODES_PER_PACK);
        const float s = decode_meta(scale_codes, scale_meta, meta_base + (c >> (5 + chunk_shift)));
        dst[c] = __fadd_rn(__fmul_rn(Book::coordinate(book, index, c % D), s), load_f16(vals, e));
    }
}

// K = 12: no staging; thread t writes columns t, t + blockDim.x, … of the row (see the header).
template <int B, int D>
__device__ __forceinline__ void dequant_vq_direct(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols,
    const half_t* __restrict__ vals, const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows,
    int out_features, int in_features, int ld_out, int words_per_row, int group_size) {
    constexpr int K = B * D;
    const int n_groups = (in_features + group_size - 1) / group_size;
    const int group_shift = 5 + vq_chunk_shift(group_size);  // log2(group_size)
    const int out_row = blockIdx.x;
    if (out_row >= n_rows) return;  // uniform over the block
    const int r = row_ids != nullptr ? __ldg(row_ids + out_row) : out_row;
    float* dst = out + (size_t)out_row * ld_out;
    if (r < 0 || r >= out_features) {
        for (int c = threadIdx.x; c < in_features; c += blockDim.x) dst[c] = 0.0f;
        return;
    }
    const uint32_t* row = qweight + (size_t)r * words_per_row;
    const size_t meta_base = (size_t)r * n_groups;
    // The value of column c without its outlier: D neighbouring threads share the vector's index (a
    // 12-bit index may straddle two words of its pack) and read neighbouring coordinates of one point.
    auto plain = [&](int c) {
        const int v = c / D;  // vector v: index v % 32 of pack v / 32
        const uint32_t index = pack_code_dynamic<K>(row + (size_t)(v / CODES_PER_PACK) * K, v % CODES_PER_PACK);
        const float s = decode_meta(scale_codes, scale_meta, meta_base + (c >> group_shift));
        return __fmul_rn(load_f16(codebook, (size_t)index * D + c % D), s);
    };
    for (int c = threadIdx.x; c < in_features; c += blockDim.x) dst[c] = plain(c);
    if (row_ptr == nullptr) return;
    __syncthreads();  // the plain values are written before the outliers overwrite theirs
    const uint32_t end = __ldg(row_ptr + r + 1);
    for (uint32_t e = __ldg(row_ptr + r) + threadIdx.x; e < end; e += blockDim.x) {
        const int c = __ldg(cols + e);
        dst[c] = __fadd_rn(plain(c), load_f16(vals, e));
    }
}

template <int B, int D>
__device__ __forceinline__ void dequant_vq(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols,
    const half_t* __restrict__ vals, const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows,
    int out_features, int in_features, int ld_out, int words_per_row, int group_size) {
    if constexpr (B * D == VQ_WIDE_INDEX_BITS)
        dequant_vq_direct<B, D>(qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals, row_ids, out, n_rows,
                                out_features, in_features, ld_out, words_per_row, group_size);
    else
        dequant_vq_staged<B, D>(qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals, row_ids, out, n_rows,
                                out_features, in_features, ld_out, words_per_row, group_size);
}

}  // namespace mxq

#define MXQ_VQ_ENTRIES(B, D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(mxq::VQ_MAX_THREADS, mxq::VQ_MIN_BLOCKS) gemv_vq_b##B##_d##D(    \
        const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,                                \
        const uint8_t* __restrict__ scale_codes, const half_t* __restrict__ scale_meta,                           \
        const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, \
        const float* __restrict__ x, const float* residual, float* y, int out_features, int in_features,          \
        int words_per_row, int group_size) {                                                                      \
        mxq::gemv_vq<B, D>(qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals, x, residual, y,       \
                           out_features, in_features, words_per_row, group_size);                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(mxq::VQ_DEQUANT_MAX_THREADS) dequant_vq_b##B##_d##D##_f32(       \
        const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,                                \
        const uint8_t* __restrict__ scale_codes, const half_t* __restrict__ scale_meta,                           \
        const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, \
        const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows, int out_features,               \
        int in_features, int ld_out, int words_per_row, int group_size) {                                         \
        mxq::dequant_vq<B, D>(qweight, codebook, scale_codes, scale_meta, row_ptr, cols, vals, row_ids, out,      \
                              n_rows, out_features, in_features, ld_out, words_per_row, group_size);              \
    }

MXQ_VQ_ENTRIES(2, 2) MXQ_VQ_ENTRIES(3, 2) MXQ_VQ_ENTRIES(4, 2) MXQ_VQ_ENTRIES(2, 4) MXQ_VQ_ENTRIES(3, 4)
