// cuda_emu.h — run mxq's CUDA C kernels on a CPU, exactly as written, for testing.
//
// Force-included (g++ -include cuda_emu.h) before a .cu file. It supplies the subset of CUDA the
// kernels use, with the semantics that matter for correctness:
//
//   * A launch runs the grid's blocks one after another; each block runs with blockDim real
//     std::threads (one pool per launch, reused block after block). threadIdx/blockIdx/blockDim/
//     gridDim are thread_local.
//   * __shared__ is `static`: one copy per kernel (per template instantiation), i.e. block-scoped
//     storage because blocks never overlap. Launches are serialized by a global mutex.
//   * __syncthreads() is a barrier over the block's threads. Threads that return early drop out of
//     it (as exited threads do on the hardware). A barrier that is not reached by all live threads
//     within MXQ_EMU_TIMEOUT_MS (default 20 s) breaks the launch with an error instead of hanging.
//   * Warp shuffles (__shfl_sync, __shfl_up/down/xor_sync), __ballot/__any/__all_sync and __syncwarp
//     go through a per-warp exchange buffer and a per-warp barrier: every lane writes its value,
//     waits, reads its source lane, waits. The mask must name every live lane of the warp (the
//     kernels only use full-warp collectives); a mask that omits a live lane or names an exited
//     lane is reported as an error.
//   * __half with exact conversions (round-to-nearest-even, subnormals, inf/nan), vector types,
//     __ldg (a load from an address off the type's alignment — a uint2 / uint4 / float4 off its
//     8 / 16 bytes — fails the launch, as it faults on the GPU), atomics (std::atomic_ref), the math
//     functions and intrinsics used (expf, rsqrtf, sincosf, __expf, fmaxf, __fmul_rn, __funnelshift_r,
//     __int_as_float, …).
//
// Built without FMA contraction (-ffp-contract=off): expressions round as written, which is what
// the bit-exact dequantization tests rely on (on the GPU the kernels use __fmul_rn/__fadd_rn there).
//
// MXQ_EMU_EXPORT(kernel) (used by the generated trampoline, see emulator.py) exports
//   int         mxq_emu_launch__<kernel>(const unsigned grid[3], const unsigned block[3], void** args)
//   const char* mxq_emu_sig__<kernel>()          e.g. "const u32*,const f16*,f32*,i32,f32"
// where args[i] points at the i-th argument's value, as with cudaLaunchKernel.
#pragma once
#define MXQ_EMULATION 1

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__) && !defined(MXQ_EMU_UCONTEXT)
#define MXQ_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __constant__ static

// ---- vector types ------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
#define MXQ_EMU_VEC2(T, N, A) struct alignas(A) N { T x, y; }; \
    inline N make_##N(T x, T y) { return N{x, y}; }
#define MXQ_EMU_VEC4(T, N, A) struct alignas(A) N { T x, y, z, w; }; \
    inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
MXQ_EMU_VEC2(float, float2, 8)
MXQ_EMU_VEC4(float, float4, 16)
MXQ_EMU_VEC2(int, int2, 8)
MXQ_EMU_VEC4(int, int4, 16)
MXQ_EMU_VEC2(unsigned, uint2, 8)
MXQ_EMU_VEC4(unsigned, uint4, 16)
#undef MXQ_EMU_VEC2
#undef MXQ_EMU_VEC4

