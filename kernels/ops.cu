// The non-GEMV ops of a decoder step (Llama, Qwen, Gemma 3, Phi-3 families). Activations are fp32, the
// KV cache fp16 or fp32, norm weights fp32 (the backends keep 1-D tensors in fp32), embedding tables
// fp16 (as stored in the file). NumPy reference of the same math: runtime/backends/numpy_backend.py.
// Argument lists, shapes and launch geometry: kernels/registry.py.
#include "common.cuh"

namespace mxq {
constexpr int ATTN_MAX_HEAD_DIM = 256;
constexpr int ATTN_MAX_WARPS = 8;
constexpr int ATTN_PER_LANE = ATTN_MAX_HEAD_DIM / 32;
}  // namespace mxq

// ---------------------------------------------------------------------------------------------
// RMSNorm (as the numpy backend's rms_norm):  out[r, :] = weight · (x[r, :] · (1 / sqrt(mean(x[r, :]²) + eps)))
//   x, out (n_rows, dim) fp32 (out may equal x); weight (dim,) fp32 (the backends keep 1-D tensors in fp32).
//   grid = (n_rows), block = (32·k) with k = 1..32 (256 recommended).
extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_f32(const float* x, const float* __restrict__ weight, float* out, int dim, float eps) {
    __shared__ float scratch[33];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = mxq::block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __ldg(weight + i) * (xr[i] * inv);
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (rotate_half convention, as HF Llama/NeoX and the numpy backend's rope), with
// partial rotary (HF partial_rotary_factor: Phi-3, NeoX): only the first rotary_dim dims of each head
// rotate, dims rotary_dim .. head_dim − 1 pass through unchanged.
//   x viewed as (n_tokens, n_heads, head_dim) with token stride in_stride elements (head stride
//   head_dim), out likewise with out_stride (out may be x: in place). half = rotary_dim / 2
//   (rotary_dim even, ≤ head_dim), angle = float(positions[t]) · inv_freq[i] (fp32 product):
//     out[..., i]        = x[..., i]·cos(angle) − x[..., i + half]·sin(angle)      i < half
//     out[..., i + half] = x[..., i + half]·cos(angle) + x[..., i]·sin(angle)
//     out[..., d]        = x[..., d]                                                 rotary_dim ≤ d < head_dim
//   inv_freq (half,) fp32 is computed on the host (rope_theta and llama3/linear scaling live there).
//   One work item per rotated pair or passed-through dim: n = n_tokens·n_heads·(head_dim − half);
//   grid = (ceil(n / 256)), block = (256).
extern "C" __global__ void __launch_bounds__(1024)
rope_f32(const float* x, float* out, const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
         int n_tokens, int n_heads, int head_dim, int rotary_dim, int in_stride, int out_stride) {
    const int half = rotary_dim >> 1;
    const int per_head = head_dim - half;  // items per head: `half` pairs, then head_dim − rotary_dim copies
    const long long total = (long long)n_tokens * n_heads * per_head;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(k % per_head);
        const long long th = k / per_head;
        const int h = (int)(th % n_heads), t = (int)(th / n_heads);
        const float* v = x + (size_t)t * in_stride + (size_t)h * head_dim;
        float* o = out + (size_t)t * out_stride + (size_t)h * head_dim;
        if (i >= half) {  // pass-through dim d = i + half ≥ rotary_dim
            o[i + half] = v[i + half];
            continue;
        }
        const float angle = (float)__ldg(positions + t) * __ldg(inv_freq + i);
        float s, c;
        sincosf(angle, &s, &c);
        const float x1 = v[i], x2 = v[i + half];
        o[i] = x1 * c - x2 * s;
        o[i + half] = x2 * c + x1 * s;
    }
}

// ---------------------------------------------------------------------------------------------
// Causal grouped-query attention over the KV cache, for n_queries consecutive query tokens (1 at
// decode, the prompt at prefill), optionally with a sliding window — the numpy backend's attention
// after it has stored k and v:
//   q   (n_queries, n_heads·head_dim) fp32; query i sits at position p = kv_len − n_queries + i and
//       attends cache positions j with lo(p) ≤ j ≤ p, lo(p) = 0 (window = 0: full causal) or
//       max(0, p − window + 1) (window > 0: HF's sliding window, p − window < j ≤ p); head h reads
//       KV head h / (n_heads / n_kv_heads).
//   k_cache, v_cache (n_kv_heads, capacity, head_dim), fp16 (attention_f16kv) or fp32
//       (attention_f32kv), positions [0, kv_len) filled.
//   out (n_queries, n_heads·head_dim) fp32 = softmax(scale · q·kᵀ) · v, in fp32 with a running max
//       (online softmax: each key rescales the running sum and output by exp(m_old − m_new), so no
//       exp ever sees a positive argument).
//   The keys any query can see, [first_key, kv_len) with first_key = attention_first_key(...) (0 for
//   window = 0), are cut into splits of keys_per_split (flash-decoding): grid = (n_heads, n_splits,
//   n_queries), n_splits = ceil((kv_len − first_key) / keys_per_split) (registry.attention_launch).
//   With n_splits == 1 the result goes straight to `out` (part may be NULL); otherwise each block
//   writes (max, sum, unnormalized acc[head_dim]) to part (n_queries, n_heads, n_splits, head_dim + 2)
//   and attention_combine finishes. A split that holds none of a query's keys (past its causal limit,
//   or before its window at prefill) writes max = −inf, sum = 0, acc = 0.
//   block = (32·k), k = 1..8 (128 recommended); head_dim ≤ 256. Each warp takes every k-th key of the
//   split; lane l holds dims l, l+32, … of q and of its output accumulator.
namespace mxq {
__device__ __forceinline__ float load_kv(const half_t* __restrict__ p, size_t i) { return load_f16(p, i); }
__device__ __forceinline__ float load_kv(const float* __restrict__ p, size_t i) { return __ldg(p + i); }
__device__ __forceinline__ void store_kv(half_t* __restrict__ p, size_t i, float v) { store_f16(p, i, v); }
__device__ __forceinline__ void store_kv(float* __restrict__ p, size_t i, float v) { p[i] = v; }

// The first cache position any of the n_queries queries sees: the earliest query's window start.
__device__ __forceinline__ int attention_first_key(int kv_len, int n_queries, int window) {
    return window > 0 ? max(0, kv_len - n_queries + 1 - window) : 0;
}

template <typename KV>
__device__ __forceinline__ void attention(const float* __restrict__ q, const KV* __restrict__ k_cache,
                                          const KV* __restrict__ v_cache, float* __restrict__ out,
                                          float* __restrict__ part, int n_heads, int n_kv_heads, int head_dim,
                                          int n_queries, int kv_len, int capacity, int keys_per_split, float scale,
                                          int window) {
    __shared__ float sm_m[ATTN_MAX_WARPS], sm_l[ATTN_MAX_WARPS];
    __shared__ float sm_acc[ATTN_MAX_WARPS][ATTN_MAX_HEAD_DIM];
    const int head = blockIdx.x, split = blockIdx.y, qi = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int kv_head = head / (n_heads / n_kv_heads);
    const int pos = kv_len - n_queries + qi;  // this query's position: keys [lo, pos]
    const int lo = window > 0 ? max(0, pos - window + 1) : 0;
    const int split_begin = attention_first_key(kv_len, n_queries, window) + split * keys_per_split;
    const int k_begin = max(split_begin, lo);
    const int k_end = min(split_begin + keys_per_split, pos + 1);
    const size_t row = (size_t)qi * n_heads + head;

    float qr[ATTN_PER_LANE], acc[ATTN_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < head_dim ? q[row * head_dim + d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;
    const KV* kb = k_cache + (size_t)kv_head * capacity * head_dim;
    const KV* vb = v_cache + (size_t)kv_head * capacity * head_dim;
    for (int t = k_begin + warp; t < k_end; t += n_warps) {
        const size_t base = (size_t)t * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) s = fmaf(qr[i], load_kv(kb, base + d), s);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 for the first key (m = −inf)
        const float p = expf(s - m_new);
        l = fmaf(l, corr, p);
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = fmaf(acc[i], corr, p * load_kv(vb, base + d));
        }
        m = m_new;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) sm_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float m_all = neg_inf();
    for (int w = 0; w < n_warps; ++w) m_all = fmaxf(m_all, sm_m[w]);
    float l_all = 0.0f;
    for (int w = 0; w < n_warps; ++w)
        if (sm_m[w] != neg_inf()) l_all += sm_l[w] * expf(sm_m[w] - m_all);
    const int n_splits = gridDim.y;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < n_warps; ++w)
            if (sm_m[w] != neg_inf()) a += sm_acc[w][d] * expf(sm_m[w] - m_all);
        if (n_splits == 1) {
            out[row * head_dim + d] = l_all > 0.0f ? a / l_all : 0.0f;
        } else {
            part[(row * n_splits + split) * (head_dim + 2) + 2 + d] = a;
        }
    }
    if (n_splits > 1 && threadIdx.x == 0) {
        part[(row * n_splits + split) * (head_dim + 2)] = m_all;
        part[(row * n_splits + split) * (head_dim + 2) + 1] = l_all;
    }
}

