"""The CUDA backend (runtime/backends/cuda_backend.py) against the numpy backend, on the CPU.

Everything but CuPy itself runs here: the backend is built with xp=numpy and the emulated launcher
(kernels/emulator.py: the same .cu sources compiled by g++, fibers mode), so its buffer layout,
launch geometry, kernel arguments, dtypes and KV cache are what is tested. Per-op tests launch with
guard=True (every argument between poisoned margins: a launch that writes past an array or into a
const one fails). A `gpu`-marked test runs the real CuPy path where a GPU exists.

Tolerances (and why):
  * linear, affine, lut, vq, trellis and fp16, every path (gemv_affine_* / gemv_f16 at T = 1, dequantize or fp16 → fp32
    conversion + GEMM at T > 1, prefill chunks, cache_dequantized): |y − y_numpy| ≤ 4e-6 · (|x|·|W|ᵀ) per element. Both backends compute the same
    products of the same dequantized weights in fp32 but sum in different orders (per-pack partial sums
    and a shuffle tree in the GEMV; the numpy backend's per-group BLAS products; different BLAS
    blockings), so each is within a few ulp of Σ|W·x| of the exact value — test_kernels.py bounds the
    GEMVs at 2e-6·Σ|W·x|; measured here ≤ 2.5e-7. Bias and residual add one more rounding (2⁻²³·|·|).
  * embedding (fp16 and affine rows), add, token_nll: exact (the same fp32 operations: dequantization
    is bit-exact with format_spec.dequantize, as is the numpy backend's).
  * rms_norm, rope: ≤ 1e-5 · max|input| (reduction order, expf/sinf/cosf of another math library: a few
    ulp); silu_mul: rtol 1e-6 (expf vs np.exp, 1 ulp); gelu_mul: ≤ 1e-6 · |gate·up|; scale: exact — as
    test_kernels.py. The new ops' semantics (partial rotary, attention scale and window, gelu_mul,
    scale) are checked against test_kernels.py's float64 formulas of the interface.
  * attention, float32 cache: ≤ 1e-5 · max|v| (online softmax vs numpy's two-pass softmax, fp32).
    fp16 cache (the GPU default): k and v are rounded to fp16 when stored (relative 2⁻¹¹), so
    ≤ 3e-3 · max|v| (measured ≤ 3e-4 on these random values; float32 cache: ≤ 2e-7).
  * end to end (tiny-llama, tiny-qwen2 converted by mxq.converter with configs "all" and 0.5% outliers):
    the greedy tokens are identical, and every step's logits agree within 2e-5 · max|logits| with the
    float32 cache (measured ≤ 2e-6: fp32 reordering through 2 layers) and 3e-3 · max|logits| with the
    fp16 cache (measured ≤ 8e-4). Fibers mode is deterministic, so these runs are reproducible.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import random_affine_blobs, random_lut_blobs, random_trellis_blobs, random_vq_blobs
from test_kernels import attention_reference, gelu_mul_reference, rope_reference
from test_kernels_vq import LAYOUTS
from mxq.format_spec import MxqFile, StorageConfig, dequantize
from mxq.format_spec.layout import VQ_INDEX_BITS, vq_dims
from mxq.kernels.emulator import EmulatedModule
from mxq.kernels.registry import AFFINE_CONFIGS, LUT_BITS, TRELLIS_KERNEL_BITS, VQ_CONFIGS
from mxq.runtime import ModelError
from mxq.runtime.backends.base import LayerCache
from mxq.runtime.backends.cuda_backend import (AffineHandle, CudaBackend, DenseHandle, LutHandle, TrellisHandle,
                                               VqHandle)
from mxq.runtime.backends.numpy_backend import NumpyBackend
from mxq.runtime.config import ModelConfig
from mxq.runtime.model import Model

f32 = np.float32


class Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, tuple(shape), config, role


class Recorder:
    """A kernel module that records the names of the kernels launched through it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def get_function(self, name):
        fn = self.module.get_function(name)

        def launch(grid, block, args, **kwargs):
            self.calls.append(name)
            fn(grid, block, args, **kwargs)

        return launch


def emulated(kv_cache="f32", guard=True, **options):
    """An emulated CUDA backend whose launches are recorded (backend.module.calls)."""
    return CudaBackend(np, Recorder(EmulatedModule(mode="fibers", guard=guard)), kv_cache=kv_cache, **options)


@pytest.fixture(scope="module")
def cuda():
    return emulated()


@pytest.fixture(scope="module")
def ref():
    return NumpyBackend(threads=1, kernels=False)  # the exact NumPy path (the kernels round x)


def magnitude(x, blobs, shape, config):
    """|x|·|W|ᵀ (T, out): the scale of the rounding error of any fp32 evaluation of x·Wᵀ."""
    w = dequantize(blobs, shape, config) if config.scheme != "fp16" else blobs["data"].astype(f32)
    return np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


def check_close(y, want, mag, extra=0.0):
    assert y.shape == want.shape and y.dtype == np.float32
    assert np.all(np.isfinite(y))
    err = np.abs(y.astype(np.float64) - want)
    bound = 4e-6 * mag + extra
    assert np.all(err <= bound), f"max err {err.max():.3g}; worst err/bound {(err / bound).max():.3g}"


# ---- linear -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("outliers", [0, 19], ids=["plain", "outliers"])
@pytest.mark.parametrize("bits,group_size", AFFINE_CONFIGS, ids=[f"b{b}g{g}" for b, g in AFFINE_CONFIGS])
def test_linear_matches_numpy_backend(cuda, ref, bits, group_size, outliers):
    """Every (bits, group) config; in_features padded in the last group, 37 rows = 2 GEMV blocks of
    16 + 5; T = 1 takes one fused GEMV launch, T = 5 one dequantization and a GEMM (no GEMV)."""
    shape = (37, 2 * group_size + 7)
    rng = np.random.default_rng(bits * 1000 + group_size + outliers)
    config = StorageConfig.affine(bits, group_size, outliers)
    blobs = random_affine_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, AffineHandle)
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        mag = magnitude(x, blobs, shape, config)
        for b in (None, bias):
            cuda.module.calls.clear()
            y = cuda.linear(x, w, None if b is None else cuda.upload(b))
            want = ref.linear(x, w_ref, b).astype(np.float64)
            check_close(y, want, mag, 0.0 if b is None else 2.0 ** -22 * np.abs(want))
            if T == 1:
                assert cuda.module.calls == [f"gemv_affine_b{bits}_g{group_size}"]  # bias fused
            else:
                assert cuda.module.calls == [f"dequant_affine_b{bits}_g{group_size}_f32"]


@pytest.mark.parametrize("codebook_rows,outliers", [(1, 0), (4, 19)], ids=["c1", "c4-outliers"])
@pytest.mark.parametrize("bits", LUT_BITS)
def test_lut_linear_and_embedding_match_numpy_backend(cuda, ref, bits, codebook_rows, outliers):
    """Every lut bit width: T = 1 is one fused gemv_lut launch (bias fused), T = 5 one dequant_lut and a
    GEMM; the embedding gather dequantizes the picked rows."""
    shape = (37, 71)
    rng = np.random.default_rng(bits * 100 + codebook_rows + outliers)
    config = StorageConfig.lut(bits, codebook_rows, outliers)
    blobs = random_lut_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, LutHandle)
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        mag = magnitude(x, blobs, shape, config)
        for b in (None, bias):
            cuda.module.calls.clear()
            y = cuda.linear(x, w, None if b is None else cuda.upload(b))
            want = ref.linear(x, w_ref, b).astype(np.float64)
            check_close(y, want, mag, 0.0 if b is None else 2.0 ** -22 * np.abs(want))
            assert cuda.module.calls == [f"gemv_lut_b{bits}" if T == 1 else f"dequant_lut_b{bits}_f32"]
    ids = np.array([3, 0, 36, 3])
    assert np.array_equal(cuda.embedding(w, ids), dequantize(blobs, shape, config)[ids])