// ---- fp16 --------------------------------------------------------------------------------------
namespace mxq_emu {
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: mant · 2^-24, exact in fp32
            float f = (float)mant * 5.9604644775390625e-08f;
            std::memcpy(&bits, &f, 4);
            bits |= sign;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// Round to nearest even, with subnormals, overflow to inf and quiet NaN (F. Giesen's
// float_to_half_fast3_rtne, which matches IEEE conversion and numpy's astype(float16)).
inline uint16_t float_to_half_bits_rn(float value) {
    uint32_t f;
    std::memcpy(&f, &value, 4);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint32_t o;
    if (f >= (143u << 23)) {  // ≥ 65536 (or inf / nan)
        o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f < (113u << 23)) {  // fp16 subnormal or zero: let the FPU round at 2^-24
        const uint32_t magic_bits = 126u << 23;  // 0.5f
        float fv, magic;
        std::memcpy(&fv, &f, 4);
        std::memcpy(&magic, &magic_bits, 4);
        volatile float sum = fv + magic;  // volatile: no reassociation
        float s = sum;
        uint32_t sb;
        std::memcpy(&sb, &s, 4);
        o = sb - magic_bits;
    } else {
        const uint32_t mant_odd = (f >> 13) & 1u;
        f += 0xc8000fffu;  // rebias exponent (15 − 127) << 23, plus rounding bias 0xfff
        f += mant_odd;
        o = f >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}
}  // namespace mxq_emu

struct alignas(2) __half {
    uint16_t x;
    __half() = default;
    __half(float f) : x(mxq_emu::float_to_half_bits_rn(f)) {}
    operator float() const { return mxq_emu::half_bits_to_float(x); }
};
struct alignas(4) __half2 { __half x, y; };
inline float __half2float(__half h) { return mxq_emu::half_bits_to_float(h.x); }
inline __half __float2half(float f) { __half h; h.x = mxq_emu::float_to_half_bits_rn(f); return h; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }

// ---- intrinsics --------------------------------------------------------------------------------
namespace mxq_emu {
// A load the GPU refuses ("misaligned address"): fails the launch (run_body catches it) instead of reading.
template <typename T> inline void check_aligned(const T* p, const char* what) {
    const uintptr_t off = reinterpret_cast<uintptr_t>(p) % alignof(T);
    if (off)
        throw std::runtime_error(std::string("misaligned address: ") + what + " of " + std::to_string(sizeof(T)) +
                                 " bytes at " + std::to_string(off) + " bytes past a " +
                                 std::to_string(alignof(T)) + "-byte boundary");
}
}  // namespace mxq_emu
template <typename T> inline T __ldg(const T* p) { mxq_emu::check_aligned(p, "__ldg"); return *p; }
template <typename T> inline T __ldcs(const T* p) { mxq_emu::check_aligned(p, "__ldcs"); return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
// expf, sinf, sincosf, fmaf (a true fused multiply-add, as on the GPU), fmaxf, … come from glibc.

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)((((uint64_t)hi << 32) | lo) >> (shift & 31u));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)(((((uint64_t)hi << 32) | lo) << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)((((uint64_t)hi << 32) | lo) >> (shift < 32u ? shift : 32u));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)(((((uint64_t)hi << 32) | lo) << (shift < 32u ? shift : 32u)) >> 32);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

template <typename T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T> inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T> inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}
template <typename T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old > v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- the launch engine ---------------------------------------------------------------------------
//
// Two ways to run a block's threads (chosen per launch, see mxq_emu_set_mode):
//   threads  every CUDA thread is a real std::thread; barriers block on a condition variable.
//            Nondeterministic interleavings, like the hardware; costs an OS context switch per
//            barrier arrival (~25 ms for a 256-thread GEMV block on 2 cores).
//   fibers   every CUDA thread is a fiber (own stack) on the calling OS thread, switched only at
//            barriers and shuffles, in thread order — and in reverse thread order for every other
//            block, so a missing barrier is exposed whichever side reads first. Deterministic and
//            ~100× faster; a deadlock is detected at once (a full pass without progress).
namespace mxq_emu {

struct Launch;

// A reusable barrier with drop-out (for exited threads); see Barrier::wait for the modes.
class Barrier {
public:
    void reset(int n) { std::lock_guard<std::mutex> g(m_); expected_ = n; arrived_ = 0; }
    // true when released normally, false when the launch is broken
    bool wait(Launch& launch, const char* what);
    void drop() {
        std::lock_guard<std::mutex> g(m_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) release_locked();
    }
    void wake_all() { std::lock_guard<std::mutex> g(m_); cv_.notify_all(); }

private:
    bool wait_fiber(Launch& launch);
    void release_locked() { arrived_ = 0; ++generation_; cv_.notify_all(); }
    std::mutex m_;
    std::condition_variable cv_;
    int expected_ = 0, arrived_ = 0;
    uint64_t generation_ = 0;
};

struct Warp {
    uint64_t slot[32];
    unsigned live = 0;     // lanes present in the block (a partial last warp has fewer)
    std::atomic<unsigned> exited{0};  // lanes that returned from the kernel in the current block
    Barrier barrier;
};

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    std::unique_ptr<char[]> stack;
    int linear = 0;
    bool done = false;
#if !defined(MXQ_EMU_ASM_SWITCH)
    ucontext_t ctx;
#endif
};

