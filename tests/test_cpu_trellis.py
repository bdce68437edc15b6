"""The `trellis` scheme on the CPU: the compiled GEMV of cpu_trellis_kernels.py (parallel and serial forms) and the
handle of cpu_trellis.py (kernel path, NumPy path, cached mode, embedding rows, trellis blocks of a `rows` matrix in a
written file) against format_spec's reference dequantization: every K (2-5) × group size × awkward input widths
(one weight, less than a chunk of 8, around a group, SmolLM2's 576, a width that ends mid chunk), rows of one matrix
handled four at a time and singly, matrices placed right before an inaccessible page (a kernel reading past a row's
last word would crash: the rows have no padding word, layout.trellis_dims).

Tolerance: as test_cpu_vq.py's — float32 sums in another order than the float64 reference x·Wᵀ (W =
dequantize(blobs), itself exact in float32): |y − x·Wᵀ| ≤ RTOL·(|x|·|W|ᵀ) + 1e-6·(1 + |x·Wᵀ|) per element. The
kernels multiply x as given. The NumPy path's rows (dequantize_rows, the cached copy, embedding rows) are exact.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap

import numpy as np
import pytest

from conftest import random_trellis_blobs
from mxq.format_spec import MxqFile, StorageConfig, dequantize
from mxq.format_spec.layout import TRELLIS_BITS
from mxq.runtime.backends.cpu_weights import (KERNEL_MAX_TOKENS, KERNEL_PARALLEL_MIN_WEIGHTS, NO_FLOAT, NO_RESIDUAL,
                                              ThreadChoice, activation_low_part, quantize_activations, readonly)
from mxq.runtime.backends.numpy_backend import NumpyBackend
from test_cpu_kernels import JIT_KERNELS, backends, jit_kernels  # noqa: F401 - the fixture

pytestmark = pytest.mark.early(*JIT_KERNELS)  # the JIT's kernels compiled while other tests run (conftest: early)

RTOL = 1e-5
GROUPS = [32, 64, 128]
INPUTS = [1, 7, 63, 64, 65, 576, 1000]
OUTPUTS = [1, 6, 9]  # a lone row, a quad and a partial one, two quads and a row


class _Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, tuple(shape), config, role


def assert_close(y, x, weight, bias=None, residual=None, rounded_x=False):
    """y ≈ x @ Wᵀ (+ bias) (+ residual) within the module doc's bound; rounded_x: some rows come from the affine
    kernels, which multiply a rounded x̂ (cpu_weights.quantize_activations): |x − x̂|·|W|ᵀ more allowed."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    expected = x64 @ w64.T
    allowed = RTOL * (np.abs(x64) @ np.abs(w64).T)
    if rounded_x:
        allowed += np.abs(x64 - quantize_activations(x, activation_low_part())) @ np.abs(w64).T
    if bias is not None:
        expected += bias
    if residual is not None:
        expected += residual
    assert y.shape == expected.shape and y.dtype == np.float32
    assert np.all(np.abs(y - expected) <= allowed + 1e-6 * (1 + np.abs(expected)))


def trellis_blobs(rng, shape, config: StorageConfig) -> dict:
    """conftest's random_trellis_blobs with a table of its own (conftest's is one per K): levels of both signs and
    magnitudes, so a window read from the wrong bits shows."""
    blobs = random_trellis_blobs(rng, shape, config)
    blobs["codebook"] = (rng.standard_normal((4096, 1)) * 2.0).astype(np.float16)
    return blobs


_guarded = []  # the mappings of at_page_end's arrays (kept while the tests run)


def at_page_end(array: np.ndarray) -> np.ndarray:
    """A read-only copy of `array` whose last byte is the last before an inaccessible page (PROT_NONE): reading past
    it is a crash. The array itself where mprotect is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return readonly(array)
    page = mmap.PAGESIZE
    body = -(-array.nbytes // page) * page
    mapping = mmap.mmap(-1, body + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    if libc.mprotect(ctypes.c_void_p(base + body), page, 0) != 0:  # PROT_NONE
        return readonly(array)
    _guarded.append(mapping)
    copy = np.frombuffer(mapping, np.uint8, count=array.nbytes, offset=body - array.nbytes)
    copy = copy.view(array.dtype).reshape(array.shape)
    copy[...] = array
    return readonly(copy)


def kernel_args(blobs, config: StorageConfig):
    """trellis_matmul's weight arguments as TrellisWeight passes them (the rows' bytes right before a guard page)."""
    return (at_page_end(blobs["qweight"]).view(np.uint8), readonly(blobs["codebook"].astype(np.float32).reshape(-1)),
            config.bits, readonly(blobs["scale_codes"]), readonly(blobs["scale_meta"].astype(np.float32)),
            config.group_size)


@pytest.fixture(scope="module")
def trellis_kernels():
    """cpu_trellis_kernels compiled by Numba's JIT (test_cpu_kernels.jit_kernels)."""
    pytest.importorskip("numba")
    return jit_kernels().trellis()


