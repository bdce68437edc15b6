// The `trellis` scheme on the device (format_spec/SPEC.md §13; NumPy reference: format_spec/trellis.py):
//   W[r, c] = scale[r, c / g] · table[window(r, c)],   window(r, c) = (stream_r >> (c·K)) mod 2^12
// Each row is one bit stream read least significant bit first: word j of the row (qweight (out, W)) holds
// stream bits 32j … 32j + 31. Weight c reads the 12-bit window at stream bit c·K (K = bits, 2..5), which
// indexes the file's table of 4096 fp16 levels for K (the `codebook` blob: the same bytes for every tensor
// with that K). A row's stream holds 12 + (in − 1)·K bits padded to whole words, W = ceil((12 + (in − 1)·K) / 32)
// (layout.trellis_dims): no padding word, so a window near the row's end ends in its last word, and nothing
// past it may be read. The scales are double-quantized exactly as vq's (affine.cuh: decode_meta; uint8 codes
// (out, G), G = ceil(in / g), fp16 (step, min) per run of 128). No outliers.
//
// The unit of work is a *chunk* of 32 columns: chunk q's windows start at stream bits 32q·K … (32q + 31)·K,
// i.e. at word q·K, bit 0 — a chunk starts on a word boundary whatever K — and end at bit 31·K + 11 of it, so
// they lie in the K + 1 words [q·K, q·K + K] (the last one shared with chunk q + 1). Window j of the chunk is
// bits [j·K, j·K + 12) of those words: a compile-time shift after unrolling, a funnel shift where it straddles
// two words. As g ≥ 32, chunk q lies in one scale group (q·32 / g). Rows start at any word (W is any width),
// so the words are read one at a time (__ldg; neighbouring lanes read neighbouring words: coalesced), a word
// past the row's W reading as 0: only the last chunks' padding windows (columns ≥ in) touch those.
//
// gemv_trellis_b{K}, K ∈ {2, 3, 4, 5} — fused dequant + GEMV at batch 1: y = W·x (+ residual)
//   (const uint32_t* qweight,      (out, words_per_row)
//    const half_t*   codebook,     (4096, 1): the file's table for K; 16-byte aligned for the vector staging
//                                  loads (a 2-aligned one is staged with 2-byte loads)
//    const uint8_t*  scale_codes,  (out, G)
//    const half_t*   scale_meta,   (ceil(out·G / 128), 2)
//    const float* x,               (in,)
//    const float* residual,        (out,) or NULL; may equal y
//    float* y,                     (out,)
//    int out_features, int in_features,
//    int words_per_row,            qweight.shape[1]: W above
//    int group_size)               group_size ∈ {32, 64, 128}
//   block = (32·k, 1, 1) for k = 1..8 warps, grid = (ceil(out / (k·4)), 1, 1)  (registry.gemv_launch).
//
// The work split is gemv_vq's: each warp owns 4 consecutive rows, lane l takes chunks l, l+32, …, the
// activation is staged per block in swizzled shared-memory tiles of 64 chunks (8 KiB) and each lane copies its
// chunk's 32 activations into registers once for its 4 rows. The block first stages the table in shared memory
// as stored, fp16 (8 KiB: one 2-byte lookup per weight, widened in registers), so its static shared memory is
// 16 KiB: 3 blocks of 256 threads fit on every target, sm_75 included (TrellisMinBlocks). Per chunk and row:
//   acc_r += s · Σ_j table[window_j] · x_j      (two fp32 FMA chains of 16, then one FMA)
// with s the chunk's decoded scale. Padding columns of the last chunk see x = 0 (a non-finite table level
// there still propagates, as a padding level does in gemv_lut and gemv_vq). The transposed butterfly
// (common.cuh) reduces the 4 row sums.
//
// dequant_trellis_b{K}_f32 — rows of W as fp32, for prefill GEMMs and the quantized embedding gather;
// bit-exact with format_spec.trellis.dequantize_trellis (one fp32 multiply level · scale). Staging the 8 KiB
// table per row (one block per row) would cost more than the row itself (in·K / 8 bytes), so, as vq's 12-bit
// dequant, threads stride the row's columns (coalesced stores), each reading its window's word(s) and its fp16
// level straight from the table (__ldg, L1/L2-resident):
//   (qweight, codebook, scale_codes, scale_meta,
//    const int32_t* row_ids (n_rows,) or NULL, float* out (n_rows, ld_out),
//    int n_rows, int out_features, int in_features, int ld_out, int words_per_row, int group_size)
//   block = (32·k, 1, 1), k = 1..4, grid = (n_rows, 1, 1)  (registry.dequant_launch). A row id outside
//   [0, out_features) yields a zero row.
#include "affine.cuh"

