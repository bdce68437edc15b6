// The `affine` scheme's device math (format_spec/SPEC.md §5.1, §6; NumPy reference:
// format_spec/affine.py `dequantize`).
//
//   qweight      uint32 (out, n_packs·B)   n_packs = n_groups·G/32; pack p of a row = words [p·B, p·B+B)
//   scale_codes  uint8  (out, n_groups)    s = code·step + min, (step, min) = fp16 scale_meta[i / 128]
//   zero_codes   uint8  (out, n_groups)    z likewise from zero_meta
//   W[r, c] = (q − z)·s,  then + outlier values (CSR: row_ptr uint32, cols uint16, values fp16)
//
// A pack is 32 codes in B words read as one little-endian bit string: code j is bits [j·B, j·B+B).
// Everything below is unrolled over the 32 codes with compile-time shifts; a code that straddles
// two words (B = 3, 5, 6) is taken with a 64-bit funnel shift, so no code needs a branch.
#pragma once
#include "common.cuh"

namespace mxq {

constexpr int CODES_PER_PACK = 32;
constexpr int META_RUN_SHIFT = 7;  // metadata runs of 128 values

// One double-quantized value (a group's scale or zero) at flat index i of the (out, n_groups) array.
// fp32 multiply then add, each rounded (no FMA contraction): bit-identical to decode_meta in NumPy.
__device__ __forceinline__ float decode_meta(const uint8_t* __restrict__ codes, const half_t* __restrict__ meta,
                                             size_t i) {
    const uint32_t step_min = __ldg(reinterpret_cast<const uint32_t*>(meta) + (i >> META_RUN_SHIFT));
    const float step = h2f_bits((unsigned short)(step_min & 0xffffu));
    const float low = h2f_bits((unsigned short)(step_min >> 16));
    return __fadd_rn(__fmul_rn((float)__ldg(codes + i), step), low);
}

// x staged in shared memory a tile of whole packs at a time (32 inputs each, zero past in_features),
// swizzled: pack p's 4-float chunk k sits at float4 slot p·8 + (k + p) % 8, so the 32 lanes of a warp,
// each reading its own pack's chunk k, spread over the banks. Every thread of the block calls
// stage_x_packs (the caller places the barriers); a lane reads its pack back with load_x_pack.
__device__ __forceinline__ void stage_x_packs(float4* x_tile, const float* __restrict__ x, int first_pack,
                                              int tile_packs, int in_features) {
    float* x_flat = reinterpret_cast<float*>(x_tile);
    for (int i = threadIdx.x; i < tile_packs * CODES_PER_PACK; i += blockDim.x) {
        const int c = first_pack * CODES_PER_PACK + i;
        const int p = i >> 5, j = i & 31;
        x_flat[((p << 3) + (((j >> 2) + p) & 7)) * 4 + (j & 3)] = c < in_features ? __ldg(x + c) : 0.0f;
    }
}

__device__ __forceinline__ void load_x_pack(const float4* x_tile, int p, float (&xv)[CODES_PER_PACK]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float4 v = x_tile[(p << 3) + ((k + p) & 7)];
        xv[4 * k] = v.x; xv[4 * k + 1] = v.y; xv[4 * k + 2] = v.z; xv[4 * k + 3] = v.w;
    }
}

// The packed words and the metadata base (row · n_groups) of a warp's RPW rows from row0 (gemv_affine, gemv_vq);
// rows past the end take the last row's: they compute a copy, never stored.
template <int RPW>
__device__ __forceinline__ void warp_rows(const uint32_t* __restrict__ qweight, size_t words_per_row, int n_groups,
                                          int row0, int out_features, const uint32_t* (&row_words)[RPW],
                                          size_t (&meta_base)[RPW]) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int r = min(row0 + i, out_features - 1);
        row_words[i] = qweight + (size_t)r * words_per_row;
        meta_base[i] = (size_t)r * n_groups;
    }
}

// The B words of pack p of a row, with the widest aligned vector loads the pack size allows
// (a pack is 4·B bytes: B = 4, 8 → 16-byte loads; B = 2, 6 → 8-byte; B = 3, 5 → 4-byte).
// Needs the qweight base 16-byte aligned (blobs are 64-aligned in the file, 256 on the device).
template <int B>
__device__ __forceinline__ void load_pack(const uint32_t* __restrict__ row, int p, uint32_t (&w)[B]) {
    const uint32_t* src = row + (size_t)p * B;
    if constexpr (B % 4 == 0) {
#pragma unroll
        for (int i = 0; i < B / 4; ++i) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else if constexpr (B % 2 == 0) {
#pragma unroll
        for (int i = 0; i < B / 2; ++i) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(src) + i);
            w[2 * i] = v.x; w[2 * i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < B; ++i) w[i] = __ldg(src + i);
    }
}

// Code j of a pack held in registers; j must be a compile-time constant after unrolling.
template <int B>
__device__ __forceinline__ uint32_t pack_code(const uint32_t (&w)[B], int j) {
    constexpr uint32_t MASK = (1u << B) - 1u;
    const int bit = j * B, wi = bit >> 5, sh = bit & 31;
    if (sh + B <= 32) return (w[wi] >> sh) & MASK;
    return __funnelshift_r(w[wi], w[wi + 1], sh) & MASK;  // low bits in word wi, high bits in wi + 1
}

// Code at runtime position j of a pack (used only for the few outlier positions).
template <int B>
__device__ __forceinline__ uint32_t pack_code_dynamic(const uint32_t* __restrict__ pack_words, int j) {
    constexpr uint32_t MASK = (1u << B) - 1u;
    const int bit = j * B, wi = bit >> 5, sh = bit & 31;
    const uint32_t lo = __ldg(pack_words + wi);
    const uint32_t hi = (sh + B > 32) ? __ldg(pack_words + wi + 1) : 0u;
    return __funnelshift_r(lo, hi, sh) & MASK;
}

// Exact uint → float for codes < 2^23 without an I2F instruction (I2F is quarter rate on most
// GPUs): 0x4B000000 | q is the float 2^23 + q.
__device__ __forceinline__ float code_to_float(uint32_t q) {
    return __uint_as_float(0x4B000000u | q) - 8388608.0f;
}

// Σ_j q_j · x_j over the 32 codes of a pack (two accumulators for instruction-level parallelism).
template <int B>
__device__ __forceinline__ float pack_dot(const uint32_t (&w)[B], const float (&x)[CODES_PER_PACK]) {
    float even = 0.0f, odd = 0.0f;
#pragma unroll
    for (int j = 0; j < CODES_PER_PACK; j += 2) {
        even = fmaf(code_to_float(pack_code<B>(w, j)), x[j], even);
        odd = fmaf(code_to_float(pack_code<B>(w, j + 1)), x[j + 1], odd);
    }
    return even + odd;
}

}  // namespace mxq

// Instantiate MACRO(B, G) for every supported (bits, group size): 6 × 3 = 18 configs.
#define MXQ_FOR_EACH_AFFINE_CONFIG(MACRO) \
    MACRO(2, 32) MACRO(2, 64) MACRO(2, 128) \
    MACRO(3, 32) MACRO(3, 64) MACRO(3, 128) \
    MACRO(4, 32) MACRO(4, 64) MACRO(4, 128) \
    MACRO(5, 32) MACRO(5, 64) MACRO(5, 128) \
    MACRO(6, 32) MACRO(6, 64) MACRO(6, 128) \
    MACRO(8, 32) MACRO(8, 64) MACRO(8, 128)
