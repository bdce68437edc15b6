"""The compiled CPU kernels (runtime/backends/cpu_kernels.py) against the NumPy reference path, built ahead of
time (cpu_aot.py, the default) and by Numba's JIT.

Every affine config (bits × group size), odd shapes with a padded last group, with and without CSR
outliers, bias and residual, 1 and a few tokens; the fp16 kernel; the per-token ops (cpu_ops.py:
RMSNorm, RoPE with partial rotary, SwiGLU/GeGLU, decode attention with GQA and windows); thread splits; the fallback when
the JIT is missing or fails; compact lean-mode metadata; and whole tiny models' logits.
Tolerance: the kernels sum in a different order (fastmath), so |y − y_ref| ≤ 2e-5 · max|y_ref|. The affine
decode kernels multiply by x rounded to ~16 or 8 bits per 32 columns (cpu_weights.quantize_activations; which one:
$MXQ_ACTIVATIONS, cpu_weights.activation_low_part): they are held
to the NumPy path on that x̂ (plus two rounding steps, for a product landing on a rounding tie), and to W·x
within the rounding's bound (½ step · Σ|W_r|).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mxq.format_spec import StorageConfig, dequantize
from mxq.runtime.backends import cpu_jit
from mxq.runtime.backends.cpu_weights import (ACTIVATION_LOW_BITS, KERNEL_MAX_TOKENS, KERNEL_PARALLEL_MIN_WEIGHTS, PRIVATE_COPY_MIN_BYTES,
                                              ThreadChoice, activation_low_part, off_the_mapping,
                                              quantize_activations)
from mxq.runtime.backends.numpy_backend import NumpyBackend

from conftest import TEST_CACHE, early_result

PACKAGE_ROOT = str(Path(cpu_jit.__file__).resolve().parents[3])  # the directory holding the mxq package
# Numba's JIT kernels compiled into the test cache (cpu_jit.cache_dir) by a subprocess started when the tests are
# collected (conftest: early): kernels_mode("jit") waits for it, then loads them from that cache
JIT_KERNELS = ("jit kernels", [sys.executable, "-c", "from mxq.runtime.backends import cpu_jit; "
                                                    "assert cpu_jit.kernels().kind == 'jit'"],
               {**os.environ, "MXQ_KERNELS": "jit", "PYTHONPATH": PACKAGE_ROOT})
pytestmark = pytest.mark.early(*JIT_KERNELS)

pytest.importorskip("numba")
LOW_PART = activation_low_part()  # the kernels round x to ~16 bits (True, the tests' setting) or to 8 ($MXQ_ACTIVATIONS)
ROUNDING_STEP = 1 / 127 / 2 ** (ACTIVATION_LOW_BITS if LOW_PART else 0)  # x̂'s step per max|x| of a block
RTOL = 2e-5
# logits of whole tiny random models, kernels (~16-bit activations) vs the exact NumPy path, relative to
# max|logits|: measured 1.8e-4 on tiny-gemma3's prompt in pieces (with 8-bit activations it was 0.135)
LOGITS_TOLERANCE = 1e-3


class _Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, shape, config, role


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Run with MXQ_KERNELS=mode (aot, jit ...): backends created inside load those kernels."""
    if mode == "jit":
        early_result(*JIT_KERNELS)  # compiled (or failed: then the load below says why)
    saved_env, saved_state = os.environ.get("MXQ_KERNELS"), dict(cpu_jit._state)
    os.environ["MXQ_KERNELS"] = mode
    cpu_jit._state.clear()
    try:
        yield
    finally:
        os.environ.pop("MXQ_KERNELS") if saved_env is None else os.environ.__setitem__("MXQ_KERNELS", saved_env)
        cpu_jit._state.clear()
        cpu_jit._state.update(saved_state)


def jit_kernels():
    """The CPU kernels compiled by Numba's JIT (into the test cache: cpu_jit.cache_dir); fails the test when they
    do not load."""
    from mxq.runtime.backends import cpu_jit

    with kernels_mode("jit"):
        kernels = cpu_jit.kernels()
        if kernels is None:
            pytest.fail("the jit kernels did not load (see the notice on stderr)")
        return kernels


@pytest.fixture(scope="module", params=["aot", "jit"])
def backends(request):
    """(compiled, NumPy reference) backends; every test that takes them runs with the ahead-of-time
    kernels (cpu_aot.py, the default) and with Numba's JIT (parallel kernels)."""
    with kernels_mode(request.param):
        fast, ref = NumpyBackend(threads=2), NumpyBackend(threads=2, kernels=False)
        if fast.kernels is None or fast.kernels.kind != request.param:
            pytest.fail(f"the {request.param} kernels did not load (see the notice on stderr)")
        yield fast, ref
        fast.close()
        ref.close()


@pytest.fixture
def jit():
    """Numba's JIT kernels: the parallel forms and ThreadChoice exist only there."""
    with kernels_mode("jit"):
        yield


def assert_close(y, y_ref, slack=0.0):
    assert y.shape == y_ref.shape and y.dtype == np.float32
    assert np.abs(y - y_ref).max() <= RTOL * max(np.abs(y_ref).max(), 1e-6) + slack