struct Launch {
    dim3 grid, block;
    int n_threads = 0;
    Barrier sync;       // __syncthreads
    Barrier block_end;  // all threads finished a block (never dropped; threads mode)
    std::vector<std::unique_ptr<Warp>> warps;
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;
    long timeout_ms = 20000;
    // fibers mode
    bool fibers = false;
    const std::function<void()>* body = nullptr;
    std::vector<Fiber> fiber;
    Fiber* running = nullptr;
    void* scheduler_sp = nullptr;
#if !defined(MXQ_EMU_ASM_SWITCH)
    ucontext_t scheduler_ctx;
#endif
    uint64_t progress = 0;

    void fail(const std::string& message) {
        {
            std::lock_guard<std::mutex> g(error_mutex);
            if (error.empty()) error = message;
        }
        failed.store(true);
        sync.wake_all();
        block_end.wake_all();
        for (auto& w : warps) w->barrier.wake_all();
    }
};

struct ThreadState {
    Launch* launch = nullptr;
    int linear = 0;  // linear thread index in the block
};

inline thread_local ThreadState current;

// Fiber context switch: save the callee-saved state on the current stack, store the stack pointer
// in *save, load `load` and resume there. x86-64: a dozen instructions (defined once per library,
// by MXQ_EMU_DEFINE_RUNTIME); other targets: ucontext.
#if defined(MXQ_EMU_ASM_SWITCH)
extern "C" void mxq_emu_switch(void** save, void* load);
extern "C" void mxq_emu_fiber_start();
#endif

inline void fiber_main(Launch* launch);

inline void yield_to_scheduler(Launch& launch) {
    Fiber* f = launch.running;
#if defined(MXQ_EMU_ASM_SWITCH)
    mxq_emu_switch(&f->sp, launch.scheduler_sp);
#else
    swapcontext(&f->ctx, &launch.scheduler_ctx);
#endif
}

inline bool Barrier::wait_fiber(Launch& launch) {
    // single OS thread: no locking needed
    const uint64_t gen = generation_;
    ++launch.progress;
    if (++arrived_ >= expected_) {
        arrived_ = 0;
        ++generation_;
        return !launch.failed.load();
    }
    while (generation_ == gen) {
        if (launch.failed.load()) return false;
        yield_to_scheduler(launch);
    }
    return !launch.failed.load();
}

inline bool Barrier::wait(Launch& launch, const char* what) {
    if (launch.fibers) return wait_fiber(launch);
    std::unique_lock<std::mutex> lock(m_);
    if (launch.failed.load()) return false;
    const uint64_t gen = generation_;
    if (++arrived_ >= expected_) {
        release_locked();
        return true;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(launch.timeout_ms);
    while (generation_ == gen) {
        if (launch.failed.load()) return false;
        if (cv_.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(50))) ==
                std::cv_status::timeout &&
            generation_ == gen && std::chrono::steady_clock::now() >= deadline) {
            lock.unlock();
            launch.fail(std::string("deadlock: ") + what + " not reached by every live thread of the block");
            return false;
        }
    }
    return true;
}
}  // namespace mxq_emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

inline void __syncthreads() {
    auto& t = mxq_emu::current;
    t.launch->sync.wait(*t.launch, "__syncthreads()");
}