// Store n_tokens new keys/values at cache positions start_pos .. start_pos + n_tokens − 1.
template <typename KV>
__device__ __forceinline__ void kv_store(const float* __restrict__ k, const float* __restrict__ v,
                                         KV* __restrict__ k_cache, KV* __restrict__ v_cache, int n_tokens,
                                         int n_kv_heads, int head_dim, int src_stride, int start_pos, int capacity) {
    const long long total = (long long)n_tokens * n_kv_heads * head_dim;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(e % head_dim);
        const long long th = e / head_dim;
        const int h = (int)(th % n_kv_heads), t = (int)(th / n_kv_heads);
        const size_t src = (size_t)t * src_stride + (size_t)h * head_dim + d;
        const size_t dst = ((size_t)h * capacity + start_pos + t) * head_dim + d;
        store_kv(k_cache, dst, k[src]);
        store_kv(v_cache, dst, v[src]);
    }
}
}  // namespace mxq

#define MXQ_ATTENTION_ENTRY(SUFFIX, KV)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) attention_##SUFFIX(                                       \
        const float* __restrict__ q, const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,           \
        float* __restrict__ out, float* __restrict__ part, int n_heads, int n_kv_heads, int head_dim,           \
        int n_queries, int kv_len, int capacity, int keys_per_split, float scale, int window) {                \
        mxq::attention<KV>(q, k_cache, v_cache, out, part, n_heads, n_kv_heads, head_dim, n_queries, kv_len,    \
                           capacity, keys_per_split, scale, window);                                          \
    }