def test_lut_model_matches_numpy_backend(tmp_path):
    """A converted tiny model whose linears are lut and affine: emulated CUDA (prefill: dequant_lut + GEMM,
    decode: gemv_lut) gives the numpy backend's greedy tokens and logits."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert

    path = tmp_path / "lut.mxq"
    convert(fixtures.ensure("tiny-llama"), path, bpw=3.0, configs="b2g64,b3g64,b4g64,l2,l3,l4,l3c4+o1%", quantizer="rtn",
            objective="frobenius", cache_dir=None)
    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        prompt = np.random.default_rng(2).integers(0, config.vocab_size, 6).tolist()
        reference = Model.from_file(f, config, NumpyBackend(threads=1, kernels=False))
        backend = emulated(guard=False)
        model = Model.from_file(f, config, backend)
        linears = [w for layer in model.layers for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up,
                                                          layer.down)]
        assert any(isinstance(w, LutHandle) for w in linears), [type(w).__name__ for w in linears]
        want_tokens, want_logits = greedy(reference, prompt, 4)
        backend.module.calls.clear()
        tokens, logits = greedy(model, prompt, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    assert any(c.startswith("gemv_lut_b") for c in backend.module.calls)
    assert any(c.startswith("dequant_lut_b") for c in backend.module.calls)


def vq_config(bits, dim, group_size, outliers=0, meta_bits=0):
    """A tensor's own codebook where the format allows one, else (b3d4: 12-bit indices) the file's shared one
    (random_vq_blobs then hands it over as the reader does: the `codebook` blob)."""
    return StorageConfig.vq(bits, dim, group_size, outliers, meta_bits, shared=bits * dim not in VQ_INDEX_BITS)


@pytest.mark.parametrize("group_size,outliers,meta_bits", [(32, 0, 6), (128, 19, 8)], ids=["g32", "g128m8-outliers"])
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=[f"b{b}d{d}" for b, d in VQ_CONFIGS])
def test_vq_linear_and_embedding_match_numpy_backend(cuda, ref, bits, dim, group_size, outliers, meta_bits):
    """Every vq (bits, dim), b3d4 with a shared codebook: T = 1 is one fused gemv_vq launch (bias fused),
    T = 5 one dequant_vq and a GEMM; the embedding gather dequantizes the picked rows (bit-exact)."""
    shape = (37, 71)  # a partial last vector for dim 4, a partial last group
    rng = np.random.default_rng(bits * 100 + dim * 10 + group_size + outliers)
    config = vq_config(bits, dim, group_size, outliers, meta_bits)
    blobs = random_vq_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, VqHandle) and w.shared == config.shared
    assert w.tail == (np.int32(blobs["qweight"].shape[1]), np.int32(group_size))  # words_per_row, group_size
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        mag = magnitude(x, blobs, shape, config)
        for b in (None, bias):
            cuda.module.calls.clear()
            y = cuda.linear(x, w, None if b is None else cuda.upload(b))
            want = ref.linear(x, w_ref, b).astype(np.float64)
            check_close(y, want, mag, 0.0 if b is None else 2.0 ** -22 * np.abs(want))
            assert cuda.module.calls == [f"gemv_vq_b{bits}_d{dim}" if T == 1 else f"dequant_vq_b{bits}_d{dim}_f32"]
    ids = np.array([3, 0, 36, 3])
    cuda.module.calls.clear()
    assert np.array_equal(cuda.embedding(w, ids), dequantize(blobs, shape, config)[ids])
    assert cuda.module.calls == [f"dequant_vq_b{bits}_d{dim}_f32"]


@pytest.mark.parametrize("minor", LAYOUTS.values(), ids=LAYOUTS)
@pytest.mark.parametrize("bits,dim", VQ_CONFIGS, ids=[f"b{b}d{d}" for b, d in VQ_CONFIGS])
def test_vq_kernels_take_qweight_width(cuda, bits, dim, minor):
    """The vq kernels get a row's word count from qweight as the file stores it: rows padded to whole words (format
    1.8; 136 columns: a partial last pack, an odd width for k = 4, 8) or to whole packs (1.7). Decode (gemv_vq),
    prefill (dequant_vq + GEMM) and the embedding gather against the reference dequantization."""
    shape, config = (21, 136), vq_config(bits, dim, 64, 7)
    rng = np.random.default_rng(bits * 10 + dim + minor)
    blobs = random_vq_blobs(rng, shape, config, minor)
    words = vq_dims(shape, config, minor)[2] * config.index_bits // 32
    assert blobs["qweight"].shape == (shape[0], words)
    w = cuda.prepare(Entry("w", shape, config), blobs)
    assert w.tail == (np.int32(words), np.int32(64))
    weight = dequantize(blobs, shape, config)
    for T in (1, 3):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        cuda.module.calls.clear()
        want = x.astype(np.float64) @ weight.astype(np.float64).T
        check_close(cuda.linear(x, w), want, magnitude(x, blobs, shape, config))
        assert cuda.module.calls == [f"gemv_vq_b{bits}_d{dim}" if T == 1 else f"dequant_vq_b{bits}_d{dim}_f32"]
    ids = np.array([20, 0, 7])
    assert np.array_equal(cuda.embedding(w, ids), weight[ids])


@pytest.mark.parametrize("bits", [2, 3], ids=["b2d4", "b3d4-shared"])
def test_vq_prefill_in_row_chunks_and_cache_dequantized(ref, bits):
    """A vq matrix dequantized in row chunks for prefill (one dequant_vq per chunk, with row ids), and
    with cache_dequantized once at prepare (prefill is then a plain GEMM, decode still the GEMV)."""
    shape, config = (70, 200), vq_config(bits, 4, 64, 11)
    rng = np.random.default_rng(8)
    blobs = random_vq_blobs(rng, shape, config)
    w_ref = ref.prepare(Entry("w", shape, config), blobs)
    x = rng.standard_normal((3, shape[1])).astype(f32)
    want, mag = ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, config)
    chunked = emulated(prefill_chunk_bytes=4 * shape[1] * 16)  # 16 rows per chunk: 5 chunks
    w = chunked.prepare(Entry("w", shape, config), blobs)
    check_close(chunked.linear(x, w), want, mag)
    assert chunked.module.calls == [f"dequant_vq_b{bits}_d4_f32"] * 5
    cached = emulated(cache_dequantized=True)
    w = cached.prepare(Entry("w", shape, config), blobs)
    assert np.array_equal(w.dense, dequantize(blobs, shape, config))
    for T, launched in ((3, []), (1, [f"gemv_vq_b{bits}_d4"])):
        cached.module.calls.clear()
        check_close(cached.linear(x[:T], w), want[:T], mag[:T])
        assert cached.module.calls == launched


class CountingBinding:
    """Wraps a backend's binding and records the shape of every host → device upload."""

    def __init__(self, binding):
        self.binding, self.uploads = binding, []

    def __getattr__(self, name):
        return getattr(self.binding, name)

    def to_device(self, array):
        self.uploads.append(tuple(np.shape(array)))
        return self.binding.to_device(array)


def test_shared_codebook_is_uploaded_once(tmp_path, ref):
    """A file whose vq tensors and row blocks use its shared codebooks (format 1.7: the reader hands each a view
    of the same codebook tensor's bytes): the backend uploads each shared codebook once, every handle using it
    holds that one device array, and each tensor gives the numpy backend's products."""
    from test_rows_scheme import reference_weight, write_rows_file

    from mxq.runtime.backends.row_blocks import RowBlocks

    tensors = [("a", (40, 136), vq_config(3, 4, 64, 5)), ("b", (24, 64), vq_config(3, 4, 32)),
               ("c", (33, 100), vq_config(3, 4, 128, 2, 8)),
               ("d", (20, 64), StorageConfig.vq(2, 4, 32, shared=True)), ("e", (20, 64), StorageConfig.vq(2, 4, 32)),
               ("r", (45, 71), StorageConfig.parse("rows(20:v3d4g64s+o9,16:v3d4g32m8s,9:v2d4g32s)"))]
    write_rows_file(tmp_path / "shared.mxq", tensors)
    backend = emulated()
    backend.binding = counting = CountingBinding(backend.binding)
    rng = np.random.default_rng(3)
    with MxqFile.open(tmp_path / "shared.mxq") as f:
        assert sorted(f.codebooks) == ["codebook.v2d4", "codebook.v3d4"]
        handles = {}
        for name, shape, config in tensors:
            entry, blobs = f.tensors[name], f.blobs(name)
            w, w_ref = backend.prepare(entry, blobs), ref.prepare(entry, blobs)
            handles[name] = w
            x = rng.standard_normal((1, shape[1])).astype(f32)
            want = ref.linear(x, w_ref).astype(np.float64)
            weight = (reference_weight if config.scheme == "rows" else dequantize)(blobs, shape, config)
            check_close(backend.linear(x, w), want, np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T)
        # one upload per distinct codebook: v3d4 (4096, 4) and v2d4 (256, 4) shared, and e's own (256, 4)
        assert counting.uploads.count((4096, 4)) == 1
        assert counting.uploads.count((256, 4)) == 2
        assert len(backend._codebooks) == 3
        blocks = handles["r"].blocks
        assert isinstance(handles["r"], RowBlocks) and all(isinstance(b, VqHandle) and b.shared for b in blocks)
        v3d4 = [handles["a"], handles["b"], handles["c"], blocks[0], blocks[1]]
        assert all(w.shared and w.blobs[1] is v3d4[0].blobs[1] for w in v3d4)
        assert blocks[2].blobs[1] is handles["d"].blobs[1] and handles["e"].blobs[1] is not handles["d"].blobs[1]
        assert backend.binding.address(v3d4[0].blobs[1]) % 16 == 0  # gemv_vq_b3_d4's 16-byte staging loads
        assert np.array_equal(v3d4[0].blobs[1], f.blobs("codebook.v3d4")["data"])
    backend.close()
    assert not backend._codebooks


# ---- trellis (format 1.9): the reference dequantization, as the numpy backend has no trellis path -------------

def reference_linear(x, weight, bias=None):
    """x (T, in) @ Wᵀ (+ bias) in float64."""
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    return y if bias is None else y + bias