namespace mxq {

constexpr int TRELLIS_WINDOW_BITS = 12;  // L: a window indexes a table of 2^L levels
constexpr uint32_t TRELLIS_WINDOW_MASK = (1u << TRELLIS_WINDOW_BITS) - 1u;
constexpr int TRELLIS_LEVELS = 1 << TRELLIS_WINDOW_BITS;
constexpr int TRELLIS_ROWS_PER_WARP = 4;
constexpr int TRELLIS_TILE_CHUNKS = 64;  // activation chunks (of 32 columns) staged per tile: 8 KiB
constexpr int TRELLIS_MAX_THREADS = 256;
// Occupancy hint for ptxas: 3 resident 256-thread blocks per SM (≤ 80 registers), which the block's 16 KiB of
// static shared memory allows on every target; K = 5 (6 words a chunk and row) spills at 80 registers on sm_75
// and sm_80 and gets 2 (≤ 128 registers).
template <int K> struct TrellisMinBlocks { static constexpr int value = K < 5 ? 3 : 2; };
constexpr int TRELLIS_DEQUANT_MAX_THREADS = 128;

// The table (4096 fp16) into shared memory as stored; every thread of the block calls it (the caller places
// the barrier). 16-byte loads when the table is 16-byte aligned (the file's and the device's are), else 2-byte.
__device__ __forceinline__ void stage_trellis_table(uint4* table, const half_t* __restrict__ codebook) {
    if ((reinterpret_cast<size_t>(codebook) & 15) == 0) {  // 512 loads: 2 per thread at 256 threads
        const uint4* src = reinterpret_cast<const uint4*>(codebook);
        for (int i = threadIdx.x; i < TRELLIS_LEVELS / 8; i += blockDim.x) table[i] = __ldg(src + i);
    } else {  // only 2-byte aligned (never from the file, whose blobs are 64-aligned)
        const unsigned short* src = reinterpret_cast<const unsigned short*>(codebook);
        unsigned short* dst = reinterpret_cast<unsigned short*>(table);
        for (int i = threadIdx.x; i < TRELLIS_LEVELS; i += blockDim.x) dst[i] = __ldg(src + i);
    }
}

// The K + 1 words [q·K, q·K + K] of chunk q of a row of words_per_row words; the words past the row read as 0.
template <int K>
__device__ __forceinline__ void load_trellis_chunk(const uint32_t* __restrict__ row, int q, int words_per_row,
                                                   uint32_t (&w)[K + 1]) {
    const int first = q * K;
#pragma unroll
    for (int i = 0; i <= K; ++i) w[i] = first + i < words_per_row ? __ldg(row + first + i) : 0u;
}

// Window j (0..31) of a chunk held in registers: bits [j·K, j·K + 12); j must be a compile-time constant
// after unrolling.
template <int K>
__device__ __forceinline__ uint32_t chunk_window(const uint32_t (&w)[K + 1], int j) {
    const int bit = j * K, wi = bit >> 5, sh = bit & 31;
    if (sh + TRELLIS_WINDOW_BITS <= 32) return (w[wi] >> sh) & TRELLIS_WINDOW_MASK;
    return __funnelshift_r(w[wi], w[wi + 1], sh) & TRELLIS_WINDOW_MASK;  // low bits in wi, high in wi + 1
}

// The window of column c of a row (dequant): its word, and the next one only where the window straddles into
// it — which then exists, as every column's window ends within the row's stream.
template <int K>
__device__ __forceinline__ uint32_t row_window(const uint32_t* __restrict__ row, int c) {
    const int bit = c * K, wi = bit >> 5, sh = bit & 31;
    const uint32_t lo = __ldg(row + wi);
    const uint32_t hi = sh + TRELLIS_WINDOW_BITS > 32 ? __ldg(row + wi + 1) : 0u;
    return __funnelshift_r(lo, hi, sh) & TRELLIS_WINDOW_MASK;
}

__device__ __forceinline__ float table_level(const uint4* table, uint32_t window) {
    return h2f_bits(reinterpret_cast<const unsigned short*>(table)[window]);
}

template <int K>
__device__ __forceinline__ void gemv_trellis(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const float* __restrict__ x, const float* residual, float* y,
    int out_features, int in_features, int words_per_row, int group_size) {
    constexpr int RPW = TRELLIS_ROWS_PER_WARP;
    constexpr int TILE = TRELLIS_TILE_CHUNKS;
    __shared__ float4 x_tile[TILE * 8];              // swizzled: chunk q, slot k → unit q·8 + (k + q) % 8
    __shared__ uint4 table[TRELLIS_LEVELS / 8];      // (4096,) fp16, 16-byte units for the staging loads

    const int n_groups = (in_features + group_size - 1) / group_size;
    const int n_chunks = (in_features + CODES_PER_PACK - 1) / CODES_PER_PACK;
    const int chunk_shift = __ffs(group_size) - 6;  // log2(group_size / 32)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int row0 = (blockIdx.x * n_warps + warp) * RPW;
    const bool warp_active = row0 < out_features;

    stage_trellis_table(table, codebook);
    const uint32_t* row_words[RPW];
    size_t meta_base[RPW];
    warp_rows<RPW>(qweight, words_per_row, n_groups, row0, out_features, row_words, meta_base);
    float acc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[i] = 0.0f;

    for (int tile = 0; tile < n_chunks; tile += TILE) {
        const int tile_chunks = min(TILE, n_chunks - tile);
        if (tile > 0) __syncthreads();  // every warp is done with the previous tile
        stage_x_packs(x_tile, x, tile, tile_chunks, in_features);
        __syncthreads();  // (the first one also publishes the table)
        if (warp_active) {
            for (int ql = lane; ql < tile_chunks; ql += 32) {
                float xv[CODES_PER_PACK];
                load_x_pack(x_tile, ql, xv);
                const int q = tile + ql;
                const int group = q >> chunk_shift;
#pragma unroll
                for (int i = 0; i < RPW; ++i) {
                    uint32_t w[K + 1];
                    load_trellis_chunk<K>(row_words[i], q, words_per_row, w);
                    const float s = decode_meta(scale_codes, scale_meta, meta_base[i] + group);
                    float even = 0.0f, odd = 0.0f;
#pragma unroll
                    for (int j = 0; j < CODES_PER_PACK; j += 2) {
                        even = fmaf(table_level(table, chunk_window<K>(w, j)), xv[j], even);
                        odd = fmaf(table_level(table, chunk_window<K>(w, j + 1)), xv[j + 1], odd);
                    }
                    acc[i] = fmaf(s, even + odd, acc[i]);
                }
            }
        }
    }

    if (!warp_active) return;  // no barrier follows
    static_assert(RPW == 4, "store_4rows (common.cuh) is written for 4 rows per warp");
    store_4rows(acc, lane, row0, out_features, residual, y);
}

// Thread t writes columns t, t + blockDim.x, … of the row (see the header).
template <int K>
__device__ __forceinline__ void dequant_trellis(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows,
    int out_features, int in_features, int ld_out, int words_per_row, int group_size) {
    const int n_groups = (in_features + group_size - 1) / group_size;
    const int group_shift = __ffs(group_size) - 1;  // log2(group_size)
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
    for (int c = threadIdx.x; c < in_features; c += blockDim.x) {
        const float s = decode_meta(scale_codes, scale_meta, meta_base + (c >> group_shift));
        dst[c] = __fmul_rn(load_f16(codebook, row_window<K>(row, c)), s);
    }
}

}  // namespace mxq

