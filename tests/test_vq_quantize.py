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
    """tiny-llama with affine and vq candidates: the file holds vq linears (1.8), their bytes are the cost
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
        assert f.version == (1, 8)
        assert not f.verify()
    ids = np.array([1, 5, 9, 200, 3])
    with load(out) as lean, load(out, cache_dequantized=True) as cached:
        a, b = lean.logits(ids), cached.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


# -- shared codebooks (SPEC.md §12.4; converter/shared_codebooks.py) ---------------------------------------------
def _books(weight, importance, pairs=((3, 4), (2, 4))):
    from mxq.converter.vq import kmeans_codebook, sample_vectors

    out = {}
    for bits, dim in pairs:
        xs, ws = sample_vectors(weight.numpy(), importance.numpy(), 32, dim, 8192)
        out[(bits, dim)] = kmeans_codebook(xs, ws, bits * dim, 8)
    return out


@pytest.mark.parametrize("label", ["v3d4g32s", "v3d4g128m8s", "v2d4g64s", "v3d4g64s+o25"])
def test_shared_configs_store_no_codebook_and_their_errors_are_the_bytes(label):
    weight, importance = _matrix(n=203)
    books = _books(weight, importance)
    config = StorageConfig.parse(label).storage(weight.shape)
    result = quantize(weight, config, "wls", importance=importance, codebooks=books)
    assert "codebook" not in result.blobs
    check_blobs(stored_blobs(result.blobs, weight.shape, config), weight.shape, config)
    readable = {**result.blobs, "codebook": books[(config.bits, config.dim)]}  # as the reader hands it out
    diff = dequantize(readable, weight.shape, config).astype(np.float64) - weight.numpy()
    assert np.isclose(result.error_sq, np.square(diff).sum(), rtol=1e-9)
    assert np.isclose(result.weighted_error, (np.square(diff) * importance.numpy()).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="no shared codebook"):
        quantize(weight, config, "wls", importance=importance, codebooks={})


def test_the_nearest_point_search_is_the_exact_argmin():
    """kernels.vq_nearest (float32, int32 minimum) picks a point whose float64 distance is the minimum's up
    to float32 rounding, for 16…4096 points, shared and per-vector weights, zero weights (padding)."""
    from mxq.converter.kernels import vq_nearest

    rng = np.random.default_rng(0)
    for K, m in ((16, 2), (64, 2), (256, 4), (4096, 4), (4096, 3)):
        x = rng.standard_normal((500, m)).astype(np.float32)
        s = rng.uniform(0.2, 2.0, 500).astype(np.float32)
        planes = rng.standard_normal((4, K)).astype(np.float32)
        for a in (rng.random((500, m)).astype(np.float32), rng.random((1, m)).astype(np.float32),
                  np.where(rng.random((500, m)) < 0.3, 0, 1).astype(np.float32)):
            index = np.empty(500, np.int64)
            vq_nearest(x, a, s, planes[:m], index)
            p = planes[:m].T.astype(np.float64)  # (K, m)
            dist = (np.broadcast_to(a, x.shape)[:, None, :] * (x[:, None, :] - s[:, None, None] * p[None]) ** 2).sum(2)
            chosen = dist[np.arange(500), index]
            assert np.all(chosen <= dist.min(1) + 1e-5 * (1 + dist.max(1))), (K, m)


def test_gptvq_with_a_shared_codebook_decodes_to_what_it_stores():
    torch.manual_seed(0)
    weight, importance = _matrix(out=96, n=130)
    books = _books(weight, importance)
    x = torch.randn(1024, 130)
    config = StorageConfig.parse("rows(32:v3d4g32s,32:b3g64,32:v2d4g64s+o5)")
    blobs, stored = compensated_rows(weight, x.T @ x, config, importance=importance, codebooks=books)
    assert "0.codebook" not in blobs and "2.codebook" not in blobs
    readable = {**blobs, "0.codebook": books[(3, 4)], "2.codebook": books[(2, 4)]}
    assert torch.equal(torch.from_numpy(dequantize(readable, weight.shape, config)), stored)


def test_shared_codebook_fit_is_deterministic_and_covers_every_pair(tmp_path):
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter.candidates import parse_candidates
    from mxq.converter.checkpoint import read_checkpoint
    from mxq.converter.shared_codebooks import fit_shared_codebooks

    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))
    candidates = parse_candidates("b3g64,v3d4g64s,v3d4g32s,v2d4g128s,v3d2g32")
    a = fit_shared_codebooks(checkpoint, candidates, None)
    b = fit_shared_codebooks(checkpoint, candidates, None)
    assert sorted(a) == [(2, 4), (3, 4)] and a[(3, 4)].shape == (4096, 4) and a[(2, 4)].dtype == np.float16
    assert all(np.array_equal(a[k], b[k]) for k in a) and np.isfinite(a[(3, 4)]).all()
    assert fit_shared_codebooks(checkpoint, parse_candidates("b3g64,v3d2g32"), None) == {}
    cache = tmp_path / "codebooks"
    c = fit_shared_codebooks(checkpoint, candidates, None, cache=cache, key="k")
    files = sorted(cache.iterdir())
    assert len(files) == 2 and all(np.array_equal(a[k], c[k]) for k in a)
    files[0].write_bytes(b"damaged")  # refitted, and stored again
    d = fit_shared_codebooks(checkpoint, candidates, None, cache=cache, key="k")
    assert all(np.array_equal(a[k], d[k]) for k in a) and np.load(files[0]).shape in ((256, 4), (4096, 4))
    from mxq.format_spec import int8_grid

    assert all(int8_grid(book) is not None for book in a.values())  # 4-D points on the 8-bit grid (SPEC.md §12.5)
    np.save(files[0], np.load(files[0]) + np.float16(1e-3))  # a codebook cached off the grid is moved onto it
    e = fit_shared_codebooks(checkpoint, candidates, None, cache=cache, key="k")
    assert all(int8_grid(book) is not None for book in e.values())


def test_four_dimensional_codebooks_are_fitted_on_the_8_bit_grid():
    """kmeans_codebook puts 4-D points on the grid of their largest coordinate (each moved by at most half a
    step: what k-means gave, rounded), leaves 2-D ones as k-means gave them, and a matrix's v2d4 blobs carry a
    grid codebook that the CPU runtime multiplies with integer dot products."""
    from mxq.converter.vq import kmeans_codebook
    from mxq.format_spec import int8_grid

    rng = np.random.default_rng(3)
    xs, ws = rng.standard_normal((4000, 4)).astype(np.float32), rng.random((4000, 4)).astype(np.float32)
    book = kmeans_codebook(xs, ws, 8, 6)
    codes, e = int8_grid(book)
    assert np.abs(codes).max() > 63  # the grid of max |point|: the top half of the codes is used
    xs2 = np.ascontiguousarray(xs[:, :2])
    assert int8_grid(kmeans_codebook(xs2, np.ascontiguousarray(ws[:, :2]), 6, 6)) is None  # 2-D: as fitted
    weight, importance = _matrix()
    blobs = quantize(weight, StorageConfig.parse("v2d4g32"), "wls", importance=importance).blobs
    assert int8_grid(blobs["codebook"]) is not None


@pytest.mark.parametrize("quantizer", ["wls", "gptq"])
def test_conversion_with_shared_codebooks_keeps_the_budget(tmp_path, quantizer):
    """tiny-llama with shared-codebook candidates: the file is 1.8 and holds the codebook tensors once, the
    linears' bpw with them counted is what the converter reports and within the budget (cost model = bytes),
    and lean and cached logits agree."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert
    from mxq.format_spec.summary import summarize
    from mxq.runtime.generate import load

    out = tmp_path / "vqs.mxq"
    report = convert(fixtures.ensure("tiny-llama"), out, bpw=5.0, configs="b2g64,b3g64,b4g64,v3d4g32s,v2d4g64s",
                     quantizer=quantizer, cache_dir=None)  # 36 KiB of codebooks on 147k weights: ~2 bpw
    with MxqFile.open(out) as f:
        assert f.version == (1, 8) and not f.verify()
        assert sorted(f.codebooks) == ["codebook.v2d4", "codebook.v3d4"]
        assert not any(name.startswith("codebook.") for name in f.tensors)
        linears = [e for e in f.tensors.values() if e.role == "linear"]
        assert any(e.config.scheme == "vq" and e.config.shared for e in linears)
        assert all(e.nbytes == tensor_nbytes(e.shape, e.config) for e in linears)
        held = sum(e.nbytes for e in linears) + sum(e.nbytes for e in f.codebooks.values())
        bpw = 8 * held / sum(e.numel for e in linears)
        assert bpw <= 5.0 and bpw == pytest.approx(report.achieved_bpw, abs=1e-6)
        assert summarize(f)["totals"]["bpw_linear"] == pytest.approx(bpw, abs=1e-6)
    ids = np.array([1, 5, 9, 200, 3])
    with load(out) as lean, load(out, cache_dequantized=True) as cached:
        a, b = lean.logits(ids), cached.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_a_byte_budget_with_shared_codebooks_is_met(tmp_path):
    """--size: the codebook tensors are part of the planned file, so the written file is within the budget."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert

    out = tmp_path / "size.mxq"
    size = 12_650_000  # the fp16 embedding (~12.3 MB) + the linears at ~5 bpw + 36 KiB of codebooks
    report = convert(fixtures.ensure("tiny-llama"), out, size=size, configs="b2g64,b3g64,b4g64,v3d4g32s,v2d4g64s",
                     quantizer="wls", cache_dir=None)
    assert report.file_bytes == out.stat().st_size <= size
    with MxqFile.open(out) as f:
        assert sorted(f.codebooks) == ["codebook.v2d4", "codebook.v3d4"] and not f.verify()
