// Shared definitions for mxq's CUDA kernels.
//
// The kernels are compiled three ways from the same sources:
//   * NVRTC (the runtime loader and the compile checks), where no CUDA toolkit headers are assumed:
//     this header defines the few integer typedefs and an fp16 storage type itself, so the kernels
//     need neither <cuda_fp16.h> nor <cstdint> (the pip NVRTC wheel ships neither);
//   * nvcc, if someone wants to (same path as NVRTC);
//   * g++ with cuda_emu.h force-included (MXQ_EMULATION defined), for the CPU emulation harness.
//
// fp16 buffers are passed as `half_t*`: 2-byte IEEE binary16 storage. Arithmetic is always fp32;
// h2f/f2h convert (f2h rounds to nearest even, like numpy's astype(float16)).
#pragma once

#if defined(MXQ_EMULATION)
// cuda_emu.h (force-included by the emulator build) supplies <cstdint>, __half and the intrinsics.
typedef __half half_t;
__device__ __forceinline__ float h2f_bits(unsigned short bits) { return mxq_emu::half_bits_to_float(bits); }
__device__ __forceinline__ unsigned short f2h_bits(float f) { return mxq_emu::float_to_half_bits_rn(f); }
#else
#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif
struct __align__(2) half_t { unsigned short x; };
// cvt.f32.f16 / cvt.rn.f16.f32 exist on every target (sm_75 … sm_90). The emulation build uses the
// portable C++ conversions of cuda_emu.h instead (exact, round-to-nearest-even).
__device__ __forceinline__ float h2f_bits(unsigned short bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}
__device__ __forceinline__ unsigned short f2h_bits(float f) {
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f));
    return bits;
}
#endif

namespace mxq {

constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float load_f16(const half_t* __restrict__ p, size_t i) {
    return h2f_bits(__ldg(reinterpret_cast<const unsigned short*>(p) + i));
}

__device__ __forceinline__ void store_f16(half_t* __restrict__ p, size_t i, float v) {
    reinterpret_cast<unsigned short*>(p)[i] = f2h_bits(v);
}

// Output element stores for the two output dtypes of the dequant kernels.
__device__ __forceinline__ void store_out(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_out(half_t* p, size_t i, float v) { store_f16(p, i, v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Warp sums of 4 per-lane values (one per row) for the GEMVs' 4 rows per warp, by a transposed
// butterfly: halve the rows a lane carries at each of the first two steps, so the four row sums take
// 6 shuffles instead of 4 × 5. Returns, in lane l, the sum of row 2·bit4(l) + bit3(l): lanes 0, 8, 16,
// 24 hold rows 0, 1, 2, 3 (see gemv_row_of_lane).
__device__ __forceinline__ float warp_sum_4rows(const float (&acc)[4], int lane) {
    const bool hi16 = (lane & 16) != 0, hi8 = (lane & 8) != 0;
    float keep0 = hi16 ? acc[2] : acc[0], keep1 = hi16 ? acc[3] : acc[1];
    keep0 += __shfl_xor_sync(FULL_MASK, hi16 ? acc[0] : acc[2], 16);
    keep1 += __shfl_xor_sync(FULL_MASK, hi16 ? acc[1] : acc[3], 16);
    float v = hi8 ? keep1 : keep0;
    v += __shfl_xor_sync(FULL_MASK, hi8 ? keep0 : keep1, 8);
    v += __shfl_xor_sync(FULL_MASK, v, 4);
    v += __shfl_xor_sync(FULL_MASK, v, 2);
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v;
}

// The row (0..3) whose sum warp_sum_4rows leaves in `lane`; lanes with (lane & 7) == 0 store it.
__device__ __forceinline__ int gemv_row_of_lane(int lane) { return ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1); }

// The GEMVs' epilogue for a warp's 4 rows row0..row0+3: warp-sum the per-lane partial sums
// (warp_sum_4rows) and let lanes 0, 8, 16, 24 write rows 0..3, plus the fused residual when given.
__device__ __forceinline__ void store_4rows(const float (&acc)[4], int lane, int row0, int out_features,
                                            const float* residual, float* y) {
    const float v = warp_sum_4rows(acc, lane);
    if ((lane & 7) == 0) {
        const int r = row0 + gemv_row_of_lane(lane);
        if (r < out_features) y[r] = residual != nullptr ? v + residual[r] : v;
    }
}

// Adds the sparse fp16 outliers (CSR: row_ptr, cols, vals) of the warp's rows row0..row0+RPW-1 to the
// lanes' partial sums, the lanes striding each row's entries (none when row_ptr is null).
template <int RPW>
__device__ __forceinline__ void add_csr_outliers(float (&acc)[RPW], int lane, int row0, int out_features,
                                                 const uint32_t* __restrict__ row_ptr,
                                                 const uint16_t* __restrict__ cols, const half_t* __restrict__ vals,
                                                 const float* __restrict__ x) {
    if (row_ptr == nullptr) return;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int r = row0 + i;
        if (r < out_features) {
            const uint32_t end = __ldg(row_ptr + r + 1);
            for (uint32_t e = __ldg(row_ptr + r) + lane; e < end; e += 32)
                acc[i] = fmaf(load_f16(vals, e), __ldg(x + __ldg(cols + e)), acc[i]);
        }
    }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is 33 floats of shared memory. Starts with a barrier so it can be called repeatedly.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? scratch[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    return scratch[32];
}

}  // namespace mxq
