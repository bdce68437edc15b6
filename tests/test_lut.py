"""The `lut` scheme end to end on tiny inputs: the weighted k-means quantizer (errors are those of the
stored bytes, determinism, importance and outliers), the CPU runtime (the NumPy path and the compiled
fused LUT GEMV of cpu_lut_kernels.py against format_spec's reference, every bits × channels per codebook
× odd shapes, outliers, bias, residual) and a conversion where the MILP picks lut for some matrices and
the budget is kept to the byte. The format itself: test_format.py, test_spec_document.py, test_corruption.py.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import random_lut_blobs
from mxq.converter.candidates import parse_candidates
from mxq.converter.quantize import quantize
from mxq.format_spec import CODEBOOK_ROWS, SUPPORTED_BITS, MxqFile, StorageConfig, dequantize, tensor_nbytes
from mxq.format_spec.affine import check_blobs
from mxq.runtime.backends.numpy_backend import NumpyBackend

RTOL = 2e-5  # the kernel sums in another order (fastmath)
ODD_SHAPES = [((1, 1), 0), ((7, 33), 3), ((37, 70), 6), ((20, 256), 0), ((131, 333), 40)]


class _Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, shape, config, role


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02 + torch.randn(shape, generator=g).pow(3) * 0.005  # heavy tails


# -- quantizer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_quantized_errors_are_those_of_the_stored_bytes(bits):
    """For every bit width, codebooks per 1 and per 4 channels, with and without outliers (both
    modes), weighted and data-free: error_sq and weighted_error equal those of dequantize(blobs)."""
    w = _weight((13, 77), bits)
    importance = torch.rand(13, 77, generator=torch.Generator().manual_seed(1))
    for rows, nnz, imp, mode in itertools.product((1, 4), (0, 9), (None, importance), ("magnitude", "error")):
        config = StorageConfig.lut(bits, rows, nnz)
        q = quantize(w, config, "wls", importance=imp, outlier_mode=mode)
        check_blobs(q.blobs, w.shape, config)
        diff = torch.from_numpy(dequantize(q.blobs, w.shape, config)) - w
        assert q.error_sq == pytest.approx(float((diff.double() ** 2).sum()), rel=1e-5)
        expected = float((diff.double() ** 2 * (imp.double() if imp is not None else 1)).sum())
        assert q.weighted_error == pytest.approx(expected, rel=1e-5)
        assert q.row_error_sq.sum().item() == pytest.approx(q.error_sq, rel=1e-9)
        assert np.all(np.diff(q.blobs["codebook"].astype(np.float32), axis=1) >= 0)  # levels ascending


def test_kmeans_beats_uniform_levels_and_uses_importance():
    """Per channel, 3 bits: k-means levels give less error than the uniform min-max grid of the same row,
    and weighting by importance lowers the weighted error."""
    w = _weight((16, 512), 3)
    q = quantize(w, StorageConfig.lut(3), pack=False)
    low, high = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    step = (high - low) / 7
    uniform = ((w - low) / step).round().clamp(0, 7) * step + low
    assert q.error_sq < 0.8 * float(((uniform - w) ** 2).sum())
    importance = torch.rand(16, 512, generator=torch.Generator().manual_seed(3)) ** 4
    plain = quantize(w, StorageConfig.lut(3), pack=False, importance=None)
    weighted = quantize(w, StorageConfig.lut(3), pack=False, importance=importance)
    plain_weighted = float((torch.from_numpy(dequantize(quantize(w, StorageConfig.lut(3)).blobs, w.shape,
                                                        StorageConfig.lut(3))) - w).pow(2).mul(importance).sum())
    assert weighted.weighted_error < plain_weighted and weighted.error_sq > plain.error_sq * 0.99


def test_quantizer_is_deterministic_and_rejects_row_samples():
    w = _weight((9, 100), 5)
    a, b = quantize(w, StorageConfig.lut(4, 2, 5)), quantize(w, StorageConfig.lut(4, 2, 5))
    for name in a.blobs:
        np.testing.assert_array_equal(a.blobs[name], b.blobs[name])
    with pytest.raises(ValueError, match="row sample"):
        quantize(w, StorageConfig.lut(4), rows=torch.arange(3))


def test_constant_and_tiny_matrices():
    """A constant row, a row of one weight, fewer distinct weights than levels: exact, no crash."""
    for w in (torch.full((3, 40), 0.25), torch.tensor([[1.5]]), torch.tensor([[0.0, 1.0, 0.0, 1.0]])):
        config = StorageConfig.lut(4)
        q = quantize(w, config)
        np.testing.assert_array_equal(dequantize(q.blobs, w.shape, config), w.numpy())
        assert q.error_sq == 0.0


# -- candidates ----------------------------------------------------------------------------------------

def test_lut_candidates_resolve_per_matrix():
    candidates = parse_candidates("b4g32,l3c4+o0.5%,lut")
    assert [c.label for c in candidates][:2] == ["b4g32", "l3c4+o0.5%"]
    assert {c.label for c in candidates[2:]} >= {"l2", "l4c4", "l5c16"}
    exact = candidates[1].storage((100, 300))
    assert exact == StorageConfig.lut(3, 4, 150) and tensor_nbytes((100, 300), exact) > 0


# -- CPU runtime -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["aot", "jit"])
def backends(request):
    pytest.importorskip("numba")
    from test_cpu_kernels import kernels_mode

    with kernels_mode(request.param):
        fast, ref = NumpyBackend(threads=2), NumpyBackend(threads=2, kernels=False)
        if fast.kernels is None or fast.kernels.kind != request.param:
            pytest.fail(f"the {request.param} kernels did not load (see the notice on stderr)")
        yield fast, ref
        fast.close()
        ref.close()


def _assert_close(y, y_ref):
    assert y.shape == y_ref.shape and y.dtype == np.float32
    assert np.abs(y - y_ref).max() <= RTOL * max(np.abs(y_ref).max(), 1e-6)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cpu_lut_kernel_and_numpy_path_match_the_reference(backends, bits):
    fast, ref = backends
    rng = np.random.default_rng(bits)
    for (shape, nnz), rows in itertools.product(ODD_SHAPES, (1, 4, CODEBOOK_ROWS[-1])):
        config = StorageConfig.lut(bits, rows, nnz)
        blobs = random_lut_blobs(rng, shape, config)
        dense = dequantize(blobs, shape, config)
        w_fast, w_ref = fast.prepare(_Entry("w", shape, config), blobs), ref.prepare(_Entry("w", shape, config), blobs)
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for tokens in (1, 3, 20):  # 20 > KERNEL_MAX_TOKENS: the chunked NumPy path on both
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            residual = rng.standard_normal((tokens, shape[0])).astype(np.float32)
            _assert_close(fast.linear(x, w_fast), x @ dense.T)
            _assert_close(ref.linear(x, w_ref), x @ dense.T)
            _assert_close(fast.linear(x, w_fast, bias, residual.copy()), x @ dense.T + bias + residual)
        ids = np.array([0, shape[0] - 1, 0])
        np.testing.assert_array_equal(fast.embedding(w_fast, ids), dense[ids])


def test_cached_mode_and_parallel_rows_match(backends):
    fast, _ = backends
    rng = np.random.default_rng(7)
    shape, config = (600, 1000), StorageConfig.lut(3, 2, 50)  # ≥ KERNEL_PARALLEL_MIN_WEIGHTS: parallel parts
    blobs = random_lut_blobs(rng, shape, config)
    dense = dequantize(blobs, shape, config)
    cached = NumpyBackend(threads=2, cache_dequantized=True)
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    _assert_close(fast.linear(x, fast.prepare(_Entry("w", shape, config), blobs)), x @ dense.T)
    _assert_close(cached.linear(x, cached.prepare(_Entry("w", shape, config), blobs)), x @ dense.T)
    cached.close()


# -- conversion --------------------------------------------------------------------------------------------

def test_conversion_chooses_lut_and_keeps_the_budget(tmp_path):
    """tiny-llama with affine and lut candidates: the file holds both schemes, its linears' bytes are the
    cost model's, the achieved bpw is within the budget, and the NumPy runtime's logits equal a
    forward pass over the reference-dequantized weights (the cached mode)."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert
    from mxq.runtime.generate import load

    out = tmp_path / "lut.mxq"
    convert(fixtures.ensure("tiny-llama"), out, bpw=3.0, configs="b2g64,b3g64,b4g64,l2,l3,l4,l3c4+o1%",
            quantizer="rtn", objective="frobenius", cache_dir=None)
    with MxqFile.open(out) as f:
        linears = [e for e in f.tensors.values() if e.role == "linear"]
        schemes = {e.config.scheme for e in linears}
        assert "lut" in schemes, [e.config.label for e in linears]
        assert all(e.nbytes == tensor_nbytes(e.shape, e.config) for e in linears)
        bpw = 8 * sum(e.nbytes for e in linears) / sum(e.numel for e in linears)
        assert 2.9 <= bpw <= 3.0
        assert f.version == (1, 5)  # lut needs 1.1, the +xz tokenizer 1.3; mxq writes packed entries (1.5)
    ids = np.array([1, 5, 9, 200, 3])
    with load(out) as lean, load(out, cache_dequantized=True) as cached:
        a, b = lean.logits(ids), cached.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("configs,message", [("b4g32,l4c3", "'l4c3': lut channels per codebook"),
                                             ("b4g32+o12", "a candidate's outliers are a percent"),
                                             ("b4g32,x7", "cannot parse config label 'x7'")])
def test_cli_rejects_bad_labels_in_one_line(tmp_path, configs, message):
    import subprocess
    import sys

    fixtures = pytest.importorskip("fixtures")
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "convert", str(fixtures.ensure("tiny-llama")), "-o", str(tmp_path / "o.mxq"),
                             "--bpw", "3", "--configs", configs], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