# -- the kernels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_kernels_match_the_reference(trellis_kernels, bits, group):
    """trellis_matmul (3 parallel parts) and trellis_matmul_serial, T = 1 (four rows at a time) and 3 (a row's
    weights, then a dot per token), bias and residual, every awkward width, rows before a guard page."""
    rng = np.random.default_rng(100 * bits + group)
    for n_out, n_in in itertools.product(OUTPUTS, INPUTS):
        shape, config = (n_out, n_in), StorageConfig.trellis(bits, group)
        blobs = trellis_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        args = kernel_args(blobs, config)
        for tokens, extras in ((1, False), (1, True), (3, True)):
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            bias = rng.standard_normal(n_out).astype(np.float32) if extras else None
            residual = rng.standard_normal((tokens, n_out)).astype(np.float32) if extras else None
            for kernel in (trellis_kernels.trellis_matmul, trellis_kernels.trellis_matmul_serial):
                y = np.full((tokens, n_out), np.nan, np.float32)
                kernel(x, *args, NO_FLOAT if bias is None else bias, NO_RESIDUAL if residual is None else residual,
                       y, 3)
                assert_close(y, x, weight, bias, residual)


def test_kernels_read_every_window_and_scale(trellis_kernels):
    """One nonzero input at a time: y = column c of W, for every column of rows whose last chunks go through the
    guarded loads (a wrong shift, byte offset or group would show), one token and several."""
    rng = np.random.default_rng(3)
    for bits in TRELLIS_BITS:
        shape, config = (5, 203), StorageConfig.trellis(bits, 32)
        blobs = trellis_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        args = kernel_args(blobs, config)
        for c in range(shape[1]):
            x = np.zeros((1, shape[1]), np.float32)
            x[0, c] = 1.0
            y = np.empty((1, shape[0]), np.float32)
            trellis_kernels.trellis_matmul_serial(x, *args, NO_FLOAT, NO_RESIDUAL, y, 1)
            np.testing.assert_allclose(y[0], weight[:, c], rtol=1e-6, atol=0)
        x = np.eye(shape[1], dtype=np.float32)[:KERNEL_MAX_TOKENS]  # (16, in): token t picks column t
        y = np.empty((x.shape[0], shape[0]), np.float32)
        trellis_kernels.trellis_matmul_serial(x, *args, NO_FLOAT, NO_RESIDUAL, y, 1)
        np.testing.assert_allclose(y, weight[:, :x.shape[0]].T, rtol=1e-6, atol=0)