def quantized_input(x, dense):
    """(x̂ the affine kernels multiply by, slack: two rounding steps of x̂ times the largest weight, for a
    product landing on a rounding tie)."""
    x_hat = quantize_activations(x, LOW_PART)
    step = np.abs(x).max() * ROUNDING_STEP
    return x_hat, 2 * step * np.abs(dense).max()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_kernel_matches_numpy_path(backends, bits, group):
    from conftest import random_affine_blobs

    fast, ref = backends
    rng = np.random.default_rng(100 * bits + group)
    for shape, nnz in (((37, 70), 6), ((20, 256), 0), ((3, 200), 2), ((131, 333), 40), ((1, 31), 1)):
        config = StorageConfig.affine(bits, group, nnz)
        blobs = random_affine_blobs(rng, shape, config)
        w_fast, w_ref = fast.prepare(_Entry("w", shape, config), blobs), ref.prepare(_Entry("w", shape, config), blobs)
        dense = dequantize(blobs, shape, config)
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for tokens in (1, 2, 5, 8, 20, 100, 300):  # up to fast.stack_max_tokens the tiles (a one-matrix stack);
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)  # more: compiled dequantization +
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32)  # sgemm on exact x
            tiles = tokens <= fast.stack_max_tokens
            x_in, slack = quantized_input(x, dense) if tiles else (x, 0.0)
            assert_close(fast.linear(x, w_fast), ref.linear(x_in, w_ref), slack)
            assert_close(fast.linear(x, w_fast), x_in @ dense.T, slack)
            assert_close(fast.linear(x, w_fast, bias, residual.copy()), ref.linear(x_in, w_ref, bias, residual.copy()), slack)
            if tiles:  # x̂ is within half a step of x: |W·x̂ − W·x| ≤ ½·step·Σ|W_r|
                bound = 0.5 * np.abs(x).max() * ROUNDING_STEP * np.abs(dense).sum(axis=1).max()
                assert_close(fast.linear(x, w_fast), x @ dense.T, 1.001 * bound)


def test_fp16_kernel_matches_reference(backends):
    fast, _ = backends
    rng = np.random.default_rng(0)
    data = rng.standard_normal((77, 45)).astype(np.float16)
    data[0, :6] = [0.0, -0.0, 6e-8, -6e-5, 65504, -1e-7]  # zeros, subnormals, max
    weight = fast.prepare(_Entry("w", data.shape, StorageConfig.fp16()), {"data": data})
    dense = data.astype(np.float32)
    bias = rng.standard_normal(77).astype(np.float32)
    for tokens in (1, 3, 8):
        x = rng.standard_normal((tokens, 45)).astype(np.float32)
        assert_close(fast.linear(x, weight), x @ dense.T)
        residual = rng.standard_normal((tokens, 77)).astype(np.float32)
        assert_close(fast.linear(x, weight, bias, residual.copy()), x @ dense.T + bias + residual)


def test_more_tokens_than_the_kernel_limit_dequantize_then_multiply(backends, monkeypatch):
    """Prefill-sized products: the compiled kernel dequantizes chunks of rows (the padded natural order)
    for sgemm; the same W as the NumPy path's, for chunks that split the rows unevenly."""
    from conftest import random_affine_blobs
    from mxq.runtime.backends import cpu_weights

    fast, ref = backends
    rng = np.random.default_rng(3)
    config = StorageConfig.affine(4, 32, 3)
    shape = (3000, 96)  # split over the 2 threads (the compiled dequantization runs in both at once) ...
    assert shape[0] * shape[1] >= cpu_weights.PARALLEL_MIN_WORK
    monkeypatch.setattr(cpu_weights, "PREFILL_CHUNK_BYTES", 37 * 96 * 4)  # ... in chunks of 37 rows
    blobs = random_affine_blobs(rng, shape, config)
    w_fast, w_ref = fast.prepare(_Entry("w", shape, config), blobs), ref.prepare(_Entry("w", shape, config), blobs)
    x = rng.standard_normal((fast.stack_max_tokens + 40, 96)).astype(np.float32)  # more than the stacks take
    assert_close(fast.linear(x, w_fast), ref.linear(x, w_ref))
    assert_close(fast.linear(x, w_fast), x @ dequantize(blobs, shape, config).T)