@pytest.mark.parametrize("group_size,meta_bits", [(32, 6), (128, 8)], ids=["g32", "g128m8"])
@pytest.mark.parametrize("bits", TRELLIS_KERNEL_BITS)
def test_trellis_linear_and_embedding_match_dequantize(cuda, bits, group_size, meta_bits):
    """Every K: T = 1 is one fused gemv_trellis launch (bias fused), T = 5 one dequant_trellis and a GEMM; the
    embedding gather dequantizes the picked rows (bit-exact). The kernels get words_per_row (qweight's width:
    no padding word) and the group size last."""
    shape = (37, 71)  # a partial last chunk and group; 37 rows: 2 blocks of 16 + 5
    rng = np.random.default_rng(bits * 10 + group_size)
    config = StorageConfig.trellis(bits, group_size, meta_bits)
    blobs = random_trellis_blobs(rng, shape, config)
    w = cuda.prepare(Entry("w", shape, config), blobs)
    assert isinstance(w, TrellisHandle) and not w.outliers
    assert w.tail == (np.int32(-(-(12 + 70 * bits) // 32)), np.int32(group_size))
    weight = dequantize(blobs, shape, config)
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        mag = magnitude(x, blobs, shape, config)
        for b in (None, bias):
            cuda.module.calls.clear()
            y = cuda.linear(x, w, None if b is None else cuda.upload(b))
            want = reference_linear(x, weight, b)
            check_close(y, want, mag, 0.0 if b is None else 2.0 ** -22 * np.abs(want))
            assert cuda.module.calls == [f"gemv_trellis_b{bits}" if T == 1 else f"dequant_trellis_b{bits}_f32"]
    ids = np.array([3, 0, 36, 3])
    cuda.module.calls.clear()
    assert np.array_equal(cuda.embedding(w, ids), weight[ids])
    assert cuda.module.calls == [f"dequant_trellis_b{bits}_f32"]


def test_trellis_residual_and_awkward_widths(cuda):
    """A fused residual (and bias) at decode, and rows of 1, 7, 64, 65 columns (one-word rows, a one-column last
    chunk) through decode, prefill and the embedding gather."""
    rng = np.random.default_rng(9)
    for bits, in_features in ((2, 1), (3, 7), (5, 64), (4, 65)):
        shape, config = (19, in_features), StorageConfig.trellis(bits, 64)
        blobs = random_trellis_blobs(rng, shape, config)
        w = cuda.prepare(Entry("w", shape, config), blobs)
        weight = dequantize(blobs, shape, config)
        for T in (1, 4):
            x = rng.standard_normal((T, in_features)).astype(f32)
            bias = rng.standard_normal(shape[0]).astype(f32)
            residual = rng.standard_normal((T, shape[0])).astype(f32)
            want = reference_linear(x, weight, bias) + residual
            y = cuda.linear(x, w, cuda.upload(bias), residual=residual)
            check_close(y, want, magnitude(x, blobs, shape, config), 2.0 ** -21 * np.abs(want))
        assert np.array_equal(cuda.embedding(w, np.array([18, 0])), weight[[18, 0]])


def test_trellis_prefill_in_row_chunks_and_cache_dequantized():
    """A trellis matrix dequantized in row chunks for prefill (one dequant_trellis per chunk, with row ids), and
    with cache_dequantized once at prepare (prefill is then a plain GEMM, decode still the GEMV)."""
    shape, config = (70, 200), StorageConfig.trellis(3, 64)
    rng = np.random.default_rng(8)
    blobs = random_trellis_blobs(rng, shape, config)
    weight = dequantize(blobs, shape, config)
    x = rng.standard_normal((3, shape[1])).astype(f32)
    want, mag = reference_linear(x, weight), magnitude(x, blobs, shape, config)
    chunked = emulated(prefill_chunk_bytes=4 * shape[1] * 16)  # 16 rows per chunk: 5 chunks
    w = chunked.prepare(Entry("w", shape, config), blobs)
    check_close(chunked.linear(x, w), want, mag)
    assert chunked.module.calls == ["dequant_trellis_b3_f32"] * 5
    cached = emulated(cache_dequantized=True)
    w = cached.prepare(Entry("w", shape, config), blobs)
    assert np.array_equal(w.dense, weight)
    for T, launched in ((3, []), (1, ["gemv_trellis_b3"])):
        cached.module.calls.clear()
        check_close(cached.linear(x[:T], w), want[:T], mag[:T])
        assert cached.module.calls == launched


def test_trellis_table_is_uploaded_once(tmp_path):
    """A file whose trellis tensors and row blocks read its tables (one per K, the reader handing each a view of
    the table tensor's bytes): the backend uploads each table once, every handle of that K holds the one device
    array (16-byte aligned for the GEMV's staging loads), and each tensor's products match the reference."""
    from test_rows_scheme import reference_weight, write_rows_file

    from mxq.runtime.backends.row_blocks import RowBlocks

    tensors = [("a", (40, 136), StorageConfig.trellis(4, 64)), ("b", (24, 65), StorageConfig.trellis(4, 32, 8)),
               ("c", (7, 7), StorageConfig.trellis(2, 128)),
               ("r", (45, 71), StorageConfig.parse("rows(20:t4g64,16:t3g32m8,9:b4g32)"))]
    write_rows_file(tmp_path / "trellis.mxq", tensors)
    backend = emulated()
    backend.binding = counting = CountingBinding(backend.binding)
    rng = np.random.default_rng(3)
    with MxqFile.open(tmp_path / "trellis.mxq") as f:
        assert sorted(f.codebooks) == ["codebook.t2", "codebook.t3", "codebook.t4"]
        handles = {}
        for name, shape, config in tensors:
            entry, blobs = f.tensors[name], f.blobs(name)
            w = handles[name] = backend.prepare(entry, blobs)
            weight = (reference_weight if config.scheme == "rows" else dequantize)(blobs, shape, config)
            for T in (1, 2):
                x = rng.standard_normal((T, shape[1])).astype(f32)
                check_close(backend.linear(x, w), reference_linear(x, weight),
                            np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T)
        assert counting.uploads.count((4096, 1)) == 3 == len(backend._codebooks)  # t4, t2, t3: once each
        blocks = handles["r"].blocks
        assert isinstance(handles["r"], RowBlocks) and [type(b) for b in blocks] == [TrellisHandle, TrellisHandle,
                                                                                      AffineHandle]
        t4 = [handles["a"], handles["b"], blocks[0]]
        assert all(w.blobs[1] is t4[0].blobs[1] for w in t4)
        assert len({id(w.blobs[1]) for w in (handles["a"], handles["c"], blocks[1])}) == 3
        assert all(backend.binding.address(w.blobs[1]) % 16 == 0 for w in (handles["a"], handles["c"], blocks[1]))
        assert np.array_equal(t4[0].blobs[1], f.blobs("codebook.t4")["data"])
    backend.close()
    assert not backend._codebooks


def test_vq_model_matches_numpy_backend(tmp_path):
    """A converted tiny model whose linears are vq and affine: emulated CUDA (prefill: dequant_vq + GEMM,
    decode: gemv_vq) gives the numpy backend's greedy tokens and logits."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert

    path = tmp_path / "vq.mxq"
    convert(fixtures.ensure("tiny-llama"), path, bpw=4.0, configs="b3g64,v2d4g64,v2d2g32,v3d2g128+o1%",
            quantizer="rtn", objective="frobenius", cache_dir=None)
    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        prompt = np.random.default_rng(2).integers(0, config.vocab_size, 6).tolist()
        reference = Model.from_file(f, config, NumpyBackend(threads=1, kernels=False))
        backend = emulated(guard=False)
        model = Model.from_file(f, config, backend)
        linears = [w for layer in model.layers for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up,
                                                          layer.down)]
        assert any(isinstance(w, VqHandle) for w in linears), [type(w).__name__ for w in linears]
        want_tokens, want_logits = greedy(reference, prompt, 4)
        backend.module.calls.clear()
        tokens, logits = greedy(model, prompt, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    assert any(c.startswith("gemv_vq_b") for c in backend.module.calls)
    assert any(c.startswith("dequant_vq_b") for c in backend.module.calls)


def test_trellis_model_matches_numpy_backend(trellis_llama):
    """tiny-llama converted with trellis candidates (conftest's trellis_llama: every decoder linear t2g64 or t4g64):
    emulated CUDA (prefill: dequant_trellis + GEMM, decode: gemv_trellis, both tables uploaded once) gives the numpy
    backend's greedy tokens and logits."""
    with MxqFile.open(trellis_llama) as f:
        config = ModelConfig.from_json(f.model)
        prompt = np.random.default_rng(2).integers(0, config.vocab_size, 6).tolist()
        reference = Model.from_file(f, config, NumpyBackend(threads=1, kernels=False))
        backend = emulated(guard=False)
        model = Model.from_file(f, config, backend)
        linears = [w for layer in model.layers for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up,
                                                          layer.down)]
        trellis = [w for w in linears if isinstance(w, TrellisHandle)]
        assert trellis, [type(w).__name__ for w in linears]
        assert len(backend._codebooks) == 2 == len({id(w.blobs[1]) for w in trellis})  # t2 and t4: one upload each
        want_tokens, want_logits = greedy(reference, prompt, 4)
        backend.module.calls.clear()
        tokens, logits = greedy(model, prompt, 4)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    for bits in (2, 4):
        assert f"gemv_trellis_b{bits}" in backend.module.calls
        assert f"dequant_trellis_b{bits}_f32" in backend.module.calls


ODD_SHAPES = [
    # bits, group, shape, outliers
    (5, 32, (1030, 65), 9),  # ≥ 1024 rows: 8-warp GEMV blocks, last block 6 rows
    (3, 128, (5, 4200), 7),  # 132 packs: two activation tiles in the GEMV, several dequant tiles
    (6, 64, (3, 1100), 5),
    (8, 64, (70, 20), 0),  # in < 32: one pack, mostly padding
    (2, 32, (1, 40), 2),  # a single row
]


@pytest.mark.parametrize("bits,group_size,shape,outliers", ODD_SHAPES,
                         ids=[f"b{c[0]}g{c[1]}-{c[2][0]}x{c[2][1]}" for c in ODD_SHAPES])
def test_linear_odd_shapes(cuda, ref, bits, group_size, shape, outliers):
    rng = np.random.default_rng(shape[0] + shape[1])
    config = StorageConfig.affine(bits, group_size, outliers)
    blobs = random_affine_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    for T in (1, 3):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        check_close(cuda.linear(x, w), ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, config))


def test_prefill_in_row_chunks(ref):
    """A matrix bigger than prefill_chunk_bytes is dequantized in row chunks (row_ids = the chunk's
    rows, outliers included), one GEMM each: 37 rows in chunks of 8 (the last one 5)."""
    shape, config = (37, 100), StorageConfig.affine(3, 32, 30)
    rng = np.random.default_rng(8)
    blobs = random_affine_blobs(rng, shape, config)
    backend = emulated(prefill_chunk_bytes=8 * 4 * shape[1])
    w, w_ref = backend.prepare(Entry("w", shape, config), blobs), ref.prepare(Entry("w", shape, config), blobs)
    x = rng.standard_normal((6, shape[1])).astype(f32)
    backend.module.calls.clear()
    y = backend.linear(x, w)
    assert backend.module.calls == ["dequant_affine_b3_g32_f32"] * 5
    check_close(y, ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, config))


@pytest.mark.parametrize("shape", [(50, 33), (37, 576), (1030, 64)], ids=["50x33", "37x576", "1030x64"])
def test_fp16_linear(cuda, ref, shape):
    """fp16 matrices: T = 1 is one gemv_f16 launch on the stored fp16 data (bias fused); T > 1 converts
    to float32 into scratch and multiplies (no kernel launch); no float32 copy of the matrix is kept.
    in = 33 takes the kernel's 2-byte loads, 576 and 64 its 16-byte loads."""
    rng = np.random.default_rng(shape[0] + shape[1])
    blobs = {"data": rng.standard_normal(shape).astype(np.float16)}
    entry = Entry("w", shape, StorageConfig.fp16())
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, DenseHandle) and w.data.dtype == np.float16 and w.nbytes == blobs["data"].nbytes
    assert w.data.__array_interface__["data"][0] % 16 == 0
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 4):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        for b in (None, bias):
            cuda.module.calls.clear()
            want = ref.linear(x, w_ref, b).astype(np.float64)
            y = cuda.linear(x, w, None if b is None else cuda.upload(b))
            check_close(y, want, magnitude(x, blobs, shape, entry.config), 0.0 if b is None else 2.0 ** -22 * np.abs(want))
            assert cuda.module.calls == (["gemv_f16"] if T == 1 else [])
            assert w.dense is None


