// The `lut` scheme on the device (format_spec/SPEC.md §7; NumPy reference: format_spec/lut.py):
//   W[r, c] = codebook[r / codebook_rows, q[r, c]]  (fp16 levels, 2^B per codebook), + CSR outliers.
// Codes are packed exactly like affine codes (affine.cuh: load_pack, pack_code); each row holds
// n_packs = ceil(in / 32) packs of B words.
//
// gemv_lut_b{B}, B ∈ {2,3,4,5,6,8} — fused LUT dequant + GEMV at batch 1:  y = W·x (+ residual)
//   (const uint32_t* qweight,   (out, n_packs·B)
//    const half_t*   codebook,  (ceil(out / codebook_rows), 2^B)
//    const uint32_t* row_ptr, const uint16_t* cols, const half_t* vals,   CSR outliers or all NULL
//    const float* x,            (in,)
//    const float* residual,     (out,) or NULL; may equal y
//    float* y,                  (out,)
//    int out_features, int in_features, int codebook_rows)
//   block = (32·k, 1, 1) for k = 1..8 warps, grid = (ceil(out / (k·4)), 1, 1)  (registry.gemv_launch).
//
// The work split is gemv_affine's: each warp owns 4 consecutive rows, lane l takes packs l, l+32, …
// (coalesced vector loads, every packed byte read once), the activation is staged per block in
// swizzled shared-memory tiles of 128 packs. New here: the block first widens the codebooks of its
// (at most 32) rows to fp32 in shared memory (32·2^B floats: 32 KiB at B = 8, which with the 16 KiB
// activation tile is the 48 KiB static limit), so a weight is one shared-memory lookup:
//   acc_r += Σ_j level_r[code_j] · x_j      (fp32 FMA chain per pack, two accumulators)
// Outliers are fused, then the transposed butterfly (common.cuh) reduces the 4 row sums.
//
// dequant_lut_b{B}_f32 — rows of W (outliers included) as fp32, for prefill GEMMs and the quantized
// embedding gather; bit-exact with format_spec.lut.dequantize_lut:
//   (qweight, codebook, row_ptr, cols, vals, const int32_t* row_ids (n_rows,) or NULL,
//    float* out (n_rows, ld_out), int n_rows, int out_features, int in_features, int ld_out,
//    int codebook_rows)
//   block = (32·k, 1, 1), k = 1..4, grid = (n_rows, 1, 1)  (registry.dequant_launch). A row id outside
//   [0, out_features) yields a zero row.
#include "affine.cuh"