namespace mxq_emu {
inline Warp& my_warp() { return *current.launch->warps[current.linear >> 5]; }

inline void check_mask(Warp& w, unsigned mask, const char* what) {
    const unsigned lane_bit = 1u << (current.linear & 31);
    if (!(mask & lane_bit)) current.launch->fail(std::string(what) + ": calling lane is not in the mask");
    else if ((mask & w.live) != w.live)
        current.launch->fail(std::string(what) + ": mask omits live lanes (the emulator supports full-warp collectives only)");
    else if (mask & w.exited.load() & w.live)
        current.launch->fail(std::string(what) + ": mask names lanes that have exited");
}

// Every lane publishes `bits`, then reads the slot of lane src(lane) (or keeps its own value when
// src is outside the warp's live lanes).
template <typename SrcFn>
inline uint64_t exchange(uint64_t bits, unsigned mask, const char* what, SrcFn src_of) {
    Warp& w = my_warp();
    Launch& launch = *current.launch;
    const int lane = current.linear & 31;
    check_mask(w, mask, what);
    w.slot[lane] = bits;
    if (!w.barrier.wait(launch, what)) return bits;
    const int src = src_of(lane);
    const uint64_t out = (src >= 0 && src < 32 && (w.live >> src) & 1u) ? w.slot[src] : bits;
    w.barrier.wait(launch, what);
    return out;
}

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
}  // namespace mxq_emu

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return mxq_emu::from_bits<T>(mxq_emu::exchange(mxq_emu::to_bits(v), mask, "__shfl_sync", [&](int lane) {
        return (lane & ~(width - 1)) + (src_lane & (width - 1));
    }));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mxq_emu::from_bits<T>(mxq_emu::exchange(mxq_emu::to_bits(v), mask, "__shfl_down_sync", [&](int lane) {
        const int src = lane + (int)delta;
        return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane;
    }));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mxq_emu::from_bits<T>(mxq_emu::exchange(mxq_emu::to_bits(v), mask, "__shfl_up_sync", [&](int lane) {
        const int src = lane - (int)delta;
        return src >= (lane & ~(width - 1)) ? src : lane;
    }));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return mxq_emu::from_bits<T>(mxq_emu::exchange(mxq_emu::to_bits(v), mask, "__shfl_xor_sync", [&](int lane) {
        // CUDA: a group may read earlier groups, but reading a later group returns the caller's own value
        const int src = lane ^ lane_mask;
        return src < (lane & ~(width - 1)) + width ? src : lane;
    }));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    using namespace mxq_emu;
    Warp& w = my_warp();
    Launch& launch = *current.launch;
    const int lane = current.linear & 31;
    check_mask(w, mask, "__ballot_sync");
    w.slot[lane] = predicate ? 1 : 0;
    if (!w.barrier.wait(launch, "__ballot_sync")) return 0;
    unsigned out = 0;
    for (int i = 0; i < 32; ++i)
        if (((w.live >> i) & 1u) && w.slot[i]) out |= 1u << i;
    w.barrier.wait(launch, "__ballot_sync");
    return out & mask;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == (mask & mxq_emu::my_warp().live); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    using namespace mxq_emu;
    Warp& w = my_warp();
    check_mask(w, mask, "__syncwarp");
    w.barrier.wait(*current.launch, "__syncwarp()");
}
inline unsigned __activemask() { return mxq_emu::my_warp().live & ~mxq_emu::my_warp().exited; }