def test_fp16_residual_and_tied_lm_head(cuda, ref):
    """A tied fp16 embedding (role "embedding", as SmolLM2's 49152×576 table) used as the lm_head:
    gathered by embedding_f16, multiplied at decode by gemv_f16 on the same fp16 array (residual
    fused), and never copied to float32."""
    rng = np.random.default_rng(13)
    shape = (300, 48)
    blobs = {"data": rng.standard_normal(shape).astype(np.float16)}
    entry = Entry("model.embed_tokens.weight", shape, StorageConfig.fp16(), "embedding")
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    cuda.module.calls.clear()
    assert np.array_equal(cuda.embedding(w, [5, 299]), blobs["data"][[5, 299]].astype(f32))
    x = rng.standard_normal((1, shape[1])).astype(f32)
    residual = rng.standard_normal((1, shape[0])).astype(f32)
    want = ref.linear(x, w_ref).astype(np.float64) + residual
    y = cuda.linear(x, w, residual=residual)
    check_close(y, want, magnitude(x, blobs, shape, entry.config), 2.0 ** -22 * np.abs(want))
    assert cuda.module.calls == ["embedding_f16", "gemv_f16"]
    assert w.dense is None


def test_fp16_prefill_in_row_chunks(ref):
    """T > 1 on an fp16 matrix bigger than prefill_chunk_bytes: float32 row blocks of at most that
    size in one reused scratch buffer (37 rows in chunks of 8), never a whole float32 copy."""
    shape = (37, 100)
    rng = np.random.default_rng(14)
    blobs = {"data": rng.standard_normal(shape).astype(np.float16)}
    entry = Entry("w", shape, StorageConfig.fp16())
    backend = emulated(prefill_chunk_bytes=8 * 4 * shape[1])
    w, w_ref = backend.prepare(entry, blobs), ref.prepare(entry, blobs)
    x = rng.standard_normal((6, shape[1])).astype(f32)
    backend.module.calls.clear()
    check_close(backend.linear(x, w), ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, entry.config))
    assert backend.module.calls == [] and w.dense is None
    assert backend._scratch[("dequant", np.dtype(f32))].size == 8 * shape[1]


def test_linear_with_fused_residual(cuda, ref):
    """linear(x, W, bias, residual) = x·Wᵀ + bias + residual; at decode, one GEMV launch does it all
    (plus one add to combine bias and residual when both are given)."""
    shape, config = (40, 96), StorageConfig.affine(4, 32, 6)
    rng = np.random.default_rng(4)
    blobs = random_affine_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = cuda.prepare(entry, blobs), ref.prepare(entry, blobs)
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 4):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        residual = rng.standard_normal((T, shape[0])).astype(f32)
        mag = magnitude(x, blobs, shape, config)
        for b in (None, bias):
            cuda.module.calls.clear()
            kept = residual.copy()
            y = cuda.linear(x, w, None if b is None else cuda.upload(b), residual=residual)
            want = ref.linear(x, w_ref, b).astype(np.float64) + residual
            check_close(y, want, mag, 2.0 ** -21 * (np.abs(want) + np.abs(residual)))
            assert np.array_equal(residual, kept)  # the residual argument is not modified
            if T == 1:
                assert cuda.module.calls == (["gemv_affine_b4_g32"] if b is None else ["add_f32", "gemv_affine_b4_g32"])


def test_cache_dequantized_keeps_dense_matrices(ref):
    """cache_dequantized=True: affine matrices are dequantized once at prepare; prefill is then a
    plain GEMM (no dequant launch) and decode still the GEMV; embeddings stay packed."""
    backend = emulated(cache_dequantized=True)
    shape, config = (37, 70), StorageConfig.affine(5, 64, 4)
    rng = np.random.default_rng(5)
    blobs = random_affine_blobs(rng, shape, config)
    w, w_ref = backend.prepare(Entry("w", shape, config), blobs), ref.prepare(Entry("w", shape, config), blobs)
    assert np.array_equal(w.dense, dequantize(blobs, shape, config))
    assert backend.prepare(Entry("e", shape, config, role="embedding"), blobs).dense is None
    for T, launched in ((4, []), (1, ["gemv_affine_b5_g64"])):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        backend.module.calls.clear()
        check_close(backend.linear(x, w), ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, config))
        assert backend.module.calls == launched
    # fp16: a float32 copy at prepare (a tied embedding: on its first prefill use); decode is gemv_f16
    table = {"data": rng.standard_normal((40, 24)).astype(np.float16)}
    for role in ("linear", "embedding"):
        entry = Entry("f", (40, 24), StorageConfig.fp16(), role)
        w, w_ref = backend.prepare(entry, table), ref.prepare(entry, table)
        assert (w.dense is None) == (role == "embedding")
        for T, launched in ((4, []), (1, ["gemv_f16"])):
            x = rng.standard_normal((T, 24)).astype(f32)
            backend.module.calls.clear()
            check_close(backend.linear(x, w), ref.linear(x, w_ref).astype(np.float64),
                        magnitude(x, table, (40, 24), entry.config))
            assert backend.module.calls == launched
            assert np.array_equal(w.dense, table["data"].astype(f32))


def test_unaligned_qweight_is_copied_to_an_aligned_buffer(cuda, ref):
    shape, config = (21, 64), StorageConfig.affine(4, 64)
    rng = np.random.default_rng(6)
    blobs = random_affine_blobs(rng, shape, config)
    q = blobs["qweight"]
    raw = np.zeros(q.nbytes + 64, np.uint8)
    start = (16 - raw.__array_interface__["data"][0] % 16) % 16 + 4  # 4 bytes past a 16-byte boundary
    unaligned = raw[start:start + q.nbytes].view(np.uint32).reshape(q.shape)
    unaligned[...] = q
    assert unaligned.__array_interface__["data"][0] % 16 == 4
    w = cuda.prepare(Entry("w", shape, config), dict(blobs, qweight=unaligned))
    assert w.blobs[0].__array_interface__["data"][0] % 16 == 0 and np.array_equal(w.blobs[0], q)
    x = rng.standard_normal((1, shape[1])).astype(f32)
    check_close(cuda.linear(x, w), ref.linear(x, ref.prepare(Entry("w", shape, config), blobs)).astype(np.float64),
                magnitude(x, blobs, shape, config))