MXQ_ATTENTION_ENTRY(f16kv, half_t)
MXQ_ATTENTION_ENTRY(f32kv, float)

// Merge the split partials: part (n_rows, n_splits, head_dim + 2) → out (n_rows, head_dim),
// n_rows = n_queries·n_heads. Splits outside a query's keys (past its causal limit, before its window)
// hold max = −inf and weigh nothing; every row has at least one key (its own position), so l_all > 0.
//   grid = (n_rows), block = (32·k), k = 1..8.
extern "C" __global__ void __launch_bounds__(256)
attention_combine(const float* __restrict__ part, float* __restrict__ out, int n_rows, int n_splits, int head_dim) {
    using mxq::neg_inf;
    const int row = blockIdx.x;
    if (row >= n_rows) return;
    const float* pr = part + (size_t)row * n_splits * (head_dim + 2);
    float m_all = neg_inf();
    for (int s = 0; s < n_splits; ++s) m_all = fmaxf(m_all, pr[(size_t)s * (head_dim + 2)]);
    float l_all = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float ms = pr[(size_t)s * (head_dim + 2)];
        if (ms != neg_inf()) l_all += pr[(size_t)s * (head_dim + 2) + 1] * expf(ms - m_all);
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            const float ms = pr[(size_t)s * (head_dim + 2)];
            if (ms != neg_inf()) a += pr[(size_t)s * (head_dim + 2) + 2 + d] * expf(ms - m_all);
        }
        out[(size_t)row * head_dim + d] = l_all > 0.0f ? a / l_all : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Write n_tokens new keys/values into the cache at positions start_pos .. start_pos + n_tokens − 1
