"""The CPU emulation harness itself (kernels/cuda_emu.h, kernels/emulator.py): warp shuffle
semantics, barriers and block-scoped shared memory, fp16 conversions, and the checks that make it a
useful test bed (poisoned margins, out-of-bounds and read-only writes, misaligned vector loads, exited lanes in a shuffle,
deadlock timeout, strict scalar types)."""
from __future__ import annotations

import numpy as np
import pytest

from mxq.kernels.emulator import MODES, EmulatedModule, Emulator, EmulationError, get_emulator
from mxq.kernels.registry import elementwise_launch, rowwise_launch

i32, f32 = np.int32, np.float32

PROBES = r"""
#include "common.cuh"
extern "C" __global__ void shfl_probe(const int* in, int* out, int arg, int width) {
    const int t = threadIdx.x;
    const int v = in[t];
    out[4 * t + 0] = __shfl_down_sync(0xffffffffu, v, arg, width);
    out[4 * t + 1] = __shfl_up_sync(0xffffffffu, v, arg, width);
    out[4 * t + 2] = __shfl_xor_sync(0xffffffffu, v, arg, width);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, arg, width);
}
// Block sums through block-scoped shared memory; each block starts from its own values.
extern "C" __global__ void block_sums(const float* in, float* out, int n_per_block) {
    __shared__ float scratch[33];
    __shared__ float staged[1024];
    const float* src = in + (size_t)blockIdx.x * n_per_block;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n_per_block; i += blockDim.x) acc += src[i];
    staged[threadIdx.x] = acc;
    const float total = mxq::block_sum(acc, scratch);
    __syncthreads();
    float check = 0.0f;  // every thread re-adds what all threads staged: needs the barrier above
    for (int i = 0; i < (int)blockDim.x; ++i) check += staged[i];
    if (threadIdx.x == 0) { out[2 * blockIdx.x] = total; out[2 * blockIdx.x + 1] = check; }
}
extern "C" __global__ void write_past_end(float* out, int n) { if (threadIdx.x == 0) out[n] = 1.0f; }
extern "C" __global__ void read_past_end(const float* in, float* out, int n) { if (threadIdx.x == 0) out[0] = in[n]; }
extern "C" __global__ void vector_load(const unsigned* in, unsigned* out, int offset) {
    if (threadIdx.x == 0) { const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + offset)); out[0] = v.x + v.w; }
}
extern "C" __global__ void write_const(const float* in) { if (threadIdx.x == 0) const_cast<float*>(in)[0] = 2.0f; }
extern "C" __global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
extern "C" __global__ void split_barriers(float* out) {
    if (threadIdx.x < 16) __syncwarp(); else __syncthreads();  // neither barrier completes
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void early_exit_barrier(float* out) {
    if (threadIdx.x >= 8) return;  // exited threads drop out of later barriers (as on the GPU)
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
"""
PROBE_NAMES = ["shfl_probe", "block_sums", "write_past_end", "read_past_end", "vector_load", "write_const", "shuffle_after_exit",
               "split_barriers", "early_exit_barrier"]


@pytest.fixture(scope="module", params=MODES)
def probes(request):
    return Emulator.from_source(PROBES, PROBE_NAMES, mode=request.param)


def expected_shuffles(values, arg, width):
    out = np.empty((values.size, 4), np.int64)
    for t in range(values.size):
        warp0, lane = t - t % 32, t % 32
        seg = lane - lane % width
        down = lane + arg if (lane % width) + arg < width else lane
        up = lane - arg if (lane % width) >= arg else lane
        xor = lane ^ arg if (lane ^ arg) < seg + width else lane  # earlier groups readable, later ones not
        idx = seg + arg % width
        out[t] = [values[warp0 + s] for s in (down, up, xor, idx)]
    return out


@pytest.mark.parametrize("arg,width", [(1, 32), (5, 32), (16, 32), (3, 8), (1, 4), (7, 16), (12, 8)])
def test_shuffles_follow_cuda_semantics(probes, arg, width):
    values = np.arange(64, dtype=np.int32) * 10 + 3  # two warps
    out = np.zeros((64, 4), np.int32)
    probes.launch("shfl_probe", 1, 64, (values, out, i32(arg), i32(width)))
    assert np.array_equal(out, expected_shuffles(values, arg, width))


def test_barriers_and_block_scoped_shared_memory(probes):
    rng = np.random.default_rng(0)
    n_blocks, n = 5, 300
    x = rng.integers(-50, 50, size=(n_blocks, n)).astype(f32)  # integer values: exact sums in any order
    out = np.zeros((n_blocks, 2), f32)
    probes.launch("block_sums", n_blocks, 128, (x, out, i32(n)))
    assert np.array_equal(out[:, 0], x.sum(axis=1))
    assert np.array_equal(out[:, 1], x.sum(axis=1))