def test_prepare_uploads_blobs_as_stored(cuda):
    shape, config = (9, 40), StorageConfig.affine(3, 32, 3)
    blobs = random_affine_blobs(np.random.default_rng(7), shape, config)
    w = cuda.prepare(Entry("w", shape, config), blobs)
    names = ("qweight", "scale_codes", "scale_meta", "zero_codes", "zero_meta", "outlier_row_ptr", "outlier_cols",
             "outlier_values")
    for device, name in zip(w.blobs, names):
        assert device.dtype == blobs[name].dtype and np.array_equal(device, blobs[name]), name
    norm = cuda.prepare(Entry("n", (5,), StorageConfig.fp16(), role="norm"), {"data": np.arange(5, dtype=np.float16)})
    assert norm.dtype == np.float32 and np.array_equal(norm, np.arange(5))


def test_bad_outliers_raise_model_error_naming_tensor(cuda):
    config = StorageConfig.affine(4, 32, 3)
    blobs = random_affine_blobs(np.random.default_rng(0), (4, 64), config)
    blobs["outlier_cols"] = np.array([5, 3, 1], dtype=np.uint16)
    blobs["outlier_row_ptr"] = np.array([0, 3, 3, 3, 3], dtype=np.uint32)  # decreasing columns in row 0
    with pytest.raises(ModelError, match="model.layers.0.mlp.up_proj.weight"):
        cuda.prepare(Entry("model.layers.0.mlp.up_proj.weight", (4, 64), config), blobs)
    with pytest.raises(ModelError, match="'b'.*1-D tensors must be fp16"):
        cuda.prepare(Entry("b", (64,), StorageConfig.affine(4, 32)), {})


# ---- embedding and the other ops -----------------------------------------------------------------------

def test_embedding_fp16_and_quantized(cuda, ref):
    rng = np.random.default_rng(9)
    ids = np.array([7, 0, 49, 7, 12], dtype=np.int64)
    table = {"data": rng.standard_normal((50, 24)).astype(np.float16)}
    fp16 = Entry("model.embed_tokens.weight", (50, 24), StorageConfig.fp16(), "embedding")
    cuda.module.calls.clear()
    got = cuda.embedding(cuda.prepare(fp16, table), ids)
    assert cuda.module.calls == ["embedding_f16"]
    assert got.dtype == np.float32 and np.array_equal(got, ref.embedding(ref.prepare(fp16, table), ids))
    for bits, group, dim, outliers in ((4, 32, 96, 30), (3, 64, 70, 0), (8, 128, 200, 11)):
        config = StorageConfig.affine(bits, group, outliers)
        blobs = random_affine_blobs(rng, (50, dim), config)
        entry = Entry("model.embed_tokens.weight", (50, dim), config, "embedding")
        cuda.module.calls.clear()
        got = cuda.embedding(cuda.prepare(entry, blobs), ids)
        assert cuda.module.calls == [f"dequant_affine_b{bits}_g{group}_f32"]  # only the rows asked for
        assert np.array_equal(got, ref.embedding(ref.prepare(entry, blobs), ids))
        assert np.array_equal(got, dequantize(blobs, (50, dim), config)[ids])


@pytest.mark.parametrize("rows,dim", [(1, 96), (3, 577), (2, 2048)])
def test_rms_norm(cuda, ref, rows, dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((rows, dim)) * 3).astype(f32)
    weight = rng.standard_normal(dim).astype(np.float16).astype(f32)
    want = ref.rms_norm(x, weight, 1e-5)
    np.testing.assert_allclose(cuda.rms_norm(x, cuda.upload(weight), 1e-5), want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("n_heads,head_dim", [(4, 24), (3, 64), (2, 128)])
def test_rope(cuda, ref, n_heads, head_dim):
    rng = np.random.default_rng(head_dim)
    positions = np.array([5, 6, 7, 4000], dtype=np.int64)
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, head_dim, 2) / head_dim))).astype(f32)
    x = rng.standard_normal((4, n_heads * head_dim)).astype(f32)
    kept = x.copy()
    got = cuda.rope(x, positions, cuda.upload(inv_freq))
    np.testing.assert_allclose(got, ref.rope(x, positions, inv_freq), rtol=0, atol=1e-5 * np.abs(x).max())
    assert np.array_equal(x, kept)  # a new array, as the interface says
    got = cuda.rope(x[1:2], positions[1:2], cuda.upload(inv_freq))  # decode: one token
    np.testing.assert_allclose(got, ref.rope(x[1:2], positions[1:2], inv_freq), rtol=0, atol=1e-5 * np.abs(x).max())


ROPE_PARTIAL = [(3, 96, 48), (2, 64, 16), (4, 256, 256), (2, 128, 128)]  # n_heads, head_dim, rotary_dim


@pytest.mark.parametrize("n_heads,head_dim,rotary_dim", ROPE_PARTIAL, ids=[f"h{c[0]}d{c[1]}r{c[2]}" for c in ROPE_PARTIAL])
def test_rope_head_dim(cuda, n_heads, head_dim, rotary_dim):
    """rope(x, positions, inv_freq, head_dim): the first 2·len(inv_freq) dims of each head rotate, the
    rest are copied; head_dim=None means head_dim = 2·len(inv_freq)."""
    rng = np.random.default_rng(head_dim + rotary_dim)
    positions = np.array([3, 4, 5, 1000, 1001], dtype=np.int64)
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim))).astype(f32)
    x = rng.standard_normal((5, n_heads * head_dim)).astype(f32)
    got = cuda.rope(x, positions, cuda.upload(inv_freq), head_dim)
    np.testing.assert_allclose(got, rope_reference(x, positions, inv_freq, head_dim), rtol=0, atol=1e-5 * np.abs(x).max())
    tail = (np.arange(x.shape[1]) % head_dim) >= rotary_dim
    assert np.array_equal(got[:, tail], x[:, tail])
    if rotary_dim == head_dim:
        assert np.array_equal(got, cuda.rope(x, positions, cuda.upload(inv_freq)))
    with pytest.raises(ValueError, match="rope"):
        cuda.rope(x, positions, cuda.upload(inv_freq), head_dim + 1)


@pytest.mark.parametrize("T,n_heads,head_dim", [(3, 2, 128), (2, 4, 256), (1, 3, 64)])
def test_per_head_rms_norm_on_a_view(cuda, T, n_heads, head_dim):
    """Qwen3 / Gemma 3 q/k norms: the model reshapes (T, n·hd) → (T·n, hd) — a view, no copy — calls
    rms_norm, and reshapes the (T·n, hd) result back (again a view)."""
    rng = np.random.default_rng(head_dim + T)
    q = cuda.upload((rng.standard_normal((T, n_heads * head_dim)) * 3).astype(f32))
    weight = (1.0 + rng.standard_normal(head_dim) * 0.1).astype(np.float16).astype(f32)
    heads = q.reshape(T * n_heads, head_dim)
    assert np.shares_memory(heads, q)
    cuda.module.calls.clear()
    out = cuda.rms_norm(heads, cuda.upload(weight), 1e-6)
    assert cuda.module.calls == ["rmsnorm_f32"]
    back = out.reshape(T, n_heads * head_dim)
    assert np.shares_memory(back, out)
    h64 = heads.astype(np.float64)
    want = weight * (h64 / np.sqrt((h64 ** 2).mean(axis=1, keepdims=True) + 1e-6))
    np.testing.assert_allclose(back, want.reshape(T, -1), rtol=0, atol=1e-5 * np.abs(want).max())


def test_gelu_mul_and_scale(cuda):
    rng = np.random.default_rng(17)
    gate = (rng.standard_normal((3, 161)) * 4).astype(f32)
    gate[0, :4] = [-100.0, 100.0, 0.0, -9.0]
    up = rng.standard_normal((3, 161)).astype(f32)
    cuda.module.calls.clear()
    got = cuda.gelu_mul(gate, up)
    err = np.abs(got.astype(np.float64) - gelu_mul_reference(gate, up))
    assert np.all(err <= 1e-6 * np.abs(gate.astype(np.float64) * up) + 1e-30)
    x = rng.standard_normal((4, 96)).astype(f32)
    kept = x.copy()
    y = cuda.scale(x, 25.298221281347036)  # sqrt(640), a Python float: float32(s) is what multiplies
    assert np.array_equal(y, kept * f32(25.298221281347036)) and np.array_equal(x, kept)  # a new array
    assert cuda.module.calls == ["gelu_mul_f32", "scale_f32"]


def test_silu_mul_add_token_nll(cuda, ref):
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((3, 160)) * 4).astype(f32)
    gate[0, :4] = [-100.0, -89.0, 89.0, 0.0]  # exp(-g) overflows to inf → silu = -0
    up = rng.standard_normal((3, 160)).astype(f32)
    np.testing.assert_allclose(cuda.silu_mul(gate, up), ref.silu_mul(gate, up), rtol=1e-6, atol=0)
    a, b = rng.standard_normal((2, 3, 96)).astype(f32)
    want = a + b
    out = cuda.add(a, b)
    assert np.array_equal(out, want)
    logits = (rng.standard_normal((4, 512)) * 5).astype(f32)
    targets = np.array([3, 0, 511, 3], dtype=np.int64)
    assert np.array_equal(cuda.token_nll(logits, targets), ref.token_nll(logits, targets))