namespace mxq_emu {

inline std::mutex& launch_mutex() { static std::mutex m; return m; }
inline std::string& last_error() { static std::string e; return e; }

inline std::atomic<int>& mode_setting() { static std::atomic<int> m{0}; return m; }  // 0 threads, 1 fibers

inline uint3 thread_index(int linear, dim3 block) {
    return uint3{(unsigned)(linear % block.x), (unsigned)((linear / block.x) % block.y),
                 (unsigned)(linear / (block.x * block.y))};
}

// What a thread does when it leaves the kernel for the current block: marked as exited before it
// drops out of the barriers, so a lane released by those drops already sees it as exited.
inline void thread_exits(Launch& launch, int linear) {
    Warp& warp = *launch.warps[linear >> 5];
    warp.exited.fetch_or(1u << (linear & 31));
    launch.sync.drop();
    warp.barrier.drop();
}

inline void run_body(Launch& launch) {
    try {
        (*launch.body)();
    } catch (const std::exception& e) {
        launch.fail(std::string("exception in kernel: ") + e.what());
    } catch (...) {
        launch.fail("exception in kernel");
    }
}

inline void fiber_main(Launch* launch) {
    Fiber* f = launch->running;
    run_body(*launch);
    thread_exits(*launch, f->linear);
    ++launch->progress;
    f->done = true;
    yield_to_scheduler(*launch);  // never resumed
    std::abort();
}

#if !defined(MXQ_EMU_ASM_SWITCH)
inline void fiber_entry_ucontext(unsigned lo, unsigned hi) {
    fiber_main(reinterpret_cast<Launch*>(((uintptr_t)hi << 32) | lo));
}
#endif

constexpr size_t FIBER_STACK_BYTES = 256 * 1024;  // reserved, touched only as used

inline void run_fibers(Launch& launch, long long n_blocks, const std::function<void()>& reset_block) {
    const int n = launch.n_threads;
    launch.fiber.resize(n);
    for (int i = 0; i < n; ++i) {
        launch.fiber[i].stack.reset(new char[FIBER_STACK_BYTES]);
        launch.fiber[i].linear = i;
    }
    blockDim = launch.block;
    gridDim = launch.grid;
    current.launch = &launch;
    for (long long b = 0; b < n_blocks && !launch.failed.load(); ++b) {
        blockIdx = uint3{(unsigned)(b % launch.grid.x), (unsigned)((b / launch.grid.x) % launch.grid.y),
                         (unsigned)(b / ((long long)launch.grid.x * launch.grid.y))};
        reset_block();
        for (auto& f : launch.fiber) {
            f.done = false;
#if defined(MXQ_EMU_ASM_SWITCH)
            // initial stack: [r15 r14 r13=entry r12=arg rbx rbp] ret→fiber_start, 16-byte aligned call
            uintptr_t top = ((uintptr_t)f.stack.get() + FIBER_STACK_BYTES) & ~(uintptr_t)15;
            uint64_t* sp = reinterpret_cast<uint64_t*>(top);
            *--sp = 0;
            *--sp = 0;
            *--sp = (uint64_t)(uintptr_t)&mxq_emu_fiber_start;
            *--sp = 0;                                            // rbp
            *--sp = 0;                                            // rbx
            *--sp = (uint64_t)(uintptr_t)&launch;                 // r12: argument
            *--sp = (uint64_t)(uintptr_t)&fiber_main;             // r13: entry
            *--sp = 0;                                            // r14
            *--sp = 0;                                            // r15
            *--sp = 0x1F80ull | (0x037Full << 32);                // MXCSR, x87 control word (defaults)
            f.sp = sp;
#else
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.get();
            f.ctx.uc_stack.ss_size = FIBER_STACK_BYTES;
            f.ctx.uc_link = nullptr;
            const uintptr_t p = (uintptr_t)&launch;
            makecontext(&f.ctx, (void (*)())fiber_entry_ucontext, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
#endif
        }
        const bool reverse = (b & 1) != 0;  // every other block runs its threads in reverse order
        while (true) {
            bool unfinished = false;
            const uint64_t before = launch.progress;
            for (int k = 0; k < n; ++k) {
                Fiber& f = launch.fiber[reverse ? n - 1 - k : k];
                if (f.done) continue;
                unfinished = true;
                launch.running = &f;
                current.linear = f.linear;
                threadIdx = thread_index(f.linear, launch.block);
#if defined(MXQ_EMU_ASM_SWITCH)
                mxq_emu_switch(&launch.scheduler_sp, f.sp);
#else
                swapcontext(&launch.scheduler_ctx, &f.ctx);
#endif
            }
            if (!unfinished) break;
            if (launch.failed.load()) {
                // resume the blocked fibers once more so they see the failure and run to their end
                // (their waits return false); give up on any that still block
                bool again = true;
                for (int round = 0; again && round < 64; ++round) {
                    again = false;
                    for (auto& f : launch.fiber) {
                        if (f.done) continue;
                        again = true;
                        launch.running = &f;
                        current.linear = f.linear;
                        threadIdx = thread_index(f.linear, launch.block);
#if defined(MXQ_EMU_ASM_SWITCH)
                        mxq_emu_switch(&launch.scheduler_sp, f.sp);
#else
                        swapcontext(&launch.scheduler_ctx, &f.ctx);
#endif
                    }
                }
                break;
            }
            if (launch.progress == before)
                launch.fail("deadlock: a barrier or warp collective is not reached by every live thread of the block");
        }
    }
    current.launch = nullptr;
}

// Run `body` for every thread of every block of the grid. Returns 0, or 1 with last_error() set.
inline int run(dim3 grid, dim3 block, const std::function<void()>& body) {
    std::lock_guard<std::mutex> serialize(launch_mutex());
    last_error().clear();
    const long long n = (long long)block.x * block.y * block.z;
    if (n <= 0 || n > 1024 || block.z > 64) { last_error() = "invalid block dimensions"; return 1; }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        last_error() = "invalid grid dimensions";
        return 1;
    }
    Launch launch;
    launch.grid = grid;
    launch.block = block;
    launch.n_threads = (int)n;
    launch.body = &body;
    launch.fibers = mode_setting().load() == 1;
    if (const char* t = std::getenv("MXQ_EMU_TIMEOUT_MS")) launch.timeout_ms = std::atol(t);
    const int n_warps = (int)((n + 31) / 32);
    for (int w = 0; w < n_warps; ++w) {
        launch.warps.push_back(std::make_unique<Warp>());
        const int lanes = (int)std::min<long long>(32, n - 32LL * w);
        launch.warps.back()->live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    auto reset_block = [&]() {
        launch.sync.reset((int)n);
        for (int w = 0; w < n_warps; ++w) {
            launch.warps[w]->barrier.reset(__builtin_popcount(launch.warps[w]->live));
            launch.warps[w]->exited = 0;
        }
    };
    const long long n_blocks = (long long)grid.x * grid.y * grid.z;

    if (launch.fibers) {
        try {
            run_fibers(launch, n_blocks, reset_block);
        } catch (const std::exception& e) {
            launch.fail(std::string("could not run fibers: ") + e.what());
        }
    } else {
        reset_block();
        launch.block_end.reset((int)n);
        auto thread_main = [&](int linear) {
            current.launch = &launch;
            current.linear = linear;
            threadIdx = thread_index(linear, block);
            blockDim = block;
            gridDim = grid;
            for (long long b = 0; b < n_blocks && !launch.failed.load(); ++b) {
                blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                                 (unsigned)(b / ((long long)grid.x * grid.y))};
                run_body(launch);
                thread_exits(launch, linear);
                if (!launch.block_end.wait(launch, "end of block")) break;
                if (linear == 0) reset_block();
                if (!launch.block_end.wait(launch, "end of block")) break;
            }
            current.launch = nullptr;
        };
        std::vector<std::thread> threads;
        threads.reserve((size_t)n);
        try {
            for (int i = 0; i < (int)n; ++i) threads.emplace_back(thread_main, i);
        } catch (const std::exception& e) {
            launch.fail(std::string("could not start threads: ") + e.what());
        }
        for (auto& t : threads) t.join();
    }
    if (launch.failed.load()) {
        last_error() = launch.error;
        return 1;
    }
    return 0;
}

// ---- argument unpacking and signatures (for the generated trampolines) ---------------------------
template <typename T> struct type_name { static std::string get() { return "?"; } };
#define MXQ_EMU_TYPE_NAME(T, S) template <> struct type_name<T> { static std::string get() { return S; } };
MXQ_EMU_TYPE_NAME(float, "f32")
MXQ_EMU_TYPE_NAME(double, "f64")
MXQ_EMU_TYPE_NAME(int8_t, "i8")
MXQ_EMU_TYPE_NAME(uint8_t, "u8")
MXQ_EMU_TYPE_NAME(int16_t, "i16")
MXQ_EMU_TYPE_NAME(uint16_t, "u16")
MXQ_EMU_TYPE_NAME(int32_t, "i32")
MXQ_EMU_TYPE_NAME(uint32_t, "u32")
MXQ_EMU_TYPE_NAME(long long, "i64")
MXQ_EMU_TYPE_NAME(unsigned long long, "u64")
MXQ_EMU_TYPE_NAME(long, "i64")
MXQ_EMU_TYPE_NAME(unsigned long, "u64")
MXQ_EMU_TYPE_NAME(__half, "f16")
#undef MXQ_EMU_TYPE_NAME
template <typename T> struct type_name<T*> {
    static std::string get() {
        return (std::is_const_v<T> ? "const " : "") + type_name<std::remove_cv_t<T>>::get() + "*";
    }
};

template <typename... A> std::string signature_of(void (*)(A...)) {
    std::string s;
    ((s += (s.empty() ? "" : ","), s += type_name<std::remove_cv_t<A>>::get()), ...);
    return s;
}

template <typename... A, std::size_t... I>
int launch_kernel_impl(void (*fn)(A...), const unsigned* g, const unsigned* b, void** args, std::index_sequence<I...>) {
    std::tuple<std::remove_cv_t<A>...> values{*static_cast<std::remove_cv_t<A>*>(args[I])...};
    return run(dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), [&]() { std::apply(fn, values); });
}
template <typename... A> int launch_kernel(void (*fn)(A...), const unsigned* g, const unsigned* b, void** args) {
    return launch_kernel_impl(fn, g, b, args, std::index_sequence_for<A...>{});
}
}  // namespace mxq_emu