# -- the handle ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", TRELLIS_BITS)
def test_handle_kernel_and_numpy_path_match_the_reference(backends, bits, monkeypatch):
    """Products of 1, 3 (the kernel) and 20 tokens (> KERNEL_MAX_TOKENS: dequantize + sgemm, in chunks of 8 rows) on
    the compiled and the NumPy backend, bias and residual; dequantize_rows and embedding rows exactly the
    reference's; 6- and 8-bit scale codes."""
    from mxq.runtime.backends import cpu_weights

    monkeypatch.setattr(cpu_weights, "_chunk_rows", lambda tokens, row_elements: 8)  # several chunks per matrix
    fast, ref = backends
    rng = np.random.default_rng(bits)
    assert 20 > KERNEL_MAX_TOKENS
    for (n_out, n_in), group, meta_bits in itertools.product(((1, 1), (19, 65), (37, 576), (6, 1000)), GROUPS,
                                                             (6, 8)):
        shape, config = (n_out, n_in), StorageConfig.trellis(bits, group, meta_bits)
        blobs = trellis_blobs(rng, shape, config)
        weight = dequantize(blobs, shape, config)
        w_fast, w_ref = (backend.prepare(_Entry("w", shape, config), blobs) for backend in (fast, ref))
        np.testing.assert_array_equal(w_ref.dequantize_rows(slice(None)), weight)
        bias = rng.standard_normal(n_out).astype(np.float32)
        for tokens in (1, 3, 20):
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            residual = rng.standard_normal((tokens, n_out)).astype(np.float32)
            assert_close(fast.linear(x, w_fast), x, weight)
            assert_close(ref.linear(x, w_ref), x, weight)
            assert_close(fast.linear(x, w_fast, bias, residual.copy()), x, weight, bias, residual)
        ids = np.array([0, n_out - 1, 0, n_out // 2])
        np.testing.assert_array_equal(fast.embedding(w_fast, ids), weight[ids])
        np.testing.assert_array_equal(ref.embedding(w_ref, ids), weight[ids])
    assert fast.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)


def test_the_kernel_serves_decode_and_sgemm_serves_prefill(backends, monkeypatch):
    """Up to KERNEL_MAX_TOKENS tokens the compiled kernel multiplies (the NumPy path is not called), above it the
    NumPy path."""
    from mxq.runtime.backends.cpu_trellis import TrellisWeight

    fast, _ = backends
    rng = np.random.default_rng(11)
    shape, config = (40, 96), StorageConfig.trellis(3, 32)
    blobs = trellis_blobs(rng, shape, config)
    weight = dequantize(blobs, shape, config)
    handle = fast.prepare(_Entry("w", shape, config), blobs)
    calls = []
    original = TrellisWeight.numpy_matmul
    monkeypatch.setattr(TrellisWeight, "numpy_matmul", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    for tokens in (1, KERNEL_MAX_TOKENS, KERNEL_MAX_TOKENS + 1):
        x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
        assert_close(fast.linear(x, handle), x, weight)
    assert calls == [KERNEL_MAX_TOKENS + 1]


@pytest.mark.parametrize("bits", [2, 5])
def test_parallel_parts_and_cached_mode_match(bits):
    """A matrix big enough for ThreadChoice (Numba's JIT): its first calls alternate the serial and the parallel
    kernel — identical numbers, one token and several; the cached mode (float32 copy, BLAS) is the reference's."""
    pytest.importorskip("numba")
    from test_cpu_kernels import kernels_mode

    rng = np.random.default_rng(7)
    shape, config = (601, 1000), StorageConfig.trellis(bits, 64)
    assert shape[0] * shape[1] >= KERNEL_PARALLEL_MIN_WEIGHTS
    blobs = trellis_blobs(rng, shape, config)
    weight = dequantize(blobs, shape, config)
    with kernels_mode("jit"):
        lean, cached = NumpyBackend(threads=2), NumpyBackend(threads=2, cache_dequantized=True)
    handle = lean.prepare(_Entry("w", shape, config), blobs)
    assert lean.kernels.parallel and handle.threads_choice is not None
    for tokens in (1, 4):
        x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
        results = [lean.linear(x, handle) for _ in range(2 * ThreadChoice.PROBE)]
        for y in results:
            np.testing.assert_array_equal(y, results[0])
        assert_close(results[0], x, weight)
    cached_handle = cached.prepare(_Entry("w", shape, config), blobs)
    np.testing.assert_array_equal(cached_handle.dense, weight)
    assert_close(cached.linear(x, cached_handle), x, weight)
    lean.close()
    cached.close()


def test_a_written_file_with_trellis_tensors_and_row_blocks(tmp_path, backends):
    """write → MxqFile → the backend's handles: trellis matrices and a `rows` matrix with trellis blocks next to
    affine and vq ones; products (kernel and sgemm sizes) and embedding rows as the reference says; the file's
    table for a K widened once for every handle of that K (one Table), the streams zero-copy views of the file."""
    from test_rows_scheme import write_rows_file

    from mxq.runtime.backends.cpu_trellis import TrellisWeight

    fast, ref = backends
    parse = StorageConfig.parse
    tensors = [("a", (37, 70), parse("t2g32")), ("b", (50, 576), parse("t4g64m8")), ("c", (9, 130), parse("t4g128")),
               ("r", (40, 64), parse("rows(10:t4g32,10:b4g32,12:v2d4g64m8,8:t5g64)"))]
    path = tmp_path / "trellis.mxq"
    written = write_rows_file(path, tensors)
    rng = np.random.default_rng(17)
    with MxqFile.open(path) as f:
        assert f.verify() == []
        for backend in (fast, ref):
            handles = []
            for name, shape, config in tensors:
                blobs = f.blobs(name)
                for blob_name, array in written[name].items():
                    np.testing.assert_array_equal(blobs[blob_name], array)
                weight = dequantize(blobs, shape, config)
                handle = backend.prepare(f.tensors[name], blobs)
                parts = handle.blocks if config.scheme == "rows" else [handle]
                handles += [w for w in parts if isinstance(w, TrellisWeight)]
                for tokens in (1, 4, 20):
                    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
                    rounded = config.scheme == "rows" and backend.kernels is not None  # its affine block's kernels
                    assert_close(backend.linear(x, handle), x, weight, rounded_x=rounded)
                ids = np.array([shape[0] - 1, 0, 3, 3])
                np.testing.assert_array_equal(backend.embedding(handle, ids), weight[ids])
            assert len(handles) == 5
            fours = [w for w in handles if w.bits == 4]
            assert len(fours) == 3 and all(w.table is fours[0].table for w in fours)  # widened once per K
            assert fours[0].table is not next(w for w in handles if w.bits == 2).table
            for w in handles:
                assert not w.packed.flags.owndata and not w.packed.flags.writeable  # the file's bytes
    assert fast.kernels is not None


# -- a converted model --------------------------------------------------------------------------------------------

def greedy_steps(model, prompt, n):
    """Greedy tokens after `prompt` (prefill, then n − 1 decode steps of one token) and each step's logits."""
    cache = model.new_cache(len(prompt) + n)
    logits = [model.backend.to_host(model.forward(prompt, cache))]  # (T, vocab): every prompt position
    tokens = [int(np.argmax(logits[-1][-1]))]
    for _ in range(n - 1):
        logits.append(model.backend.to_host(model.forward([tokens[-1]], cache)))
        tokens.append(int(np.argmax(logits[-1][-1])))
    return tokens, logits


def test_a_converted_model_decodes_as_the_numpy_path(trellis_llama, backends, monkeypatch):
    """tiny-llama converted with trellis candidates (conftest's trellis_llama: every decoder linear t2g64 or t4g64):
    lean mode with the kernels — its layers cannot be fused (cpu_stack takes no trellis matrix: no kernel stack, so
    Model.block runs them), a 20-token prefill through dequantize + sgemm, decode through the trellis GEMV — and the
    cached mode give the NumPy reference path's greedy tokens, every step's logits within 2e-5 · max|logits| (float32
    sums in other orders through 2 layers, the kernels multiplying x as given; measured ≤ 1e-6); the runtime's
    generate (mxq.load, its default backend) yields those tokens."""
    import mxq
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.backends.cpu_trellis import TrellisWeight
    from mxq.runtime.model import Model

    fast, ref = backends
    calls = []  # (backend, path, tokens) of every trellis product
    kernel, numpy_path = TrellisWeight.kernel_matmul, TrellisWeight.numpy_matmul
    monkeypatch.setattr(TrellisWeight, "kernel_matmul", lambda self, kernels, x, *rest: calls.append(
        (self.backend, "kernel", x.shape[0])) or kernel(self, kernels, x, *rest))
    monkeypatch.setattr(TrellisWeight, "numpy_matmul", lambda self, x: calls.append(
        (self.backend, "numpy", x.shape[0])) or numpy_path(self, x))
    cached = NumpyBackend(threads=2, cache_dequantized=True)
    steps = 8
    with MxqFile.open(trellis_llama) as f:
        config = ModelConfig.from_json(f.model)
        prompt = np.random.default_rng(4).integers(0, config.vocab_size, 20).tolist()
        assert len(prompt) > KERNEL_MAX_TOKENS
        reference, lean, dense = (Model.from_file(f, config, backend) for backend in (ref, fast, cached))
        for model in (lean, dense):
            linears = [w for layer in model.layers for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up,
                                                              layer.down)]
            assert all(isinstance(w, TrellisWeight) for w in linears), [type(w).__name__ for w in linears]
        for w in linears:  # the cached mode's float32 copies: exactly the format's dequantization
            entry = f.tensors[w.name]
            np.testing.assert_array_equal(w.dense, dequantize(f.blobs(w.name), entry.shape, entry.config))
        fused = fast.fused_layers(lean, 1)
        assert fused is not None and fused.fused == [False] * config.num_hidden_layers
        assert all(fast.stack(members, 1) is None for layer in lean.layers
                   for members in ((layer.q, layer.k, layer.v), (layer.gate, layer.up), (layer.down,)))
        want_tokens, want_logits = greedy_steps(reference, prompt, steps)
        assert {(be, path) for be, path, _ in calls} == {(ref, "numpy")}
        calls.clear()
        for model in (lean, dense):
            tokens, logits = greedy_steps(model, prompt, steps)
            assert tokens == want_tokens
            for got, want in zip(logits, want_logits):
                assert got.shape == want.shape and np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    n_trellis = len(linears)
    assert calls == [(fast, "numpy", 20)] * n_trellis + [(fast, "kernel", 1)] * n_trellis * (steps - 1)
    assert fast.kernels is not None  # no kernel failed (a failure switches them off: the NumPy path)
    cached.close()
    with mxq.load(trellis_llama) as lm:
        assert lm.backend.kernels is not None and lm.backend.kernels.kind == fast.kernels.kind
        generated = list(lm.generate_ids(prompt, max_new_tokens=steps))  # stops at EOS, which it never yields
    assert generated == want_tokens[:len(generated)]
    assert len(generated) == steps or want_tokens[len(generated)] in lm.tokenizer.eos_ids