# ---- attention and the KV cache ------------------------------------------------------------------------

ATTENTION_CASES = [
    # n_heads, n_kv_heads, head_dim, prompt tokens (prefill), later chunks (decode steps 1, prefill > 1)
    (4, 2, 24, 5, (1, 1, 4, 1)),  # tiny-llama's heads: GQA 2:1, head_dim not a multiple of 32
    (9, 3, 64, 70, (1, 3)),  # SmolLM2's heads; 71 keys at decode: 2 key splits + attention_combine
    (2, 2, 128, 3, (1,)),  # no grouping
]


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,prompt,steps", ATTENTION_CASES,
                         ids=[f"h{c[0]}kv{c[1]}d{c[2]}p{c[3]}" for c in ATTENTION_CASES])
def test_attention_through_a_growing_cache(ref, kv, n_heads, n_kv, head_dim, prompt, steps):
    """Prefill, then decode steps and further multi-token chunks, against the numpy backend's float32
    cache; the device cache starts too small and grows (doubling) keeping its dtype and contents."""
    backend = emulated(kv_cache=kv)
    rng = np.random.default_rng(head_dim + prompt)
    cache = backend.new_cache(1, n_kv, head_dim, 4).layers[0]
    ref_cache = LayerCache(np, n_kv, head_dim, 4)
    dtype = np.float16 if kv == "f16" else np.float32
    assert cache.k.dtype == cache.v.dtype == dtype
    start, values = 0, []
    for T in (prompt, *steps):
        q = rng.standard_normal((T, n_heads * head_dim)).astype(f32)
        k = rng.standard_normal((T, n_kv * head_dim)).astype(f32)
        v = rng.standard_normal((T, n_kv * head_dim)).astype(f32)
        values.append(v)
        cache.reserve(start + T)
        ref_cache.reserve(start + T)
        assert cache.k.dtype == dtype and cache.capacity >= start + T
        got = backend.attention(q, k, v, cache, start)
        want = ref.attention(q, k, v, ref_cache, start)
        tol = (1e-5 if kv == "f32" else 3e-3) * np.abs(np.concatenate(values)).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        stored = k.reshape(T, n_kv, head_dim).transpose(1, 0, 2).astype(dtype)
        assert np.array_equal(cache.k[:, start:start + T], stored)
        start += T
    assert np.array_equal(cache.k[:, :start].astype(f32), ref_cache.k[:, :start].astype(dtype).astype(f32))


WINDOW_CASES = [
    # n_heads, n_kv_heads, head_dim, scale, window, prompt tokens, later chunks
    (4, 1, 256, 0.0625, 16, 40, (1, 1, 5, 1)),  # Gemma-3-like local layer: window < prompt, GQA 4:1, hd 256
    (2, 1, 128, None, 200, 150, (1, 1)),  # window > context; 151 keys at decode: the default plan splits (2)
    (4, 2, 64, 0.2, 32, 150, (1, 3, 1)),  # long context, window 32: decode reads only the window's keys
    (3, 3, 40, None, None, 9, (1, 2)),  # odd head_dim, full causal, default scale
]


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,scale,window,prompt,steps", WINDOW_CASES,
                         ids=[f"h{c[0]}kv{c[1]}d{c[2]}w{c[4]}p{c[5]}" for c in WINDOW_CASES])
def test_attention_scale_and_window(kv, n_heads, n_kv, head_dim, scale, window, prompt, steps):
    """attention(..., scale, window) through prefill, decode steps and chunks, against the float64 formula
    on the float32 values the cache holds; the calls launched: kv_store, attention, + combine when split."""
    backend = emulated(kv_cache=kv)
    rng = np.random.default_rng(head_dim + prompt + (window or 0))
    dtype = np.float16 if kv == "f16" else np.float32
    cache = backend.new_cache(1, n_kv, head_dim, 8).layers[0]
    start, values = 0, []
    for T in (prompt, *steps):
        q = rng.standard_normal((T, n_heads * head_dim)).astype(f32)
        k = rng.standard_normal((T, n_kv * head_dim)).astype(f32)
        v = rng.standard_normal((T, n_kv * head_dim)).astype(f32)
        values.append(v)
        cache.reserve(start + T)
        backend.module.calls.clear()
        got = backend.attention(q, k, v, cache, start, scale=scale, window=window)
        want = attention_reference(q, cache.k.astype(f32), cache.v.astype(f32), start, scale, window)
        tol = (1e-5 if kv == "f32" else 3e-3) * np.abs(np.concatenate(values)).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        assert np.array_equal(cache.k[:, start:start + T], k.reshape(T, n_kv, head_dim).transpose(1, 0, 2).astype(dtype))
        start += T
        assert backend.module.calls[:2] == [f"kv_store_{kv}", f"attention_{kv}kv"]
    if window is not None and window >= start:  # the window hides nothing: the same as no window
        np.testing.assert_array_equal(backend.attention(q, k, v, cache, start - T, scale=scale, window=window),
                                      backend.attention(q, k, v, cache, start - T, scale=scale))
    with pytest.raises(ValueError, match="window"):
        backend.attention(q, k, v, cache, start - T, window=0)


def test_attention_default_scale_and_no_window_match_numpy_backend(ref):
    """The defaults (scale 1/sqrt(head_dim), window None) are today's attention: a decode step that the
    default plan splits (130 keys, one head: 3 splits + combine) equals the numpy backend's result."""
    backend = emulated()
    rng = np.random.default_rng(21)
    cache, ref_cache = backend.new_cache(1, 1, 64, 130).layers[0], LayerCache(np, 1, 64, 130)
    for start, T in ((0, 129), (129, 1)):
        q, k, v = (rng.standard_normal((T, 64)).astype(f32) for _ in range(3))
        backend.module.calls.clear()
        got = backend.attention(q, k, v, cache, start)
        np.testing.assert_allclose(got, ref.attention(q, k, v, ref_cache, start), rtol=0, atol=1e-5 * 5)
    assert backend.module.calls == ["kv_store_f32", "attention_f32kv", "attention_combine"]


def test_new_cache_dtype_and_bytes():
    for kv, itemsize in (("f16", 2), ("f32", 4)):
        cache = emulated(kv_cache=kv).new_cache(3, 2, 24, 10)
        assert len(cache.layers) == 3 and cache.length == 0
        assert cache.nbytes == 3 * 2 * 2 * 10 * 24 * itemsize
    with pytest.raises(ModelError, match="kv_cache"):
        CudaBackend(np, kv_cache="bf16")


# ---- the product path never touches the emulator ---------------------------------------------------------

def test_product_path_does_not_import_the_emulator():
    """Importing the CUDA backend and building CudaBackend() on the GPU path (CuPy and the NVRTC
    loader replaced by stand-ins) imports neither kernels/emulator.py nor anything that builds
    cuda_emu.h; a host-array backend must be given its launcher explicitly."""
    code = """
import sys, types
import mxq.runtime.backends.cuda_backend as cb
assert "mxq.kernels.emulator" not in sys.modules, "import"
from mxq.kernels import nvrtc
class Loaded:
    def get_function(self, name):
        return lambda grid, block, args: None
cb._load_cupy = lambda: types.SimpleNamespace()
nvrtc.load_module = lambda: Loaded()
backend = cb.CudaBackend()
assert isinstance(backend.module, Loaded)
assert "mxq.kernels.emulator" not in sys.modules, "CudaBackend()"
"""
    root = Path(__file__).resolve().parents[2]  # the directory holding the `mxq` package
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr
    source = (Path(__file__).resolve().parents[1] / "runtime" / "backends" / "cuda_backend.py").read_text()
    assert "import" not in " ".join(line for line in source.splitlines() if "emulator" in line or "cuda_emu" in line)
    with pytest.raises(ValueError, match="module="):
        CudaBackend(np)


# ---- no CuPy, no GPU -----------------------------------------------------------------------------------

def test_missing_cupy_is_a_clear_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(ModelError, match=r"CuPy is not installed \(pip install 'mxq\[cuda\]'\)"):
        CudaBackend()
    from mxq.runtime.backends import get_backend
    with pytest.raises(ModelError, match="CuPy is not installed"):
        get_backend("cuda", cache_dequantized=False)  # how mxq.load(..., device="cuda") builds it


@pytest.mark.parametrize("count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")])
def test_no_gpu_is_a_clear_model_error(monkeypatch, count):
    def get_device_count():
        if isinstance(count, Exception):
            raise count
        return count

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(ModelError, match="no CUDA GPU found"):
        CudaBackend()


def test_load_on_cuda_without_gpu_names_what_is_missing(tiny_models):
    if _have_gpu():
        pytest.skip("a GPU is present")
    import mxq
    with pytest.raises(ModelError, match="CuPy is not installed|no CUDA GPU found"):
        mxq.load(tiny_models["tiny-qwen2"], device="cuda")


# ---- end to end: converted tiny models -----------------------------------------------------------------