// (the numpy backend's cache.k[:, start:start+T] = k.reshape(T, n_kv, hd).transpose(1, 0, 2)):
//   k, v (n_tokens, n_kv_heads·head_dim) fp32 with token stride src_stride elements (views into a
//   fused qkv buffer work); k_cache, v_cache (n_kv_heads, capacity, head_dim) fp16 (kv_store_f16,
//   round to nearest even) or fp32 (kv_store_f32).
//   grid = (ceil(n_tokens·n_kv_heads·head_dim / 256)), block = (256).
#define MXQ_KV_STORE_ENTRY(SUFFIX, KV)                                                                        \
    extern "C" __global__ void __launch_bounds__(1024) kv_store_##SUFFIX(                                       \
        const float* __restrict__ k, const float* __restrict__ v, KV* __restrict__ k_cache,                    \
        KV* __restrict__ v_cache, int n_tokens, int n_kv_heads, int head_dim, int src_stride, int start_pos,    \
        int capacity) {                                                                                       \
        mxq::kv_store<KV>(k, v, k_cache, v_cache, n_tokens, n_kv_heads, head_dim, src_stride, start_pos,        \
                          capacity);                                                                          \
    }
MXQ_KV_STORE_ENTRY(f16, half_t)
MXQ_KV_STORE_ENTRY(f32, float)

// ---------------------------------------------------------------------------------------------
// Gated MLP activations: out[r, c] = act(gate[r, c]) · up[r, c] with
//   silu_mul_f32 (SwiGLU: Llama, Qwen, Phi-3):  act(g) = silu(g) = g / (1 + exp(−g))
//   gelu_mul_f32 (GeGLU: Gemma, HF "gelu_pytorch_tanh"):
//                act(g) = 0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³)))
//   gate/up rows are in_stride elements apart (views into a fused gate_up buffer work), out rows
//   out_stride apart; out may alias gate. grid = (ceil(n_rows·n_cols / 256)), block = (256).
namespace mxq {
struct Silu {
    __device__ __forceinline__ float operator()(float g) const { return g / (1.0f + expf(-g)); }
};
struct GeluTanh {
    __device__ __forceinline__ float operator()(float g) const {
        const float k = 0.7978845608028654f;  // sqrt(2/π)
        return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
    }
};

template <typename Act>
__device__ __forceinline__ void gated(const float* gate, const float* up, float* out, int n_rows, int n_cols,
                                      int in_stride, int out_stride) {
    const Act act{};
    const long long total = (long long)n_rows * n_cols;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(e % n_cols), r = (int)(e / n_cols);
        const float g = gate[(size_t)r * in_stride + c];
        const float u = up[(size_t)r * in_stride + c];
        out[(size_t)r * out_stride + c] = act(g) * u;
    }
}
}  // namespace mxq

#define MXQ_GATED_ENTRY(NAME, ACT)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024) NAME(const float* gate, const float* up, float* out,    \
                                                           int n_rows, int n_cols, int in_stride,             \
                                                           int out_stride) {                                  \
        mxq::gated<ACT>(gate, up, out, n_rows, n_cols, in_stride, out_stride);                                 \
    }
MXQ_GATED_ENTRY(silu_mul_f32, mxq::Silu)
MXQ_GATED_ENTRY(gelu_mul_f32, mxq::GeluTanh)

// ---------------------------------------------------------------------------------------------
// Embedding gather from an fp16 table: out[t, :] = float(table[ids[t], :]); an id outside
// [0, vocab) gives a zero row. ids (n_tokens,) int32, table (vocab, dim) fp16, out (n_tokens, dim) fp32.
//   grid = (n_tokens), block = (32·k) (256 recommended).
extern "C" __global__ void __launch_bounds__(1024)
embedding_f16(const int32_t* __restrict__ ids, const half_t* __restrict__ table, float* __restrict__ out,
              int n_tokens, int dim, int vocab) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int id = __ldg(ids + t);
    float* o = out + (size_t)t * dim;
    const bool valid = id >= 0 && id < vocab;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        o[d] = valid ? mxq::load_f16(table, (size_t)id * dim + d) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Residual add: out = a + b (n elements fp32; out may alias a or b).
//   grid = (ceil(n / 256)), block = (256).
extern "C" __global__ void __launch_bounds__(1024) add_f32(const float* a, const float* b, float* out, int n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// ---------------------------------------------------------------------------------------------
// Scale by a constant: out = x · s (n elements fp32; out may alias x) — Gemma's embedding scale.
//   grid = (ceil(n / 256)), block = (256).
extern "C" __global__ void __launch_bounds__(1024) scale_f32(const float* x, float* out, int n, float s) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = x[i] * s;
}
