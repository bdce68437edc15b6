// GEMV for fp16 matrices at batch 1:  y = W·x (+ residual), fp32 accumulate.
//
// What it is for: the fp16 tensors a .mxq file keeps unquantized (e.g. SmolLM2's tied 49152×576
// embedding, used as the lm_head: the largest single read of a decode step). Decode reads the fp16
// data itself, 2 bytes per weight, once; no fp32 copy of the matrix exists.
//
//   gemv_f16(const half_t* W,        (out, in) row-major IEEE binary16
//            const float*  x,        (in,)
//            const float*  residual, (out,) added to the result, or NULL; may equal y (y += W·x)
//            float*        y,        (out,)
//            int out_features, int in_features)
//
//   block = (32·k, 1, 1) for k = 1..8 warps (256 recommended), grid = (ceil(out / (k·4)), 1, 1):
//   the geometry of gemv_affine_* (kernels/registry.py: gemv_launch).
//
// Work split (as gemv_affine.cu): each warp owns GEMV_F16_ROWS_PER_WARP = 4 consecutive rows; a row is
// read in chunks of 8 weights (16 bytes), lane l takes chunks l, l+32, … of its 4 rows, so a warp reads
// 512 consecutive bytes of a row per step (one 16-byte vector load per lane and row: coalesced, 4
// independent loads in flight per lane) and every weight byte is read exactly once.
// The activation is staged per block in shared memory in tiles of 512 chunks (4096 floats, 16 KiB),
// zero beyond in_features, split in halves so that the two 16-byte shared loads of a chunk are
// conflict-free across the warp: chunk k's x[8k..8k+3] at slot k, x[8k+4..8k+7] at slot TILE + k.
// Each lane loads a chunk's 8 activations once and reuses them for its 4 rows; fp16 → fp32 by cvt
// (exact), fp32 FMA accumulation. One transposed butterfly reduces the 4 row sums with 6 shuffles
// (common.cuh: warp_sum_4rows); lanes 0, 8, 16, 24 store rows 0..3.
//
// Vector loads need every row 16-byte aligned: W's base 16-byte aligned (file blobs are 64-aligned,
// CuPy allocations 256) and in_features a multiple of 8 (every real model's hidden sizes). Any other
// matrix takes the same loop with 2-byte loads bounded by in_features (one uniform branch per launch,
// so odd shapes are correct, only slower). Rows past out_features (last block) compute a clamped copy
// and are never stored.
#include "common.cuh"

namespace mxq {

constexpr int GEMV_F16_ROWS_PER_WARP = 4;
constexpr int GEMV_F16_TILE_CHUNKS = 512;  // 8 weights per chunk
constexpr int GEMV_F16_MAX_THREADS = 256;
// Occupancy hint for ptxas: 4 resident 256-thread blocks per SM (≤ 64 registers per thread, 32 warps;
// 4 × 16 KiB of shared memory fits every target, sm_75's 64 KiB included). tools/kernel_report.py checks.
constexpr int GEMV_F16_MIN_BLOCKS = 4;

// Weights 8k .. 8k+7 of a row as 4 words, two binary16 values each (the lower column in the low half).
template <bool VEC>
__device__ __forceinline__ uint4 load_chunk_f16(const half_t* __restrict__ row, int k, int in_features) {
    if constexpr (VEC) {
        return __ldg(reinterpret_cast<const uint4*>(row) + k);
    } else {
        const unsigned short* p = reinterpret_cast<const unsigned short*>(row);
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = 8 * k + 2 * j;
            const uint32_t lo = c < in_features ? __ldg(p + c) : 0u;  // never past the row: W may hold inf
            const uint32_t hi = c + 1 < in_features ? __ldg(p + c + 1) : 0u;
            w[j] = lo | (hi << 16);
        }
        uint4 v;
        v.x = w[0]; v.y = w[1]; v.z = w[2]; v.w = w[3];
        return v;
    }
}