def greedy(model, prompt, n):
    """Greedy tokens after `prompt` (prefill, then n − 1 decode steps) and each step's host logits."""
    cache = model.new_cache(len(prompt) + n)
    logits = [model.backend.to_host(model.forward(prompt, cache))]  # (T, vocab): every prompt position
    tokens = [int(np.argmax(logits[-1][-1]))]
    for _ in range(n - 1):
        logits.append(model.backend.to_host(model.forward([tokens[-1]], cache)))
        tokens.append(int(np.argmax(logits[-1][-1])))
    return tokens, logits


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_model_generates_the_same_tokens(tiny_models, name, kv):
    with MxqFile.open(tiny_models[name]) as f:
        config = ModelConfig.from_json(f.model)
        labels = {e.config.label for e in f.tensors.values() if e.config.scheme == "affine"}
        assert any("+o" in label for label in labels)  # outliers are in play
        prompt = np.random.default_rng(1).integers(0, config.vocab_size, 8).tolist()
        reference = Model.from_file(f, config, NumpyBackend(threads=1, kernels=False))
        backend = emulated(kv_cache=kv, guard=False)
        model = Model.from_file(f, config, backend)
        n_affine = sum(isinstance(w, AffineHandle) for layer in model.layers
                       for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down))
        n_affine += isinstance(model.lm_head, AffineHandle)
        assert n_affine >= 8
        n_fp16 = sum(isinstance(w, DenseHandle) for layer in model.layers
                     for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down))
        n_fp16 += isinstance(model.lm_head, DenseHandle)
        assert isinstance(model.lm_head, DenseHandle if name == "tiny-llama" else AffineHandle)
        want_tokens, want_logits = greedy(reference, prompt, 16)

        backend.module.calls.clear()
        tokens, logits = greedy(model, prompt, 16)
        assert tokens == want_tokens
        tol = 2e-5 if kv == "f32" else 3e-3
        for got, want in zip(logits, want_logits):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= tol * np.abs(want).max()
        # prefill multiplies with dequantize + GEMM, decode with one GEMV per matrix: gemv_affine_* on
        # the packed blobs, gemv_f16 on fp16 matrices (tiny-llama's untied fp16 lm_head: the last launch
        # of every decode step), with no float32 copy of an fp16 matrix kept
        gemvs = [c for c in backend.module.calls if c.startswith("gemv_")]
        assert len(gemvs) == 15 * (n_affine + n_fp16)
        assert gemvs.count("gemv_f16") == 15 * n_fp16
        if name == "tiny-llama":
            steps = "|".join(backend.module.calls).split("embedding_f16")[2:]  # the 15 decode steps
            assert len(steps) == 15 and all(step.rstrip("|").endswith("gemv_f16") for step in steps)
            assert model.lm_head.dense is None and model.embed_tokens.dense is None
        assert len([c for c in backend.module.calls if c.startswith("attention_f")]) == 16 * config.num_hidden_layers
        assert all(c.endswith(f"{kv}kv") for c in backend.module.calls if c.startswith("attention_f"))

        if name == "tiny-qwen2":  # its greedy continuation repeats one token: also force varied inputs
            forced = np.random.default_rng(2).integers(0, config.vocab_size, 12).tolist()
            caches = reference.new_cache(32), model.new_cache(32)
            for m, c in zip((reference, model), caches):
                m.forward(prompt, c)
            for token in forced:
                want = reference.backend.to_host(reference.forward([token], caches[0]))[-1]
                got = backend.to_host(model.forward([token], caches[1]))[-1]
                assert int(np.argmax(got)) == int(np.argmax(want))
                assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_load_device_cuda_wiring(tiny_models, monkeypatch):
    """mxq.load(..., device="cuda") → get_backend → CudaBackend(cache_dequantized=...), with CuPy
    replaced by NumPy and the GPU kernel loader by the emulated launcher: the API's generation is unchanged."""
    import mxq
    from mxq.runtime.backends import cuda_backend

    monkeypatch.setattr(cuda_backend, "_load_cupy", lambda: np)
    monkeypatch.setattr(cuda_backend, "_load_gpu_module", lambda: EmulatedModule(mode="fibers", guard=False))
    with mxq.load(tiny_models["tiny-qwen2"], device="cuda") as gpu, mxq.load(tiny_models["tiny-qwen2"]) as cpu:
        assert isinstance(gpu.backend, CudaBackend) and gpu.backend.kv_dtype == np.float16
        assert gpu.model.new_cache(8).layers[0].k.dtype == np.float16  # the default device cache is fp16
        assert "".join(gpu.generate("Once upon a time", max_new_tokens=8)) == \
            "".join(cpu.generate("Once upon a time", max_new_tokens=8))
        ids = gpu.tokenizer.encode("Once upon a time there was")
        np.testing.assert_allclose(gpu.logits(ids), cpu.logits(ids), rtol=0, atol=3e-3 * np.abs(cpu.logits(ids)).max())


def test_bench_gpu_decode_accounting(tiny_models, monkeypatch, capsys):
    """tools/bench_gpu.py's decode section, run through the emulated backend (CuPy replaced by NumPy):
    bytes per token = the stored bytes of every decode matrix (tiny-llama's fp16 lm_head at 2 bytes per
    weight) + the fp16 KV cache read at the mean timed length; the table prints."""
    import bench_gpu
    from mxq.runtime.backends import cuda_backend

    monkeypatch.setattr(cuda_backend, "_load_cupy", lambda: np)
    monkeypatch.setattr(cuda_backend, "_load_gpu_module", lambda: EmulatedModule(mode="fibers", guard=False))
    path = tiny_models["tiny-llama"]
    d = bench_gpu.bench_decode(path, steps=2, warmup=1, prompt_tokens=3, bandwidths={"peak": 100.0})
    with MxqFile.open(path) as f:
        c = ModelConfig.from_json(f.model)
        names = [f"model.layers.{i}.{m}.weight" for i in range(c.num_hidden_layers)
                 for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]
        weights = sum(int(b.nbytes) for n in names for b in f.blobs(n).values())
        fp16 = sum(int(b.nbytes) for n in names if f.tensors[n].config.scheme == "fp16" for b in f.blobs(n).values())
    assert d["weight_bytes_per_token"] == weights and d["weight_bytes_by_scheme"]["fp16"] == fp16 > 0
    for mode, first in (("device", 3 + 1 + 1), ("greedy", 3 + 1 + 2 + 1)):  # prompt, warmup, device steps
        r = d["modes"][mode]
        assert r["mean_kv_len"] == first + 0.5
        kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2 * (first + 0.5)
        assert r["kv_bytes_per_token"] == kv and r["bytes_per_token"] == weights + kv
        bound = r["roofline"]["peak"]
        assert bound["bound_tok_s"] == pytest.approx(100e9 / (weights + kv))
        assert bound["ratio"] == pytest.approx(r["tok_s"] / bound["bound_tok_s"]) and r["tok_s"] > 0
    bench_gpu.print_decode(d)
    assert "tok/s bound @ peak" in capsys.readouterr().out


def test_bench_gpu_without_gpu_exits_with_one_line(capsys):
    import bench_gpu
    if bench_gpu.no_gpu_reason() is None:
        pytest.skip("a GPU is present")
    assert bench_gpu.main(["--shapes", "64x64"]) == bench_gpu.NO_GPU_STATUS
    err = capsys.readouterr().err
    assert err.startswith("bench_gpu: no CUDA GPU available") and err.count("\n") == 1


# ---- a real GPU ----------------------------------------------------------------------------------------

def _have_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or no device
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA GPU and CuPy")
def test_gpu_backend_matches_numpy(tiny_models, ref):
    """The real binding (CuPy arrays, NVRTC-compiled kernels, cuBLAS): ops and a tiny model."""
    import cupy

    backend = CudaBackend()
    assert backend.xp is cupy
    rng = np.random.default_rng(0)
    for bits, group_size in ((4, 64), (3, 128), (5, 32)):
        shape, config = (37, 2 * group_size + 7), StorageConfig.affine(bits, group_size, 9)
        blobs = random_affine_blobs(rng, shape, config)
        w, w_ref = backend.prepare(Entry("w", shape, config), blobs), ref.prepare(Entry("w", shape, config), blobs)
        assert backend.binding.address(w.blobs[0]) % 16 == 0
        for T in (1, 6):
            x = rng.standard_normal((T, shape[1])).astype(f32)
            y = backend.to_host(backend.linear(backend.upload(x), w))
            check_close(y, ref.linear(x, w_ref).astype(np.float64), magnitude(x, blobs, shape, config))
    for kv, tol in (("f32", 2e-5), ("f16", 3e-3)):
        with MxqFile.open(tiny_models["tiny-llama"]) as f:
            config = ModelConfig.from_json(f.model)
            prompt = np.random.default_rng(1).integers(0, config.vocab_size, 8).tolist()
            want_tokens, want_logits = greedy(Model.from_file(f, config, NumpyBackend(threads=1, kernels=False)), prompt, 16)
            tokens, logits = greedy(Model.from_file(f, config, CudaBackend(kv_cache=kv)), prompt, 16)
            assert tokens == want_tokens
            for got, want in zip(logits, want_logits):
                assert np.abs(got - want).max() <= tol * np.abs(want).max()
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA GPU and CuPy")
def test_gpu_trellis_matches_dequantize():
    """gemv_trellis and dequant_trellis on the GPU (CuPy arrays, NVRTC-compiled kernels): every K, decode and
    prefill against the reference dequantization, the embedding gather bit-exact."""
    backend = CudaBackend()
    rng = np.random.default_rng(0)
    for bits in TRELLIS_KERNEL_BITS:
        shape, config = (1037, 4 * 64 + 7), StorageConfig.trellis(bits, 64)
        blobs = random_trellis_blobs(rng, shape, config)
        w, weight = backend.prepare(Entry("w", shape, config), blobs), dequantize(blobs, shape, config)
        for T in (1, 6):
            x = rng.standard_normal((T, shape[1])).astype(f32)
            y = backend.to_host(backend.linear(backend.upload(x), w))
            check_close(y, reference_linear(x, weight), magnitude(x, blobs, shape, config))
        ids = np.array([1036, 0, 5])
        assert np.array_equal(backend.to_host(backend.embedding(w, ids)), weight[ids])
    backend.close()


