"""The `vq` scheme in the converter (converter/vq.py, quantize.py, measure.py, gptq.py): the errors it
reports are those of the bytes it stores, a row sample is those rows of the whole matrix, its codebook
beats affine at equal bits where it should, GPTVQ's rounding decodes to what it stores, and a conversion
with vq candidates keeps the budget and runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxq.converter.gptq import compensated_blobs, compensated_rows
from mxq.converter.quantize import quantize
from mxq.format_spec import MxqFile, StorageConfig, dequantize, tensor_nbytes
from mxq.format_spec.affine import check_blobs, stored_blobs

VQ_LABELS = ["v2d4g32", "v2d4g128", "v3d2g64", "v4d2g32m8", "v2d2g64", "v2d4g32+o40", "v3d2g32+o7"]


def _matrix(out=96, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, n, generator=g) * 0.02
    weight[:, 3] *= 8  # an outlier column, as real checkpoints have
    importance = torch.rand(out, n, generator=g) ** 4  # uneven, like Fisher diagonals
    return weight, importance


def _correlated(out=128, n=256, seed=1):
    """Rows whose neighbouring weights are correlated (what a vector codebook captures, as in real layers
    after training; i.i.d. Gaussians are where vector quantization gains least)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, n // 2, generator=g)
    weight = torch.stack([base, 0.8 * base + 0.6 * torch.randn(out, n // 2, generator=g)], 2).reshape(out, n)
    return weight * 0.02


@pytest.mark.parametrize("label", VQ_LABELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_quantized_errors_are_those_of_the_stored_bytes(label, weighted):
    weight, importance = _matrix()
    importance = importance if weighted else None
    config = StorageConfig.parse(label).storage(weight.shape)
    result = quantize(weight, config, "wls", importance=importance, outlier_mode="error" if weighted else "magnitude")
    stored = stored_blobs(result.blobs, weight.shape, config)
    check_blobs(stored, weight.shape, config)
    assert sum(b.nbytes for b in stored.values()) == tensor_nbytes(weight.shape, config)
    diff = dequantize(result.blobs, weight.shape, config).astype(np.float64) - weight.numpy()
    assert np.isclose(result.error_sq, np.square(diff).sum(), rtol=1e-9)
    expected = (np.square(diff) * importance.numpy()).sum() if weighted else np.square(diff).sum()
    assert np.isclose(result.weighted_error, expected, rtol=1e-6)


def test_row_sample_is_those_rows_of_the_whole_matrix():
    """Only the metadata runs the sampled rows share differ (6-bit scale codes: a run's step moves with its
    rows): a row's error by up to ~20%, their sum by ≤ 2%."""
    weight, importance = _matrix(out=256)
    config = StorageConfig.parse("v2d4g32")
    rows = torch.arange(0, 256, 8)
    sample = quantize(weight, config, "wls", pack=False, importance=importance, rows=rows)
    whole = quantize(weight, config, "wls", pack=False, importance=importance)
    ratio = sample.row_error_sq.numpy() / whole.row_error_sq[rows].numpy()
    assert np.all(np.abs(ratio - 1) < 0.25) and abs(ratio.mean() - 1) < 0.02, ratio


def test_quantizer_is_deterministic_and_handles_degenerate_matrices():
    weight, importance = _matrix()
    config = StorageConfig.parse("v2d4g32")
    a = quantize(weight, config, "wls", importance=importance).blobs
    b = quantize(weight.clone(), config, "wls", importance=importance.clone()).blobs
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for w in (torch.zeros(5, 40), torch.full((3, 37), 0.25), torch.tensor([[1.5, -2.0, 0.0]])):
        result = quantize(w, config, "wls")
        decoded = dequantize(result.blobs, w.shape, config)
        assert np.isfinite(decoded).all() and np.isclose(result.error_sq, np.square(decoded - w.numpy()).sum())
    assert quantize(torch.zeros(5, 40), config, "wls").error_sq == 0.0


def test_vq_beats_affine_at_equal_bits_on_correlated_weights():
    """v2d4g32 stores exactly b2g64's code and metadata bits (+ its 2 KB codebook); on weights whose
    neighbours are correlated its error is far lower. v3d2g64 likewise against b3g128."""
    weight = _correlated()
    for vq, affine in (("v2d4g32", "b2g64"), ("v3d2g64", "b3g128")):
        e_vq = quantize(weight, StorageConfig.parse(vq), "wls").error_sq
        e_affine = quantize(weight, StorageConfig.parse(affine), "wls").error_sq
        assert e_vq < 0.8 * e_affine, (vq, e_vq, affine, e_affine)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("label", ["v2d4g32", "v3d2g64", "v2d4g64+o30"])
def test_gptvq_lowers_the_output_error_of_what_is_stored(label, act_order):
    torch.manual_seed(0)
    weight, importance = _matrix(n=203)  # in not a multiple of the vector size: a short last vector
    x = torch.randn(2048, 203) @ (torch.randn(203, 203) * 0.3 + torch.eye(203))
    hessian = x.T @ x
    config = StorageConfig.parse(label).storage(weight.shape)
    blobs, stored = compensated_blobs(weight, hessian, config, importance=importance, act_order=act_order)
    check_blobs(stored_blobs(blobs, weight.shape, config), weight.shape, config)
    assert torch.equal(torch.from_numpy(dequantize(blobs, weight.shape, config)), stored)
    plain = torch.from_numpy(dequantize(quantize(weight, config, "wls", importance=importance).blobs,
                                        weight.shape, config))
    output_error = lambda w: float(torch.trace((weight - w) @ hessian @ (weight - w).T))  # noqa: E731
    assert output_error(stored) < 0.8 * output_error(plain)


def test_gptvq_rounds_vq_and_affine_row_blocks_together():
    torch.manual_seed(0)
    weight, importance = _matrix(out=96, n=128)
    x = torch.randn(1024, 128)
    config = StorageConfig.parse("rows(32:v2d4g32,32:b3g64,32:v3d2g64)")
    blobs, stored = compensated_rows(weight, x.T @ x, config, importance=importance)
    assert torch.equal(torch.from_numpy(dequantize(blobs, weight.shape, config)), stored)


@pytest.mark.parametrize("quantizer", ["wls", "gptq"])
def test_conversion_with_vq_candidates_keeps_the_budget_and_runs(tmp_path, quantizer):
    """tiny-llama with affine and vq candidates: the file holds vq linears (1.6), their bytes are the cost
    model's, the bpw is within the budget, and the runtime's lean logits equal its cached ones."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert
    from mxq.runtime.generate import load

    out = tmp_path / "vq.mxq"
    convert(fixtures.ensure("tiny-llama"), out, bpw=3.2, configs="b2g64,b3g64,b4g64,v3d2g64,v2d2g32",
            quantizer=quantizer, cache_dir=None)  # tiny matrices: the small codebooks pay, v2d4's 2 KB does not
    with MxqFile.open(out) as f:
        linears = [e for e in f.tensors.values() if e.role == "linear"]
        configs = [e.config for e in linears]
        blocks = [b for c in configs for _, b in (c.blocks if c.scheme == "rows" else [(0, c)])]
        assert any(b.scheme == "vq" for b in blocks), [c.label for c in configs]
        assert all(e.nbytes == tensor_nbytes(e.shape, e.config) for e in linears)
        bpw = 8 * sum(e.nbytes for e in linears) / sum(e.numel for e in linears)
        assert 3.1 <= bpw <= 3.2
        assert f.version == (1, 6)
        assert not f.verify()
    ids = np.array([1, 5, 9, 200, 3])
    with load(out) as lean, load(out, cache_dequantized=True) as cached:
        a, b = lean.logits(ids), cached.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