namespace mxq {

constexpr int LUT_ROWS_PER_WARP = 4;
constexpr int LUT_TILE_PACKS = 128;
constexpr int LUT_MAX_THREADS = 256;
constexpr int LUT_MAX_ROWS = LUT_MAX_THREADS / 32 * LUT_ROWS_PER_WARP;  // rows per block
constexpr int LUT_DEQUANT_MAX_THREADS = 128;

template <int B>
__device__ __forceinline__ void gemv_lut(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint32_t* __restrict__ row_ptr,
    const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, const float* __restrict__ x,
    const float* residual, float* y, int out_features, int in_features, int codebook_rows) {
    constexpr int K = 1 << B;
    constexpr int RPW = LUT_ROWS_PER_WARP;
    __shared__ float4 x_tile[LUT_TILE_PACKS * 8];  // swizzled: pack p, chunk c → slot p·8 + (c + p) % 8
    __shared__ float levels[LUT_MAX_ROWS * K];     // row i of the block → levels[i·K, i·K + K)

    const int n_packs = (in_features + CODES_PER_PACK - 1) / CODES_PER_PACK;
    const size_t words_per_row = (size_t)n_packs * B;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int block_row0 = blockIdx.x * n_warps * RPW;
    const int row0 = block_row0 + warp * RPW;
    const bool warp_active = row0 < out_features;

    for (int i = threadIdx.x; i < n_warps * RPW * K; i += blockDim.x) {
        const int r = min(block_row0 + i / K, out_features - 1);  // rows past the end: a copy, never stored
        levels[i] = load_f16(codebook, (size_t)(r / codebook_rows) * K + (i % K));
    }
    const uint32_t* row_words[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) row_words[i] = qweight + (size_t)min(row0 + i, out_features - 1) * words_per_row;
    const float* row_levels = levels + warp * RPW * K;
    float acc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[i] = 0.0f;

    for (int tile = 0; tile < n_packs; tile += LUT_TILE_PACKS) {
        const int tile_packs = min(LUT_TILE_PACKS, n_packs - tile);
        if (tile > 0) __syncthreads();  // every warp is done with the previous tile
        stage_x_packs(x_tile, x, tile, tile_packs, in_features);
        __syncthreads();  // (the first one also publishes the levels)
        if (warp_active) {
            for (int pl = lane; pl < tile_packs; pl += 32) {
                float xv[CODES_PER_PACK];
                load_x_pack(x_tile, pl, xv);
                const int p = tile + pl;
#pragma unroll
                for (int i = 0; i < RPW; ++i) {
                    uint32_t w[B];
                    load_pack<B>(row_words[i], p, w);
                    const float* lv = row_levels + i * K;
                    float even = 0.0f, odd = 0.0f;
#pragma unroll
                    for (int j = 0; j < CODES_PER_PACK; j += 2) {
                        even = fmaf(lv[pack_code<B>(w, j)], xv[j], even);
                        odd = fmaf(lv[pack_code<B>(w, j + 1)], xv[j + 1], odd);
                    }
                    acc[i] += even + odd;
                }
            }
        }
    }

    if (!warp_active) return;  // no barrier follows
    add_csr_outliers<RPW>(acc, lane, row0, out_features, row_ptr, cols, vals, x);
    static_assert(RPW == 4, "store_4rows (common.cuh) is written for 4 rows per warp");
    store_4rows(acc, lane, row0, out_features, residual, y);
}

template <int B>
__device__ __forceinline__ void dequant_lut(
    const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook, const uint32_t* __restrict__ row_ptr,
    const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, const int32_t* __restrict__ row_ids,
    float* __restrict__ out, int n_rows, int out_features, int in_features, int ld_out, int codebook_rows) {
    constexpr int K = 1 << B;
    __shared__ float levels[K];
    __shared__ float tile[LUT_DEQUANT_MAX_THREADS * (CODES_PER_PACK + 1)];
    const int n_packs = (in_features + CODES_PER_PACK - 1) / CODES_PER_PACK;
    const int out_row = blockIdx.x;
    if (out_row >= n_rows) return;  // uniform over the block
    const int r = row_ids != nullptr ? __ldg(row_ids + out_row) : out_row;
    float* dst = out + (size_t)out_row * ld_out;
    if (r < 0 || r >= out_features) {
        for (int c = threadIdx.x; c < in_features; c += blockDim.x) dst[c] = 0.0f;
        return;
    }
    const half_t* book = codebook + (size_t)(r / codebook_rows) * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) levels[k] = load_f16(book, k);
    const uint32_t* row = qweight + (size_t)r * n_packs * B;
    // Tiles of blockDim.x packs, decoded into shared memory (row stride 33: conflict-free), then
    // written out coalesced, as in dequant_affine.cu.
    for (int p0 = 0; p0 < n_packs; p0 += blockDim.x) {
        __syncthreads();  // the levels are in place; the previous tile is written out
        const int p = p0 + threadIdx.x;
        if (p < n_packs) {
            uint32_t w[B];
            load_pack<B>(row, p, w);
#pragma unroll
            for (int j = 0; j < CODES_PER_PACK; ++j) tile[threadIdx.x * (CODES_PER_PACK + 1) + j] = levels[pack_code<B>(w, j)];
        }
        __syncthreads();
        const int c0 = p0 * CODES_PER_PACK;
        const int n_cols = min((int)blockDim.x * CODES_PER_PACK, in_features - c0);
        for (int i = threadIdx.x; i < n_cols; i += blockDim.x) dst[c0 + i] = tile[(i >> 5) * (CODES_PER_PACK + 1) + (i & 31)];
    }
    if (row_ptr == nullptr) return;
    __syncthreads();  // the plain values are written before the outliers overwrite theirs
    const uint32_t end = __ldg(row_ptr + r + 1);
    for (uint32_t e = __ldg(row_ptr + r) + threadIdx.x; e < end; e += blockDim.x) {
        const int c = __ldg(cols + e);
        const int p = c / CODES_PER_PACK;
        const float level = levels[pack_code_dynamic<B>(row + (size_t)p * B, c % CODES_PER_PACK)];
        dst[c] = __fadd_rn(level, load_f16(vals, e));
    }
}

}  // namespace mxq

#define MXQ_LUT_ENTRIES(B)                                                                                        \
    extern "C" __global__ void __launch_bounds__(mxq::LUT_MAX_THREADS) gemv_lut_b##B(                              \
        const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,                                 \
        const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, \
        const float* __restrict__ x, const float* residual, float* y, int out_features, int in_features,           \
        int codebook_rows) {                                                                                     \
        mxq::gemv_lut<B>(qweight, codebook, row_ptr, cols, vals, x, residual, y, out_features, in_features,       \
                         codebook_rows);                                                                         \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(mxq::LUT_DEQUANT_MAX_THREADS) dequant_lut_b##B##_f32(            \
        const uint32_t* __restrict__ qweight, const half_t* __restrict__ codebook,                                 \
        const uint32_t* __restrict__ row_ptr, const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, \
        const int32_t* __restrict__ row_ids, float* __restrict__ out, int n_rows, int out_features,               \
        int in_features, int ld_out, int codebook_rows) {                                                        \
        mxq::dequant_lut<B>(qweight, codebook, row_ptr, cols, vals, row_ids, out, n_rows, out_features,           \
                            in_features, ld_out, codebook_rows);                                                 \
    }

MXQ_LUT_ENTRIES(2) MXQ_LUT_ENTRIES(3) MXQ_LUT_ENTRIES(4) MXQ_LUT_ENTRIES(5) MXQ_LUT_ENTRIES(6) MXQ_LUT_ENTRIES(8)