#define MXQ_EMU_EXPORT(name)                                                                              \
    extern "C" __attribute__((visibility("default"))) int mxq_emu_launch__##name(                         \
        const unsigned* grid, const unsigned* block, void** args) {                                       \
        return mxq_emu::launch_kernel(&name, grid, block, args);                                          \
    }                                                                                                     \
    extern "C" __attribute__((visibility("default"))) const char* mxq_emu_sig__##name() {                 \
        static const std::string s = mxq_emu::signature_of(&name);                                        \
        return s.c_str();                                                                                 \
    }

// Definitions that must exist once per library: emitted by the trampoline of the first unit.
#if defined(MXQ_EMU_ASM_SWITCH)
#define MXQ_EMU_DEFINE_SWITCH()                                                                           \
    asm(".text\n"                                                                                         \
        ".globl mxq_emu_switch\n.hidden mxq_emu_switch\n.type mxq_emu_switch,@function\n"                  \
        "mxq_emu_switch:\n"                                                                               \
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"            \
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"                                           \
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"                                                        \
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"                                            \
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"           \
        ".size mxq_emu_switch,.-mxq_emu_switch\n"                                                         \
        ".globl mxq_emu_fiber_start\n.hidden mxq_emu_fiber_start\n.type mxq_emu_fiber_start,@function\n"  \
        "mxq_emu_fiber_start:\n  movq %r12, %rdi\n  callq *%r13\n  ud2\n"                                 \
        ".size mxq_emu_fiber_start,.-mxq_emu_fiber_start\n");
#else
#define MXQ_EMU_DEFINE_SWITCH()
#endif

#define MXQ_EMU_DEFINE_RUNTIME()                                                                          \
    MXQ_EMU_DEFINE_SWITCH()                                                                               \
    extern "C" __attribute__((visibility("default"))) const char* mxq_emu_last_error() {                  \
        return mxq_emu::last_error().c_str();                                                             \
    }                                                                                                     \
    extern "C" __attribute__((visibility("default"))) void mxq_emu_set_mode(int mode) {                   \
        mxq_emu::mode_setting().store(mode);                                                              \
    }