# ---- the new families (Qwen3, Gemma 3, Phi-3) through the model contract ---------------------------------

TINY_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
NEW_FAMILIES = {
    # Gemma 3 270M's head shape (head_dim 256, one KV head), two sliding layers (window 5) and a global one,
    # query_pre_attn_scalar ≠ head_dim (scale 1/8), GeGLU, embedding scale, q/k norms, (1 + w) norms, tied
    "gemma3": dict(TINY_COMMON, architectures=["Gemma3ForCausalLM"], head_dim=256, num_key_value_heads=1,
                   sliding_window=5, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   query_pre_attn_scalar=64, rope_local_base_freq=10000.0, rope_theta=1e6,
                   tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
    "qwen3": dict(TINY_COMMON, architectures=["Qwen3ForCausalLM"], head_dim=128, rope_theta=1e6),  # q/k norms
    "phi3": dict(TINY_COMMON, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.5, rope_theta=1e4),
}
NEW_FAMILY_KERNELS = {"gemma3": {"gelu_mul_f32", "scale_f32", "rmsnorm_f32"}, "qwen3": {"silu_mul_f32"},
                      "phi3": {"silu_mul_f32"}}


class _Entry(Entry):
    def __init__(self, name, shape):
        role = "embedding" if "embed" in name else ("norm" if len(shape) == 1 else "linear")
        super().__init__(name, shape, StorageConfig.fp16(), role)


def random_fp16_weights(backend):
    """Model's tensor(name, shape, required) callback: the same random fp16 tensor for a name on every
    backend (norm weights near 1, matrices scaled by 1/sqrt(in))."""
    def tensor(name, shape, required=True):
        rng = np.random.default_rng([ord(ch) for ch in name])
        std = 0.1 if len(shape) == 1 else 1 / np.sqrt(shape[-1])
        offset = 1.0 if len(shape) == 1 and not name.endswith("bias") else 0.0
        return backend.prepare(_Entry(name, shape), {"data": (rng.standard_normal(shape) * std + offset).astype(np.float16)})
    return tensor


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_new_family_forward_matches_numpy(family, kv):
    """A random tiny model of each new family (built through the model contract from an HF config) on the
    emulated CUDA backend vs the numpy backend: a 12-token prefill, 8 decode steps (the sliding layers'
    window of 5 cuts off earlier tokens) and a 3-token chunk. float32 cache: ≤ 2e-5 · max|logits|
    (measured ≤ 3.6e-6, fp32 reordering); fp16 cache: ≤ 1e-2 (k and v rounded to fp16 when stored,
    amplified through 3 random layers; measured 2.0e-3 gemma3, 6.5e-4 qwen3, 1.0e-3 phi3).
    Skipped until the model contract (the `contract` branch) is merged."""
    if not hasattr(ModelConfig, "from_hf"):
        pytest.skip("needs the model contract (Model(config, backend, tensor), ModelConfig.from_hf)")
    config = ModelConfig.from_hf(NEW_FAMILIES[family])
    ref_backend = NumpyBackend(threads=1)
    reference = Model(config, ref_backend, random_fp16_weights(ref_backend))
    backend = emulated(kv_cache=kv, guard=False)
    model = Model(config, backend, random_fp16_weights(backend))
    rng = np.random.default_rng(1)
    caches = reference.new_cache(64), model.new_cache(64)
    backend.module.calls.clear()
    worst = 0.0
    for ids in (rng.integers(0, 97, 12).tolist(), *[[int(t)] for t in rng.integers(0, 97, 8)],
                rng.integers(0, 97, 3).tolist()):
        want = ref_backend.to_host(reference.forward(ids, caches[0]))
        got = backend.to_host(model.forward(ids, caches[1]))
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst <= (2e-5 if kv == "f32" else 1e-2), worst
    assert NEW_FAMILY_KERNELS[family] <= set(backend.module.calls)


# ---- rows: row blocks with their own configs (SPEC.md §8) -----------------------------------------------

@pytest.mark.parametrize("cache_dequantized", [False, True], ids=["lean", "cached"])
def test_rows_linear_and_embedding_match_numpy_backend(ref, cache_dequantized):
    """A rows matrix of affine (outliers), lut and fp16 blocks in a random order: every block through its
    own kernel (T = 1: one GEMV per block, bias and residual added after the gather; T = 5: dequantize +
    GEMM per block), the embedding gather per block; the same numbers as the numpy backend's."""
    from test_rows_scheme import random_rows_blobs, reference_weight

    from mxq.runtime.backends.row_blocks import RowBlocks

    backend = emulated(cache_dequantized=cache_dequantized)
    shape, config = (45, 71), StorageConfig.parse("rows(20:b3g32+o9,16:l4,9:fp16)")
    rng = np.random.default_rng(21)
    blobs = random_rows_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = backend.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, RowBlocks) and [type(b) for b in w.blocks] == [AffineHandle, LutHandle, DenseHandle]
    weight = reference_weight(blobs, shape, config)
    mag_of = lambda x: np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        residual = rng.standard_normal((T, shape[0])).astype(f32)
        backend.module.calls.clear()
        y = backend.linear(x, w, backend.upload(bias), backend.upload(residual))
        want = ref.linear(x, w_ref, bias, residual.copy()).astype(np.float64)
        check_close(y, want, mag_of(x), 2.0 ** -21 * (np.abs(want) + np.abs(residual)))
        if cache_dequantized:
            assert backend.module.calls == (["gemv_affine_b3_g32", "gemv_lut_b4", "gemv_f16"] if T == 1 else [])
        else:
            assert backend.module.calls == (["gemv_affine_b3_g32", "gemv_lut_b4", "gemv_f16"] if T == 1 else
                                            ["dequant_affine_b3_g32_f32", "dequant_lut_b4_f32"])
    for ids in ([44], [3, 0, 44, 3, 30, 12]):
        assert np.array_equal(backend.embedding(w, np.array(ids)), weight[ids])


def test_rows_with_vq_blocks_match_numpy_backend(ref):
    """A rows matrix with vq blocks (outliers, 8-bit scale codes) beside a lut one: each vq block through
    gemv_vq / dequant_vq, the embedding gather per block; the numpy backend's numbers."""
    from test_rows_scheme import random_rows_blobs, reference_weight

    from mxq.runtime.backends.row_blocks import RowBlocks

    backend = emulated()
    shape, config = (45, 71), StorageConfig.parse("rows(20:v2d4g32+o9,16:v3d2g64m8,9:l3)")
    rng = np.random.default_rng(22)
    blobs = random_rows_blobs(rng, shape, config)
    entry = Entry("w", shape, config)
    w, w_ref = backend.prepare(entry, blobs), ref.prepare(entry, blobs)
    assert isinstance(w, RowBlocks) and [type(b) for b in w.blocks] == [VqHandle, VqHandle, LutHandle]
    weight = reference_weight(blobs, shape, config)
    bias = rng.standard_normal(shape[0]).astype(f32)
    for T in (1, 5):
        x = rng.standard_normal((T, shape[1])).astype(f32)
        backend.module.calls.clear()
        y = backend.linear(x, w, backend.upload(bias))
        want = ref.linear(x, w_ref, bias).astype(np.float64)
        mag = np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
        check_close(y, want, mag, 2.0 ** -22 * np.abs(want))
        assert backend.module.calls == (["gemv_vq_b2_d4", "gemv_vq_b3_d2", "gemv_lut_b3"] if T == 1 else
                                        ["dequant_vq_b2_d4_f32", "dequant_vq_b3_d2_f32", "dequant_lut_b3_f32"])
    for ids in ([44], [3, 0, 44, 3, 30, 12]):
        assert np.array_equal(backend.embedding(w, np.array(ids)), weight[ids])


def test_rows_model_matches_numpy_backend(tmp_path):
    """tiny-qwen2 with every matrix and the tied embedding stored as rows (test_rows_scheme.write_rows_model):
    emulated CUDA gives the numpy backend's greedy choices and logits, float32 KV cache."""
    from test_rows_scheme import greedy_steps, write_rows_model

    rows_path, _ = write_rows_model(tmp_path)
    want_ids, want_steps = greedy_steps(rows_path, NumpyBackend(kernels=False, threads=1), n=4)
    ids, steps = greedy_steps(rows_path, emulated(guard=False), n=4)
    assert ids == want_ids
    for got, want in zip(steps, want_steps):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
