// Fused dequantize + GEMV for the `affine` scheme at batch 1:  y = W·x (+ residual).
//
// Entry points: gemv_affine_b{B}_g{G} for B ∈ {2,3,4,5,6,8}, G ∈ {32,64,128}, all with this signature:
//
//   (const uint32_t* qweight,     (out, n_packs·B)            packed codes
//    const uint8_t*  scale_codes, (out, n_groups)
//    const half_t*   scale_meta,  (ceil(out·n_groups/128), 2) fp16 (step, min)
//    const uint8_t*  zero_codes,  (out, n_groups)
//    const half_t*   zero_meta,   (ceil(out·n_groups/128), 2)
//    const uint32_t* row_ptr,     (out + 1,)  CSR outliers, or NULL when the tensor has none
//    const uint16_t* cols,        (nnz,)      or NULL
//    const half_t*   vals,        (nnz,)      or NULL
//    const float*    x,           (in,)
//    const float*    residual,    (out,)      added to the result, or NULL; may equal y (y += W·x)
//    float*          y,           (out,)
//    int out_features, int in_features)
//
//   block = (32·k, 1, 1) for k = 1..8 warps (256 recommended), grid = (ceil(out / (k·4)), 1, 1).
//
// Work split: each warp owns GEMV_ROWS_PER_WARP = 4 consecutive rows; lane l takes packs l, l+32, …
// of those rows, so a warp reads 32 consecutive packs of a row per step (coalesced, 4·B bytes per
// lane with the widest aligned vector load) and every packed weight byte is read exactly once.
// The activation is staged per block in shared memory in tiles of 128 packs (4096 floats, 16 KiB),
// zero beyond in_features (so padding codes never contribute). Each lane copies the 32 activations
// of its pack into registers once (eight conflict-free 16-byte shared loads: chunk c of pack p sits
// at slot (c + p) mod 8) and reuses them for its 4 rows. Per pack and row:
//   s·(Σ q·x − z·Σ x)   with q → float by exponent injection (no I2F), fp32 accumulate.
// Outliers are fused (lanes stride over the row's CSR entries), then one transposed butterfly
// reduces the 4 row sums with 6 shuffles and lanes 0, 8, 16, 24 store rows 0..3.
// Rows past out_features (last block) compute a clamped copy and are never stored.
#include "affine.cuh"

namespace mxq {

constexpr int GEMV_ROWS_PER_WARP = 4;
constexpr int GEMV_TILE_PACKS = 128;
constexpr int GEMV_MAX_THREADS = 256;
// Occupancy hint for ptxas: 3 resident 256-thread blocks per SM (≤ 80 registers per thread, 24
// warps to hide DRAM latency); 8-bit packs (and 4-bit ones with sm_90's code generation) would
// spill at 80 registers, so 2 blocks (≤ 128 registers) there. tools/kernel_report.py checks.
__host__ __device__ constexpr int gemv_min_blocks(int bits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return bits == 8 || bits == 4 ? 2 : 3;
#else
    return bits == 8 ? 2 : 3;
#endif
}

template <int B, int G>
__device__ __forceinline__ void gemv_affine(
    const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint8_t* __restrict__ zero_codes,
    const half_t* __restrict__ zero_meta, const uint32_t* __restrict__ row_ptr,
    const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, const float* __restrict__ x,
    const float* residual, float* y, int out_features, int in_features) {
    constexpr int PACKS_PER_GROUP = G / CODES_PER_PACK;
    constexpr int RPW = GEMV_ROWS_PER_WARP;
    __shared__ float4 x_tile[GEMV_TILE_PACKS * 8];  // swizzled: pack p, chunk c → slot p·8 + (c + p) % 8

    const int n_groups = (in_features + G - 1) / G;
    const int n_packs = n_groups * PACKS_PER_GROUP;
    const size_t words_per_row = (size_t)n_packs * B;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int row0 = (blockIdx.x * n_warps + warp) * RPW;
    const bool warp_active = row0 < out_features;

    const uint32_t* row_words[RPW];
    size_t meta_base[RPW];
    warp_rows<RPW>(qweight, words_per_row, n_groups, row0, out_features, row_words, meta_base);
    float acc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[i] = 0.0f;

    for (int tile = 0; tile < n_packs; tile += GEMV_TILE_PACKS) {
        const int tile_packs = min(GEMV_TILE_PACKS, n_packs - tile);
        if (tile > 0) __syncthreads();  // every warp is done with the previous tile
        stage_x_packs(x_tile, x, tile, tile_packs, in_features);
        __syncthreads();
        if (warp_active) {
            for (int pl = lane; pl < tile_packs; pl += 32) {
                float xv[CODES_PER_PACK];
                load_x_pack(x_tile, pl, xv);
                float xsum = 0.0f;
#pragma unroll
                for (int j = 0; j < CODES_PER_PACK; ++j) xsum += xv[j];
                const int p = tile + pl;
                const int group = p / PACKS_PER_GROUP;
                uint32_t w[RPW][B];
#pragma unroll
                for (int i = 0; i < RPW; ++i) load_pack<B>(row_words[i], p, w[i]);
#pragma unroll
                for (int i = 0; i < RPW; ++i) {
                    const float s = decode_meta(scale_codes, scale_meta, meta_base[i] + group);
                    const float z = decode_meta(zero_codes, zero_meta, meta_base[i] + group);
                    const float dot = pack_dot<B>(w[i], xv);
                    acc[i] = fmaf(s, fmaf(-z, xsum, dot), acc[i]);
                }
            }
        }
    }

    if (!warp_active) return;  // no barrier follows
    add_csr_outliers<RPW>(acc, lane, row0, out_features, row_ptr, cols, vals, x);
    static_assert(RPW == 4, "store_4rows (common.cuh) is written for 4 rows per warp");
    store_4rows(acc, lane, row0, out_features, residual, y);
}

}  // namespace mxq

#define MXQ_GEMV_ENTRY(B, G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(mxq::GEMV_MAX_THREADS, mxq::gemv_min_blocks(B)) gemv_affine_b##B##_g##G(                \
        const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ scale_codes,                          \
        const half_t* __restrict__ scale_meta, const uint8_t* __restrict__ zero_codes,                          \
        const half_t* __restrict__ zero_meta, const uint32_t* __restrict__ row_ptr,                             \
        const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, const float* __restrict__ x,       \
        const float* residual, float* y, int out_features, int in_features) {                                  \
        mxq::gemv_affine<B, G>(qweight, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr, cols, vals, x, \
                               residual, y, out_features, in_features);                                        \
    }

MXQ_FOR_EACH_AFFINE_CONFIG(MXQ_GEMV_ENTRY)