def test_out_of_bounds_write_is_caught(probes):
    with pytest.raises(EmulationError, match="past the end"):
        probes.launch("write_past_end", 1, 32, (np.zeros(10, f32), i32(10)))


def test_out_of_bounds_read_sees_poison(probes):
    out = np.zeros(1, f32)
    probes.launch("read_past_end", 1, 32, (np.ones(10, f32), out, i32(10)))
    assert np.isnan(out[0])


def test_misaligned_vector_load_is_caught(probes):
    """A uint4 __ldg 4 bytes off its 16-byte alignment faults on the GPU ("misaligned address"): so here."""
    words, out = np.arange(16, dtype=np.uint32), np.zeros(1, np.uint32)
    probes.launch("vector_load", 1, 32, (words, out, i32(4)))  # 16 bytes in: aligned
    assert out[0] == 4 + 7
    with pytest.raises(EmulationError, match="misaligned address"):
        probes.launch("vector_load", 1, 32, (words, out, i32(1)))


def test_write_to_const_argument_is_caught(probes):
    with pytest.raises(EmulationError, match="read-only"):
        probes.launch("write_const", 1, 32, (np.zeros(4, f32),))


def test_shuffle_naming_an_exited_lane_is_caught(probes):
    with pytest.raises(EmulationError, match="exited"):
        probes.launch("shuffle_after_exit", 1, 32, (np.zeros(32, f32),))


def test_deadlock_times_out_instead_of_hanging(probes, monkeypatch):
    monkeypatch.setenv("MXQ_EMU_TIMEOUT_MS", "300")
    with pytest.raises(EmulationError, match="deadlock"):
        probes.launch("split_barriers", 1, 32, (np.zeros(32, f32),))


def test_exited_threads_leave_the_barrier(probes):
    out = np.zeros(64, f32)
    probes.launch("early_exit_barrier", 2, 64, (out,))
    assert np.array_equal(out, np.r_[np.ones(8), np.zeros(56)].astype(f32))


def test_arguments_are_checked():
    emu = get_emulator()
    a = np.zeros(8, f32)
    with pytest.raises(EmulationError, match="numpy.int32"):
        emu.launch("add_f32", 1, 32, (a, a, a, 8))  # a Python int: CuPy would pass 64 bits
    with pytest.raises(EmulationError, match="f32 array"):
        emu.launch("add_f32", 1, 32, (a, a.astype(np.float64), a, i32(8)))
    with pytest.raises(EmulationError, match="takes 4 arguments"):
        emu.launch("add_f32", 1, 32, (a, a, a))
    with pytest.raises(EmulationError, match="read-only"):
        ro = a.copy()
        ro.flags.writeable = False
        emu.launch("add_f32", 1, 32, (a, a, ro, i32(8)))
    kernel = EmulatedModule(emu).get_function("add_f32")  # the cupy.RawModule-like interface
    b = np.arange(8, dtype=f32)
    kernel((1,), (32,), (b, b, a, i32(8)))
    assert np.array_equal(a, 2 * b)


def test_half_to_float_is_exact_for_every_fp16_value():
    emu = get_emulator()
    table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(1, -1)
    out = np.zeros((1, 1 << 16), f32)
    emu.launch("embedding_f16", *rowwise_launch(1, 1024), (np.zeros(1, np.int32), table, out, i32(1), i32(1 << 16),
                                                          i32(1)))
    want = table.astype(f32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))  # incl. ±0, subnormals, ±inf


def test_float_to_half_rounds_to_nearest_even():
    emu = get_emulator()
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=1 << 15, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, 2.0 ** -24, 2.0 ** -25,
                        1.5 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                        np.nan], dtype=f32)
    values = np.concatenate([bits.view(f32), special, rng.standard_normal(4096).astype(f32) * 1e-6])
    k_cache = np.zeros((1, 1, values.size), np.float16)
    v_cache = np.zeros_like(k_cache)
    grid, block = (4, 1, 1), (256, 1, 1)  # grid-stride: few blocks, many elements per thread
    emu.launch("kv_store_f16", grid, block, (values, values, k_cache, v_cache, i32(1), i32(1), i32(values.size),
                                             i32(values.size), i32(0), i32(1)))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(k_cache[0, 0]), nan)
    assert np.array_equal(k_cache[0, 0][~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_elementwise_launch_covers_large_sizes():
    grid, block = elementwise_launch(10 ** 9)
    assert grid[0] == 65535 and block[0] == 256  # grid-stride kernels loop over the rest
