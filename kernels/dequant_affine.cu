// Dequantize an `affine` tensor (or a gathered subset of its rows) to a dense fp32 / fp16 matrix on
// the device: the prefill path (dequantize once, then one cuBLAS GEMM for the whole prompt) and the
// quantized-embedding row gather (row_ids = token ids).
//
// Entry points: dequant_affine_b{B}_g{G}_f32 and dequant_affine_b{B}_g{G}_f16 (18 configs each):
//
//   (const uint32_t* qweight, const uint8_t* scale_codes, const half_t* scale_meta,
//    const uint8_t* zero_codes, const half_t* zero_meta,
//    const uint32_t* row_ptr, const uint16_t* cols, const half_t* vals,   CSR outliers or all NULL
//    const int32_t* row_ids,   (n_rows,) source row of each output row, or NULL for rows 0..n_rows-1
//    float* / half_t* out,     (n_rows, ld_out) row-major, columns [0, in_features) written
//    int n_rows, int out_features, int in_features, int ld_out)
//
//   block = (32·k, 1, 1) with k = 1..4 (128 recommended), grid = (n_rows, 1, 1): one block per output row.
//
// A block decodes blockDim.x packs at a time into shared memory and writes them out coalesced
// (consecutive threads, consecutive columns), then overwrites the row's outlier positions.
// Bit-exact with format_spec.affine.dequantize: s and z are decoded with separately rounded fp32
// multiply and add, W = (q − z)·s with a rounded subtract then multiply, and an outlier position is
// recomputed as fp32 W + v before the single rounding to the output dtype (so fp16 output equals
// dequantize(...).astype(float16)). A row id outside [0, out_features) yields a zero row.
#include "affine.cuh"

namespace mxq {

constexpr int DEQUANT_MAX_THREADS = 128;

template <int B, int G, typename OutT>
__device__ __forceinline__ void dequant_affine(
    const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ scale_codes,
    const half_t* __restrict__ scale_meta, const uint8_t* __restrict__ zero_codes,
    const half_t* __restrict__ zero_meta, const uint32_t* __restrict__ row_ptr,
    const uint16_t* __restrict__ cols, const half_t* __restrict__ vals, const int32_t* __restrict__ row_ids,
    OutT* __restrict__ out, int n_rows, int out_features, int in_features, int ld_out) {
    constexpr int PACKS_PER_GROUP = G / CODES_PER_PACK;
    const int n_groups = (in_features + G - 1) / G;
    const int n_packs = n_groups * PACKS_PER_GROUP;
    const size_t words_per_row = (size_t)n_packs * B;
    __shared__ float tile[DEQUANT_MAX_THREADS * (CODES_PER_PACK + 1)];
    const int out_row = blockIdx.x;
    if (out_row >= n_rows) return;  // uniform over the block
    const int r = row_ids != nullptr ? __ldg(row_ids + out_row) : out_row;
    OutT* dst = out + (size_t)out_row * ld_out;
    if (r < 0 || r >= out_features) {
        for (int c = threadIdx.x; c < in_features; c += blockDim.x) store_out(dst, c, 0.0f);
        return;
    }
    const uint32_t* row = qweight + (size_t)r * words_per_row;

    // Tiles of blockDim.x packs: thread t decodes pack t of the tile into shared memory (row stride 33
    // floats: conflict-free), then the block writes the tile out with consecutive threads on
    // consecutive columns (coalesced stores).
    for (int p0 = 0; p0 < n_packs; p0 += blockDim.x) {
        const int p = p0 + threadIdx.x;
        if (p < n_packs) {
            uint32_t w[B];
            load_pack<B>(row, p, w);
            const size_t mi = (size_t)r * n_groups + p / PACKS_PER_GROUP;
            const float s = decode_meta(scale_codes, scale_meta, mi);
            const float z = decode_meta(zero_codes, zero_meta, mi);
#pragma unroll
            for (int j = 0; j < CODES_PER_PACK; ++j)
                tile[threadIdx.x * (CODES_PER_PACK + 1) + j] = __fmul_rn(__fsub_rn(code_to_float(pack_code<B>(w, j)), z), s);
        }
        __syncthreads();
        const int c0 = p0 * CODES_PER_PACK;
        const int n_cols = min((int)blockDim.x * CODES_PER_PACK, in_features - c0);
        for (int i = threadIdx.x; i < n_cols; i += blockDim.x)
            store_out(dst, c0 + i, tile[(i >> 5) * (CODES_PER_PACK + 1) + (i & 31)]);
        __syncthreads();  // the tile is free again; and the plain values are written before the outliers
    }
    if (row_ptr == nullptr) return;  // uniform over the block; now overwrite the outlier positions
    const uint32_t end = __ldg(row_ptr + r + 1);
    for (uint32_t e = __ldg(row_ptr + r) + threadIdx.x; e < end; e += blockDim.x) {
        const int c = __ldg(cols + e);
        const int p = c / CODES_PER_PACK;
        const size_t mi = (size_t)r * n_groups + p / PACKS_PER_GROUP;
        const float s = decode_meta(scale_codes, scale_meta, mi);
        const float z = decode_meta(zero_codes, zero_meta, mi);
        const float q = code_to_float(pack_code_dynamic<B>(row + (size_t)p * B, c % CODES_PER_PACK));
        store_out(dst, c, __fadd_rn(__fmul_rn(__fsub_rn(q, z), s), load_f16(vals, e)));
    }
}

}  // namespace mxq

#define MXQ_DEQUANT_ENTRY_T(B, G, SUFFIX, OUT_T)                                                              \
    extern "C" __global__ void __launch_bounds__(mxq::DEQUANT_MAX_THREADS) dequant_affine_b##B##_g##G##_##SUFFIX(                    \
        const uint32_t* __restrict__ qweight, const uint8_t* __restrict__ scale_codes,                          \
        const half_t* __restrict__ scale_meta, const uint8_t* __restrict__ zero_codes,                          \
        const half_t* __restrict__ zero_meta, const uint32_t* __restrict__ row_ptr,                             \
        const uint16_t* __restrict__ cols, const half_t* __restrict__ vals,                                     \
        const int32_t* __restrict__ row_ids, OUT_T* __restrict__ out, int n_rows, int out_features,             \
        int in_features, int ld_out) {                                                                        \
        mxq::dequant_affine<B, G, OUT_T>(qweight, scale_codes, scale_meta, zero_codes, zero_meta, row_ptr,      \
                                         cols, vals, row_ids, out, n_rows, out_features, in_features, ld_out);  \
    }
#define MXQ_DEQUANT_ENTRY(B, G) MXQ_DEQUANT_ENTRY_T(B, G, f32, float) MXQ_DEQUANT_ENTRY_T(B, G, f16, half_t)

MXQ_FOR_EACH_AFFINE_CONFIG(MXQ_DEQUANT_ENTRY)