@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_rms_norm_and_gated_activations_match_numpy(backends, tokens):
    fast, ref = backends
    assert fast.ops is not None
    rng = np.random.default_rng(tokens)
    for width in (1, 7, 64, 577):
        x = (3 * rng.standard_normal((tokens, width))).astype(np.float32)
        w = rng.standard_normal(width).astype(np.float32)
        assert_close(fast.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        assert_close(fast.rms_norm(x[:, ::-1], w, 1e-5), ref.rms_norm(x[:, ::-1], w, 1e-5))  # non-contiguous
        gate = (8 * rng.standard_normal((tokens, width))).astype(np.float32)
        gate[0, 0] = -200.0  # exp overflow side of silu
        up = rng.standard_normal((tokens, width)).astype(np.float32)
        assert_close(fast.silu_mul(gate, up), ref.silu_mul(gate, up))
        assert_close(fast.gelu_mul(gate, up), ref.gelu_mul(gate, up))


@pytest.mark.parametrize("half,head_dim", [(32, 64), (8, 16), (16, 64), (3, 10), (1, 2)])
def test_rope_matches_numpy_including_partial_rotary(backends, half, head_dim):
    fast, ref = backends
    rng = np.random.default_rng(half * head_dim)
    inv_freq = (10000.0 ** (-np.arange(half) / half)).astype(np.float32)
    for tokens, start in ((1, 0), (1, 4095), (5, 17), (33, 0)):
        x = rng.standard_normal((tokens, 3 * head_dim)).astype(np.float32)
        positions = np.arange(start, start + tokens, dtype=np.int64)
        options = {} if head_dim == 2 * half else {"head_dim": head_dim}
        got, want = fast.rope(x, positions, inv_freq, **options), ref.rope(x, positions, inv_freq, **options)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # cos/sin of large angles differ in ulps
        if head_dim > 2 * half:
            np.testing.assert_array_equal(got.reshape(tokens, 3, head_dim)[..., 2 * half:],
                                          x.reshape(tokens, 3, head_dim)[..., 2 * half:])


@pytest.mark.parametrize("n_kv,n_rep,head_dim", [(1, 1, 8), (3, 3, 64), (2, 4, 12), (4, 1, 5)])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_decode_attention_matches_numpy(backends, n_kv, n_rep, head_dim, window):
    from mxq.runtime.backends.base import LayerCache

    fast, ref = backends
    rng = np.random.default_rng(n_kv * 100 + head_dim)
    width, kv_width = n_kv * n_rep * head_dim, n_kv * head_dim
    for threads in (1, 2):
        fast_t = NumpyBackend(threads=threads)
        caches = [LayerCache(np, n_kv, head_dim, 64) for _ in range(2)]
        start = 0
        for T in (7, 1, 1, 3, 16, 1):  # a prompt, then decode steps and short chunks
            q, k, v = (rng.standard_normal((T, n)).astype(np.float32) for n in (width, kv_width, kv_width))
            got = fast_t.attention(q, k, v, caches[0], start, scale=0.3, window=window)
            want = ref.attention(q, k, v, caches[1], start, scale=0.3, window=window)
            assert_close(got, want)
            start += T
        fast_t.close()


def test_long_context_attention_splits_heads_over_threads(backends, monkeypatch):
    from mxq.runtime.backends import numpy_backend
    from mxq.runtime.backends.base import LayerCache

    fast, ref = backends
    monkeypatch.setattr(numpy_backend, "ATTENTION_TEAM_MIN_WORK", 1)  # the team's kernel (cpu_team.py) at any size
    assert fast.team is not None
    rng = np.random.default_rng(9)
    caches = [LayerCache(np, 2, 16, 300) for _ in range(2)]
    k, v = (rng.standard_normal((299, 32)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((299, 96)).astype(np.float32)
    ref.attention(q, k, v, caches[0], 0)
    ref.attention(q, k, v, caches[1], 0)
    q1, k1, v1 = q[:1], k[:1], v[:1]
    assert_close(fast.attention(q1, k1, v1, caches[0], 299), ref.attention(q1, k1, v1, caches[1], 299))


def test_thread_splits_give_identical_rows(jit):
    """1 thread runs the serial kernels; with more, ThreadChoice's first calls alternate the serial and
    the parallel kernel (affine and fp16): the same numbers every time."""
    from conftest import random_affine_blobs

    rng = np.random.default_rng(4)
    shape = (1031, 520)  # above KERNEL_PARALLEL_MIN_WEIGHTS
    assert shape[0] * shape[1] >= KERNEL_PARALLEL_MIN_WEIGHTS
    affine = StorageConfig.affine(3, 64, 25)
    blobs = {"affine": random_affine_blobs(rng, shape, affine),
             "fp16": {"data": rng.standard_normal(shape).astype(np.float16)}}
    x = rng.standard_normal((2, 520)).astype(np.float32)
    for kind, config in (("affine", affine), ("fp16", StorageConfig.fp16())):
        results = []
        for threads in (1, 2, 5):
            backend = NumpyBackend(threads=threads)
            weight = backend.prepare(_Entry("w", shape, config), blobs[kind])
            results += [backend.linear(x, weight) for _ in range(2 * ThreadChoice.PROBE)]
            backend.close()
        for y in results[1:]:
            np.testing.assert_array_equal(y, results[0])  # each row is computed the same way in any part


def test_matrices_of_one_shape_share_a_thread_choice(jit):
    from conftest import random_affine_blobs

    rng = np.random.default_rng(10)
    config = StorageConfig.affine(4, 64, 0)
    backend = NumpyBackend(threads=2)
    a, b, c = (backend.prepare(_Entry("w", shape, config), random_affine_blobs(rng, shape, config))
               for shape in ((1024, 512), (1024, 512), (512, 1024)))
    small = backend.prepare(_Entry("w", (64, 64), config), random_affine_blobs(rng, (64, 64), config))
    assert a.threads_choice is b.threads_choice and a.threads_choice is not c.threads_choice
    assert small.threads_choice is None and NumpyBackend(threads=1).prepare(
        _Entry("w", (1024, 512), config), random_affine_blobs(rng, (1024, 512), config)).threads_choice is None
    backend.close()


def test_thread_choice_probes_both_ways_then_keeps_the_faster():
    choice = ThreadChoice()
    seconds = {False: 2.0, True: 1.0}  # parallel faster
    picks = []
    for _ in range(3 * ThreadChoice.RETRY):
        parallel = choice.parallel()
        picks.append(parallel)
        choice.record(parallel, seconds[parallel])
    probe = 2 * ThreadChoice.PROBE
    assert picks[:probe] == [False, True] * ThreadChoice.PROBE
    later = picks[probe:]
    assert 0 < later.count(False) <= 3 and later.count(True) > 2 * ThreadChoice.RETRY  # serial only as retries
    seconds = {False: 1.0, True: 5.0}  # the machine got busy: parallel now slower
    for _ in range(3 * ThreadChoice.RETRY):
        parallel = choice.parallel()
        choice.record(parallel, seconds[parallel])
    assert sum(choice.parallel() for _ in range(ThreadChoice.RETRY)) == 1  # only the retry


def test_a_failing_kernel_falls_back_with_one_notice(capsys):
    from conftest import random_affine_blobs

    backend = NumpyBackend(threads=1)
    ref = NumpyBackend(threads=1, kernels=False)
    config = StorageConfig.affine(4, 64, 0)
    blobs = random_affine_blobs(np.random.default_rng(5), (16, 64), config)
    weight, w_ref = backend.prepare(_Entry("w", (16, 64), config), blobs), ref.prepare(_Entry("w", (16, 64), config), blobs)

    class Broken:
        NO_ROWS = NO_COLS = NO_VALUES = NO_FLOAT = NO_RESIDUAL = None

        @staticmethod
        def affine_matmul(*args):
            raise RuntimeError("LLVM exploded")

        affine_matmul_serial = stack_matmul = stack_matmul_serial = stack_matmul_team = affine_matmul

    state = dict(cpu_jit._state)
    try:
        backend.kernels = cpu_jit._state["kernels"] = Broken
        x = np.ones((1, 64), np.float32)
        np.testing.assert_array_equal(backend.linear(x, weight), ref.linear(x, w_ref))
        np.testing.assert_array_equal(backend.linear(x, weight), ref.linear(x, w_ref))
        assert backend.kernels is None
        err = capsys.readouterr().err
        assert err.count("compiled CPU kernels failed (RuntimeError: LLVM exploded)") == 1
    finally:
        cpu_jit._state.clear()
        cpu_jit._state.update(state)


def test_a_failing_op_falls_back_with_one_notice(capsys):
    backend, ref = NumpyBackend(threads=1), NumpyBackend(threads=1, kernels=False)

    class Broken:
        @staticmethod
        def rms_norm(*args):
            raise RuntimeError("LLVM exploded")

    state = dict(cpu_jit._state)
    try:
        backend.ops = Broken
        x, w = np.ones((2, 8), np.float32), np.arange(8, dtype=np.float32)
        np.testing.assert_array_equal(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        np.testing.assert_array_equal(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        assert backend.ops is None and backend.kernels is None
        assert capsys.readouterr().err.count("compiled CPU kernels failed (RuntimeError: LLVM exploded)") == 1
    finally:
        cpu_jit._state.clear()
        cpu_jit._state.update(state)


def test_kernels_can_be_switched_off_with_one_notice(monkeypatch, capsys):
    state = dict(cpu_jit._state)
    try:
        cpu_jit._state.clear()
        monkeypatch.setenv("MXQ_KERNELS", "numpy")
        assert cpu_jit.kernels() is None and cpu_jit.kernels() is None
        assert capsys.readouterr().err.count("compiled CPU kernels unavailable (MXQ_KERNELS=numpy)") == 1
        backend = NumpyBackend(threads=1)
        assert backend.kernels is None and backend.ops is None
    finally:
        cpu_jit._state.clear()
        cpu_jit._state.update(state)


def test_numba_cache_goes_under_the_mxq_cache_dir(jit):
    assert NumpyBackend(threads=1).kernels.kind == "jit"
    import numba

    assert numba.config.CACHE_DIR  # set before the kernels compiled (cpu_jit sets it when unset)


def test_lean_metadata_stays_as_stored():
    """Lean mode keeps the file's 8-bit scale/zero codes (views, no copies) and only the runs'
    (step, min) pairs as float32: no (out, groups) float arrays."""
    from conftest import random_affine_blobs

    shape, config = (300, 512), StorageConfig.affine(4, 32, 10)
    blobs = random_affine_blobs(np.random.default_rng(6), shape, config)
    backend = NumpyBackend(threads=1)
    weight = backend.prepare(_Entry("w", shape, config), blobs)
    assert np.shares_memory(weight.scale_codes, blobs["scale_codes"])
    assert np.shares_memory(weight.zero_codes, blobs["zero_codes"])
    assert np.shares_memory(weight.packed, blobs["qweight"])
    owned = [v.nbytes for v in vars(weight).values() if isinstance(v, np.ndarray) and v.base is None]
    codes_bytes = blobs["qweight"].nbytes
    assert sum(owned) <= codes_bytes / 100, owned  # only the per-run (step, min) pairs and column order
    scale, zero = weight.meta_rows(slice(None))
    from mxq.format_spec import decode_meta

    np.testing.assert_array_equal(scale, decode_meta(blobs["scale_codes"], blobs["scale_meta"]))
    np.testing.assert_array_equal(zero, decode_meta(blobs["zero_codes"], blobs["zero_meta"]))


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def _mapped(tmp_path, data: np.ndarray, offset: int = 100):
    """(mapping, view of `data` written into a file at a page-unaligned offset and mmapped back)."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * offset + data.tobytes())
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mapping, np.frombuffer(mapping, data.dtype, count=data.size, offset=offset).reshape(data.shape)


LINUX = hasattr(mmap, "MADV_DONTNEED") and os.path.exists("/proc/self/status")


@pytest.mark.skipif(not LINUX, reason="Linux: madvise and /proc")
def test_a_big_fp16_matrix_moves_off_the_mapping_without_growing_rss(tmp_path):
    """off_the_mapping copies a view of an mmapped file into anonymous memory and drops the mapping's
    pages it read: the copy is equal and read-only, the file-backed resident memory does not grow."""
    data = np.random.default_rng(7).standard_normal((4099, 1024)).astype(np.float16)  # ~8 MiB
    mapping, view = _mapped(tmp_path, data)
    before = _rss_file_kib()
    copy = off_the_mapping(view)
    grown_mib = (_rss_file_kib() - before) / 1024
    assert not np.shares_memory(copy, view) and not copy.flags.writeable
    np.testing.assert_array_equal(copy, data)
    assert grown_mib < 1, grown_mib  # at most the two partial pages at the blob's ends stay mapped
    plain = np.ones((3, 4), np.float16)
    assert off_the_mapping(plain) is plain  # not from a mapping: left as it is
    del view
    mapping.close()


@pytest.mark.skipif(not LINUX, reason="Linux: madvise and /proc")
def test_lean_mode_streams_a_big_fp16_matrix_from_anonymous_memory(backends, tmp_path):
    """With the kernels, lean mode moves an fp16 matrix of ≥ PRIVATE_COPY_MIN_BYTES (a tied lm_head) off
    the mapping; smaller ones, and the NumPy path, keep the file's view. Products are unchanged."""
    fast, ref = backends
    rows = PRIVATE_COPY_MIN_BYTES // (2 * 64) + 3
    data = np.random.default_rng(8).standard_normal((rows, 64)).astype(np.float16)
    mapping, view = _mapped(tmp_path, data)
    entry = _Entry("w", data.shape, StorageConfig.fp16())
    big, numpy_path = fast.prepare(entry, {"data": view}), ref.prepare(entry, {"data": view})
    small = fast.prepare(_Entry("w", (8, 64), StorageConfig.fp16()), {"data": view[:8]})
    assert not np.shares_memory(big.data, view)
    assert np.shares_memory(small.data, view) and np.shares_memory(numpy_path.data, view)
    x = np.random.default_rng(9).standard_normal((1, 64)).astype(np.float32)
    assert_close(fast.linear(x, big), ref.linear(x, numpy_path))
    del view, big, small, numpy_path
    mapping.close()


# ---- whole tiny models: kernel logits == NumPy-path logits ---------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_integer_sums_do_not_wrap_at_the_largest_codes_and_activations(backends, bits):
    """Every code at 2^bits − 1 and every activation at ±127 steps (x constant in magnitude, one sign per 32
    columns or all one sign): the largest integer sums the default kernels form still equal the NumPy path's
    (8-bit activations, whose AVX2 kernel sums int16 pairs over several code quads: the same check in
    test_every_integer_dot_lowering_matches_numpy_path)."""
    from conftest import random_affine_blobs

    fast, ref = backends
    rng = np.random.default_rng(bits)
    shape = (40, 256)
    for group in (32, 128):
        config = StorageConfig.affine(bits, group, 0)
        blobs = random_affine_blobs(rng, shape, config)
        blobs["qweight"] = np.full_like(blobs["qweight"], 0xFF)  # every code the largest
        w_fast, w_ref = fast.prepare(_Entry("w", shape, config), blobs), ref.prepare(_Entry("w", shape, config), blobs)
        dense = dequantize(blobs, shape, config)
        ones = np.ones((3, shape[1]), np.float32)
        signs = np.repeat(rng.choice([-1.0, 1.0], size=(3, shape[1] // 32)), 32, axis=1).astype(np.float32)
        for x in (ones, -ones, signs, ones[:1]):
            x_in, slack = quantized_input(x, dense)
            assert_close(fast.linear(x, w_fast), ref.linear(x_in, w_ref), slack)


@contextlib.contextmanager
def numpy_path_rounding_activations(stack_max_tokens: int):
    """The NumPy path, for the products the affine kernels would do (≤ stack_max_tokens: the stacks),
    multiplies by x rounded as the kernels round it (quantize_activations): the same arithmetic up to float sums."""
    from mxq.runtime.backends import cpu_weights

    original = cpu_weights.AffineWeight.numpy_matmul

    def rounding(self, x):
        return original(self, quantize_activations(x, LOW_PART) if x.shape[0] <= stack_max_tokens else x)

    cpu_weights.AffineWeight.numpy_matmul = rounding
    try:
        yield
    finally:
        cpu_weights.AffineWeight.numpy_matmul = original


@pytest.mark.parametrize("mode", ["aot", "jit"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_model_logits_match_numpy_path(tiny_models, name, mode):
    """Logits of the compiled path vs the NumPy path: 1e-4 · max|logits| when the NumPy path rounds the
    activations as the kernels do; LOGITS_TOLERANCE · max|logits| against the exact NumPy path."""
    import mxq

    with kernels_mode(mode), mxq.load(tiny_models[name]) as lm:
        assert lm.backend.kernels.kind == mode
        prompt = [1, 5, 9, 13, 2, 7]

        def run():  # prefill (NumPy path: more tokens than the kernel limit is not needed here) + decode steps
            cache = lm.model.new_cache(16)
            out = [lm.backend.to_host(lm.model.forward(prompt, cache))]
            for token in (3, 11, 4, 8):
                out.append(lm.backend.to_host(lm.model.forward([token], cache)))
            return np.concatenate(out)

        fast = run()
        saved = lm.backend.kernels, lm.backend.ops
        lm.backend.kernels = lm.backend.ops = None  # same weights, NumPy path
        exact = run()
        with numpy_path_rounding_activations(lm.backend.stack_max_tokens):
            rounded = run()
        lm.backend.kernels, lm.backend.ops = saved
    assert np.abs(fast - rounded).max() <= 1e-4 * np.abs(rounded).max()
    np.testing.assert_array_equal(fast.argmax(-1), rounded.argmax(-1))
    assert np.abs(fast - exact).max() <= LOGITS_TOLERANCE * np.abs(exact).max()


DOT_LOWERING_CHECK = """
import sys
import numpy as np
from mxq.runtime.backends import cpu_qdot
cpu_qdot.DOT_ISA = sys.argv[1]  # before anything compiles: the lowering under test (dot_isas: what this CPU runs)
from mxq.runtime.backends import cpu_kernels as K
from mxq.runtime.backends import cpu_stack_kernels as S
from mxq.format_spec import StorageConfig, dequantize
from mxq.runtime.backends.cpu_weights import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES, quantize_activations
from mxq.runtime.backends.numpy_backend import AffineWeight, NumpyBackend
from mxq.runtime.backends.cpu_stack import KernelStack
from mxq.runtime.backends.cpu_tiles import build
from conftest import random_affine_blobs
Entry = type("E", (), {})
rng, backend = np.random.default_rng(3), NumpyBackend(threads=1, kernels=False)
for bits in (2, 3, 4, 5, 6, 8):
    for group in (32, 64, 128):
        shape = (19, 333)
        config = StorageConfig.affine(bits, group, 0)
        entry = Entry(); entry.name, entry.shape, entry.config, entry.role = "w", shape, config, "linear"
        blobs = random_affine_blobs(rng, shape, config)
        w = AffineWeight(entry, blobs, backend)
        w._tiles = build(w.packed, w.scale_codes, w.zero_codes, w.scale_meta, w.zero_meta, bits, K.repack)  # as lean mode
        x = rng.standard_normal((2, shape[1])).astype(np.float32)
        high, low, dx, xsum, x_hat = K.tile_x(x, 11)  # the rounding this setting compiles: NumPy's, no low part at 8 bits
        assert (x_hat == quantize_activations(x, K.ACTIVATION_LOW_PART)).all() and (K.ACTIVATION_LOW_PART or not low.any())
        for largest in (False, True):  # random codes; every code 2^bits - 1 times x at +-127 steps (the largest sums)
            if largest:
                w = AffineWeight(entry, {**blobs, "qweight": np.full_like(blobs["qweight"], 0xFF)}, backend)
                w._tiles = build(w.packed, w.scale_codes, w.zero_codes, w.scale_meta, w.zero_meta, bits, K.repack)
                x = np.repeat(rng.choice([-1.0, 1.0], size=(2, 11)), 32, axis=1)[:, :shape[1]].astype(np.float32)
            y = np.empty((2, shape[0]), np.float32)
            K.affine_matmul_serial(x, w.packed, w.scale_codes, w.scale_meta, w.zero_codes, w.zero_meta, bits, group,
                                   NO_ROWS, NO_COLS, NO_VALUES, NO_FLOAT, NO_RESIDUAL, y, 1)
            want = w.numpy_matmul(quantize_activations(x, K.ACTIVATION_LOW_PART))
            assert np.abs(y - want).max() <= 2e-5 * np.abs(want).max(), (bits, group, largest)
            stack = KernelStack((w,), backend)  # the same matrix through the stack kernel (its tiles: cpu_tiles_kernels)
            S.stack_matmul_serial(x, stack.table, stack.out_rows, NO_FLOAT, NO_RESIDUAL, y, 1)
            assert np.abs(y - want).max() <= 2e-5 * np.abs(want).max(), (bits, group, largest, "stack")
print("ok", K.ACTIVATION_LOW_PART)
"""


def other_lowerings() -> list[tuple[str, str]]:
    """(lowering, $MXQ_ACTIVATIONS) pairs the other tests do not compile: every integer-dot lowering this CPU
    can run besides its default (generic always: aarch64 and older x86 take it; AVX2 on a VNNI machine) with
    ~16-bit activations (the tests' setting, conftest), and with 8-bit activations the default lowering and AVX2 (its
    own kernel)."""
    from mxq.runtime.backends import cpu_qdot

    isas = cpu_qdot.dot_isas()
    eight = [isas[0]] + ["avx2"] * ("avx2" in isas[1:])
    return [(isa, "16") for isa in isas[1:]] + [(isa, "8") for isa in eight]


def lowering_check(isa: str, activations: str) -> tuple:
    """(key, argv, env) of DOT_LOWERING_CHECK for one lowering and activation setting, in a subprocess with its own
    Numba cache in the test cache, one per version of the kernel sources (cpu_jit.cache_dir's rule)."""
    from mxq.runtime.backends import cpu_aot

    tests = os.path.dirname(os.path.abspath(__file__))  # conftest.random_affine_blobs
    numba_cache = TEST_CACHE / "numba-lowerings" / f"{cpu_aot.key()}-{isa}-{activations}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, tests]), "NUMBA_CACHE_DIR": str(numba_cache),
           "MXQ_ACTIVATIONS": activations}
    return f"lowering {isa} {activations}", [sys.executable, "-c", DOT_LOWERING_CHECK, isa], env


@pytest.mark.slow
@pytest.mark.parametrize("isa, activations", [pytest.param(*pair, marks=pytest.mark.early(*lowering_check(*pair)))
                                              for pair in other_lowerings()])
def test_every_integer_dot_lowering_matches_numpy_path(isa, activations):
    """cpu_qdot's lane dot product and the tiles' (cpu_tiles_kernels) with a lowering this CPU does not pick by
    default (LLVM's generic multiply-add; AVX2's on an AVX512-VNNI CPU) or with 8-bit activations: compiled in a
    subprocess (started early, see conftest), every bit width and group size against the NumPy path on x̂,
    random codes and the largest ones. (1-3 minutes of compiling, once per version of the kernel sources.)"""
    done = early_result(*lowering_check(isa, activations))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"ok {activations == '16'}"


# ---- the ahead-of-time build (cpu_aot.py) -------------------------------------------------------------

def test_ahead_of_time_kernels_load_without_numba_or_llvm():
    """The default kernels come from the extension built once into the (test) cache: a process that
    loads them and runs a product never imports Numba or llvmlite."""
    from mxq.runtime.backends import cpu_qdot

    with kernels_mode("aot"):
        assert NumpyBackend(threads=1).kernels is not None  # built (once per cache) or loaded
    code = ("import sys, numpy as np; from mxq.runtime.backends.numpy_backend import NumpyBackend; "
            "from mxq.format_spec import StorageConfig; b = NumpyBackend(threads=2); "
            "assert b.kernels.kind == 'aot' and not b.kernels.parallel, b.kernels; "
            f"assert b.kernels.dot_isa == {cpu_qdot.DOT_ISA!r}, b.kernels.dot_isa; "  # what the JIT would compile
            "w = b.prepare(type('E', (), dict(name='w', shape=(4, 64), config=StorageConfig.fp16(), role='linear')), "
            "{'data': np.ones((4, 64), np.float16)}); "
            "y = b.linear(np.ones((1, 64), np.float32), w); assert (y == 64).all(), y; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    env.pop("MXQ_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and done.stderr == ""


def test_a_failed_build_falls_back_to_the_jit_with_one_notice_and_is_not_retried(tmp_path, monkeypatch, capsys):
    from mxq.runtime.backends import cpu_aot

    monkeypatch.setattr(cpu_aot, "cache_dir", lambda: tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))  # the builder finds no C compiler
    with kernels_mode("auto"):
        assert cpu_jit.kernels().kind == "jit" and cpu_jit.kernels().kind == "jit"
    err = capsys.readouterr().err
    assert err.count("ahead-of-time CPU kernels unavailable (the kernel build failed: RuntimeError: no working C "
                     "compiler") == 1, err
    failed = cpu_aot.module_path().with_name(cpu_aot.module_path().name + ".failed")
    assert "no working C compiler" in failed.read_text() and not cpu_aot.module_path().exists()
    monkeypatch.setattr(cpu_aot, "build", lambda path: pytest.fail("retried a recorded failure"))
    with kernels_mode("aot"):
        assert cpu_jit.kernels() is None
    assert f"recorded in {failed}; delete it to retry" in capsys.readouterr().err


def test_the_build_key_follows_the_cpu_and_the_sources(monkeypatch):
    from mxq.runtime.backends import cpu_aot

    key = cpu_aot.key()
    assert cpu_aot.key() == key and cpu_aot.module_path().name.startswith(f"mxq_cpu_{key}.")
    monkeypatch.setattr(cpu_aot, "cpu_fingerprint", lambda: "another cpu")
    assert cpu_aot.key() != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu_aot, "SOURCES", cpu_aot.SOURCES[:-1])
    assert cpu_aot.key() != key
    assert {p.name for p in cpu_aot.SOURCES} >= {"cpu_kernels.py", "cpu_ops.py", "cpu_lut_kernels.py"}


def test_the_build_compiles_from_an_empty_numba_cache_of_its_own(tmp_path, monkeypatch):
    """Numba checks a cached function against its own file only: a build reusing a warm cache embedded the
    old machine code of kernels whose helpers had changed. Each build gets a new, empty cache directory,
    whatever $NUMBA_CACHE_DIR says, removed afterwards."""
    from mxq.runtime.backends import cpu_aot

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "users-cache"))
    seen = []

    def run(command, env, **kwargs):
        cache = Path(env["NUMBA_CACHE_DIR"])
        seen.append((cache, cache.is_dir() and not any(cache.iterdir())))
        (cache / "stale.nbi").write_bytes(b"")  # what a build leaves behind
        return subprocess.CompletedProcess(command, 1, "", "stopped here")

    monkeypatch.setattr(cpu_aot.subprocess, "run", run)
    for _ in range(2):
        assert "stopped here" in cpu_aot.build(tmp_path / "kernels" / "k.so")
    assert [empty for _, empty in seen] == [True, True]
    assert all(cache != tmp_path / "users-cache" and not cache.exists() for cache, _ in seen)


def test_the_jit_cache_follows_the_kernel_sources(monkeypatch):
    from mxq.runtime.backends import cpu_aot

    first = cpu_jit.cache_dir()
    assert first.name == cpu_aot.key() and first.parent.name == "numba"
    monkeypatch.setattr(cpu_aot, "SOURCES", cpu_aot.SOURCES[:-1])
    assert cpu_jit.cache_dir() != first


def test_the_kernel_builds_follow_the_activation_setting(monkeypatch, capsys):
    """Each $MXQ_ACTIVATIONS setting is its own build (AOT key and JIT cache); an unknown one: a notice, NumPy."""
    from mxq.runtime.backends import cpu_aot, cpu_weights

    first = cpu_aot.key()
    monkeypatch.setattr(cpu_weights, "ACTIVATION_SETTING", "8")
    assert cpu_aot.key() != first and cpu_jit.cache_dir().name == cpu_aot.key()
    monkeypatch.setattr(cpu_weights, "ACTIVATION_SETTING", "12")
    with kernels_mode("auto"):
        assert cpu_jit.kernels() is None
    assert "MXQ_ACTIVATIONS='12' is not one of 16, 8" in capsys.readouterr().err


def test_the_default_activations_follow_the_cpus_integer_dot_product():
    """Unset, $MXQ_ACTIVATIONS is cpu_weights.DEFAULT_ACTIVATIONS of the CPU's integer dot product (8 bits where
    AVX2 or VNNI multiplies), which /proc/cpuinfo's flags give without LLVM: the lowering cpu_qdot asks LLVM for."""
    from mxq.runtime.backends import cpu_qdot, cpu_weights

    assert cpu_weights.dot_isa_of(["fpu", "avx", "avx2", "fma"]) == "avx2"
    assert cpu_weights.dot_isa_of(["avx2", "avx512f", "avx512vl", "avx512_vnni"]) == "vnni"
    assert cpu_weights.dot_isa_of(["avx2", "avx512f", "avx512_vnni"]) == "avx2"  # 256-bit vpdpbusd needs VL
    assert cpu_weights.dot_isa_of(["fp", "asimd", "asimddp"]) == cpu_weights.dot_isa_of([]) == "generic"
    if "flags" in cpu_weights.cpu_info():  # x86 Linux ("Features" on Arm)
        assert cpu_weights.host_dot_isa() == cpu_qdot.dot_isas()[0]
    env = {**{k: v for k, v in os.environ.items() if k != "MXQ_ACTIVATIONS"}, "PYTHONPATH": PACKAGE_ROOT}
    show = ("from mxq.runtime.backends import cpu_weights as w; "
            "print(w.ACTIVATION_SETTING, w.DEFAULT_ACTIVATIONS[w.host_dot_isa()])")
    setting, default = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()
    assert setting == default in cpu_weights.ACTIVATIONS


def test_kernels_mode_must_be_known(capsys):
    with kernels_mode("fast"):
        assert cpu_jit.kernels() is None
    assert "MXQ_KERNELS='fast' is not one of auto, aot, jit, numpy" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma3"])
def test_a_prompt_run_in_pieces_gives_the_logits_of_one_pass(tmp_path, name):
    """Model runs a long prompt in pieces of backend.prefill_chunk tokens (bounded activations): the same
    logits as one pass, across Gemma 3's sliding window (8) and the kernels' token limit (exactly on the
    NumPy path; with the kernels, whose pieces round the activations, within LOGITS_TOLERANCE);
    last_only gives the last row."""
    import fixtures

    import mxq
    from mxq.converter import convert

    path = tmp_path / "m.mxq"
    convert(fixtures.ensure(name), path, bpw=4.5, quantizer="rtn", cache_dir=None)
    with mxq.load(path) as lm:
        ids = np.random.default_rng(0).integers(3, lm.config.vocab_size, 40)
        saved = lm.backend.kernels, lm.backend.ops
        results = {}
        for kernels in (False, True):
            lm.backend.kernels, lm.backend.ops = saved if kernels else (None, None)
            lm.backend.prefill_chunk = None
            whole = lm.model.logits(ids)
            lm.backend.prefill_chunk = 7  # 6 pieces of 7 tokens (decode kernels) and one of 5
            pieces = lm.model.logits(ids)
            last = lm.backend.to_host(lm.model.forward(ids, lm.model.new_cache(40), last_only=True))
            results[kernels] = whole, pieces, last
    for kernels, (whole, pieces, last) in results.items():
        assert whole.shape == pieces.shape == (40, lm.config.vocab_size) and last.shape == (1, lm.config.vocab_size)
        tolerance = LOGITS_TOLERANCE if kernels else 1e-4
        assert np.abs(pieces - whole).max() <= tolerance * np.abs(whole).max()
        assert np.abs(last - pieces[-1:]).max() <= 1e-5 * np.abs(pieces).max()  # the lm_head on 1 row vs 5