#define MXQ_TRELLIS_ENTRIES(K)                                                                                    \
    extern "C" __global__ void __launch_bounds__(mxq::TRELLIS_MAX_THREADS, mxq::TrellisMinBlocks<K>::value)       \
        gemv_trellis_b##K(const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,              \
                          const uint8_t* __restrict__ scale_codes, const half_t* __restrict__ scale_meta,         \
                          const float* __restrict__ x, const float* residual, float* y, int out_features,         \
                          int in_features, int words_per_row, int group_size) {                                   \
        mxq::gemv_trellis<K>(qweight, codebook, scale_codes, scale_meta, x, residual, y, out_features,            \
                             in_features, words_per_row, group_size);                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(mxq::TRELLIS_DEQUANT_MAX_THREADS) dequant_trellis_b##K##_f32(    \
        const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,                                \
        const uint8_t* __restrict__ scale_codes, const half_t* __restrict__ scale_meta,                           \
        const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows, int out_features,               \
        int in_features, int ld_out, int words_per_row, int group_size) {                                         \
        mxq::dequant_trellis<K>(qweight, codebook, scale_codes, scale_meta, row_ids, out, n_rows, out_features,   \
                                in_features, ld_out, words_per_row, group_size);                                  \
    }

MXQ_TRELLIS_ENTRIES(2) MXQ_TRELLIS_ENTRIES(3) MXQ_TRELLIS_ENTRIES(4) MXQ_TRELLIS_ENTRIES(5)