__device__ __forceinline__ float lo_f16(uint32_t w) { return h2f_bits((unsigned short)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f16(uint32_t w) { return h2f_bits((unsigned short)(w >> 16)); }

// acc + Σ_j W_j·x_j over one chunk; a = x[8k..8k+3], b = x[8k+4..8k+7].
__device__ __forceinline__ float dot_chunk_f16(const uint4 w, const float4 a, const float4 b, float acc) {
    acc = fmaf(lo_f16(w.x), a.x, acc);
    acc = fmaf(hi_f16(w.x), a.y, acc);
    acc = fmaf(lo_f16(w.y), a.z, acc);
    acc = fmaf(hi_f16(w.y), a.w, acc);
    acc = fmaf(lo_f16(w.z), b.x, acc);
    acc = fmaf(hi_f16(w.z), b.y, acc);
    acc = fmaf(lo_f16(w.w), b.z, acc);
    acc = fmaf(hi_f16(w.w), b.w, acc);
    return acc;
}

template <bool VEC>
__device__ __forceinline__ void gemv_f16_rows(float4* x_tile, const half_t* __restrict__ W,
                                              const float* __restrict__ x, const float* residual, float* y,
                                              int out_features, int in_features) {
    constexpr int RPW = GEMV_F16_ROWS_PER_WARP;
    constexpr int TILE = GEMV_F16_TILE_CHUNKS;
    const int n_chunks = (in_features + 7) >> 3;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int row0 = (blockIdx.x * n_warps + warp) * RPW;
    const bool warp_active = row0 < out_features;

    const half_t* rows[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int r = min(row0 + i, out_features - 1);  // rows past the end compute a copy, never stored
        rows[i] = W + (size_t)r * in_features;
    }
    float acc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[i] = 0.0f;

    float* x_flat = reinterpret_cast<float*>(x_tile);
    for (int tile = 0; tile < n_chunks; tile += TILE) {
        const int tile_chunks = min(TILE, n_chunks - tile);
        if (tile > 0) __syncthreads();  // every warp is done with the previous tile
        for (int i = threadIdx.x; i < tile_chunks * 8; i += blockDim.x) {
            const int c = tile * 8 + i;
            const int k = i >> 3, j = i & 7;
            x_flat[((j >> 2) * TILE + k) * 4 + (j & 3)] = c < in_features ? __ldg(x + c) : 0.0f;
        }
        __syncthreads();
        if (warp_active) {
            for (int kl = lane; kl < tile_chunks; kl += 32) {
                const float4 a = x_tile[kl], b = x_tile[TILE + kl];
                uint4 w[RPW];
#pragma unroll
                for (int i = 0; i < RPW; ++i) w[i] = load_chunk_f16<VEC>(rows[i], tile + kl, in_features);
#pragma unroll
                for (int i = 0; i < RPW; ++i) acc[i] = dot_chunk_f16(w[i], a, b, acc[i]);
            }
        }
    }

    if (!warp_active) return;  // no barrier follows
    static_assert(RPW == 4, "store_4rows (common.cuh) is written for 4 rows per warp");
    store_4rows(acc, lane, row0, out_features, residual, y);
}

}  // namespace mxq

extern "C" __global__ void __launch_bounds__(mxq::GEMV_F16_MAX_THREADS, mxq::GEMV_F16_MIN_BLOCKS) gemv_f16(
    const half_t* __restrict__ W, const float* __restrict__ x, const float* residual, float* y, int out_features,
    int in_features) {
    __shared__ float4 x_tile[2 * mxq::GEMV_F16_TILE_CHUNKS];
    // Uniform over the launch: every block takes the same path, so the barriers inside match.
    const bool vec = (in_features & 7) == 0 && (reinterpret_cast<size_t>(W) & 15) == 0;
    if (vec)
        mxq::gemv_f16_rows<true>(x_tile, W, x, residual, y, out_features, in_features);
    else
        mxq::gemv_f16_rows<false>(x_tile, W, x, residual, y, out_features, in_features);
}
