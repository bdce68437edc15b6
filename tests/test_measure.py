"""Error measurement: row-sampled estimates and their error bars, exactness on all rows, the error cache."""
import json
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch

from mxq.converter.candidates import parse_candidates
from mxq.converter.kernels import wls_scale_zero
from mxq.converter.measure import ErrorCache, estimate, group_spread, measure, sample_rows
from mxq.converter.quantize import quantize
from mxq.format_spec import StorageConfig, dequantize


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 12
    return w


class _Checkpoint:
    """The slice of Checkpoint that measure() uses: linears with names and shapes, load(name)."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.linears = [SimpleNamespace(name=n, shape=tuple(w.shape)) for n, w in weights.items()]

    def load(self, name):
        return self.weights[name]


def test_sample_rows_are_evenly_spread_and_fall_back_to_all_rows():
    rows = sample_rows(1024, 8)
    assert rows.tolist() == list(range(0, 1024, 8))
    assert len(sample_rows(1000, 8)) == 125 and sample_rows(1000, 8)[-1] < 1000
    assert len(sample_rows(192, 8)) == 64  # at least MIN_SAMPLE_ROWS
    assert sample_rows(64, 8) is None and sample_rows(4096, 1) is None
    # a row block's sample (--row-blocks): 1 in 8 of its rows, at least its own smaller minimum
    assert len(sample_rows(144, 8, 16)) == 18 and len(sample_rows(48, 8, 16)) == 16 and sample_rows(16, 8, 16) is None


def test_estimate_scales_the_sample_by_the_proxy_and_states_its_standard_error():
    proxy = np.array([1.0, 2.0, 3.0, 4.0])
    assert estimate(np.array([1.0, 2.0, 3.0, 5.0]), proxy, np.arange(4)) == (11.0, 0.0)  # every row: exact
    assert estimate(np.array([2.0, 6.0]), proxy, np.array([0, 2])) == (20.0, 0.0)  # errors ∝ proxy: no doubt
    total, se = estimate(np.array([2.0, 7.0]), proxy, np.array([0, 2]))
    assert total == pytest.approx(22.5) and se > 0
    total, se = estimate(np.array([1.0, 3.0]), np.zeros(4), np.array([0, 2]))  # no proxy: 4 × the mean
    assert total == 8.0 and se == pytest.approx(4 * np.sqrt(0.5 * 2.0 / 2))


def test_group_spread_is_span_squared_times_importance():
    weight = torch.tensor([[0.0, 1.0, 5.0], [2.0, 2.0, -1.0]])
    importance = torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 1.0]])
    weighted, plain = group_spread(weight, importance, 2)  # groups {0, 1}, {2, padding}
    assert weighted.tolist() == [1.0 * 4, 0.0 * 1] and plain.tolist() == [1.0 * 2, 0.0 * 1]
    weighted, plain = group_spread(weight, None, 32)
    assert weighted.tolist() == plain.tolist() == [25.0 * 3, 9.0 * 3]


@pytest.mark.parametrize("quantizer", ["wls", "hqq"])
def test_row_sample_estimates_the_whole_matrix_within_its_error_bar(quantizer):
    weight = _weight((1024, 256), 3)
    importance = torch.rand(1024, 256, generator=torch.Generator().manual_seed(4)) ** 3
    config = StorageConfig.affine(3, 64, meta_bits=8)
    exact = quantize(weight, config, quantizer, pack=False, importance=importance)
    rows = sample_rows(1024, 8)
    sample = quantize(weight, config, quantizer, pack=False, importance=importance, rows=rows)
    total, se = estimate(sample.row_weighted.numpy(), group_spread(weight, importance, 64)[0], rows.numpy())
    assert 0 < se < 0.1 * total
    assert abs(total - exact.weighted_error) < 4 * se
    # a sampled row is quantized as in the whole matrix, up to the metadata runs it shares
    assert sample.row_weighted.numpy() == pytest.approx(exact.row_weighted.numpy()[rows.numpy()], rel=0.05)
    with pytest.raises(ValueError, match="without outliers"):
        quantize(weight, StorageConfig.affine(3, 64, 10), quantizer, rows=rows)
    # 6-bit metadata: a sampled row's runs span 8× as many of the matrix's rows, so a row's own error may
    # move more (here up to ~13%), but the estimate of the whole stays within its error bar
    config = StorageConfig.affine(3, 64, meta_bits=6)
    exact = quantize(weight, config, quantizer, pack=False, importance=importance)
    sample = quantize(weight, config, quantizer, pack=False, importance=importance, rows=rows)
    total, se = estimate(sample.row_weighted.numpy(), group_spread(weight, importance, 64)[0], rows.numpy())
    assert abs(total - exact.weighted_error) < 4 * se


def test_measuring_every_row_gives_the_exact_errors_of_the_written_bytes(tmp_path):
    weights = {"a.weight": _weight((96, 200), 1), "b.weight": _weight((300, 64), 2)}
    importance = {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) for n, w in weights.items()}
    candidates = parse_candidates("b2g32,b4g64,b8g128,b3g32+o1%,fp16")
    cache = ErrorCache(tmp_path, "hash")
    table = measure(_Checkpoint(weights), candidates, "wls", cache, importance=importance.__getitem__,
                    importance_id="test", sample_every=1)
    assert not table.weighted_se.any()
    for i, (name, weight) in enumerate(weights.items()):
        for c, candidate in enumerate(candidates):
            config = candidate.storage(weight.shape)
            result = quantize(weight, config, "wls", importance=importance[name])
            restored = torch.from_numpy(dequantize(result.blobs, weight.shape, config))
            assert table.error_sq[i, c] == result.error_sq
            assert table.weighted[i, c] == result.weighted_error
            assert float(((restored - weight).double() ** 2).sum()) == pytest.approx(result.error_sq, rel=1e-6)


def test_sampled_measurement_states_error_bars_and_is_cached_apart(tmp_path):
    weights = {"a.weight": _weight((1024, 128), 1)}
    candidates = parse_candidates("b3g64,b4g64")
    exact = measure(_Checkpoint(weights), candidates, "wls", ErrorCache(tmp_path, "h"), sample_every=1)
    sampled = measure(_Checkpoint(weights), candidates, "wls", ErrorCache(tmp_path, "h"), sample_every=8)
    assert (sampled.weighted_se > 0).all()
    assert (np.abs(sampled.weighted - exact.weighted) < 4 * sampled.weighted_se).all()
    keys = json.loads((tmp_path / "h.json").read_text())["errors"]
    assert sorted(keys) == ["wls/none/magnitude/b3g64", "wls/none/magnitude/b3g64/rows1in8",
                            "wls/none/magnitude/b4g64", "wls/none/magnitude/b4g64/rows1in8"]


def test_error_cache_drops_damaged_entries_with_one_notice(tmp_path, capsys):
    cache = ErrorCache(tmp_path, "h")
    cache.put("k", "a", [1.0, 2.0, 0.0])
    cache.put("k", "b", [3.0, 4.0, 0.0])
    cache.data["norms"].update(a=1.0, b=2.0)
    cache.save()
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # no temporary file left behind
    data = json.loads((tmp_path / "h.json").read_text())
    data["errors"]["k"]["b"] = [3.0, "x", 0.0]
    data["norms"]["a"] = -1
    (tmp_path / "h.json").write_text(json.dumps(data))
    reread = ErrorCache(tmp_path, "h")
    assert reread.get("k", "a") == [1.0, 2.0, 0.0] and reread.get("k", "b") is None
    assert "a" not in reread.data["norms"] and reread.data["norms"]["b"] == 2.0
    assert len(reread.notices) == 1 and "2 damaged entries" in capsys.readouterr().err


def test_unreadable_error_cache_is_rebuilt_with_a_notice(tmp_path, capsys):
    (tmp_path / "h.json").write_text('{"v": 4, "errors": {"k": {"a": [1.0, ')  # cut short
    cache = ErrorCache(tmp_path, "h")
    assert cache.data["errors"] == {} and len(cache.notices) == 1
    assert capsys.readouterr().err.count("\n") == 1
    table = measure(_Checkpoint({"a.weight": _weight((8, 64))}), parse_candidates("b4g32"), "rtn", cache)
    assert table.error_sq[0, 0] > 0
    assert ErrorCache(tmp_path, "h").notices == []  # rewritten whole


def test_wls_kernel_does_not_depend_on_the_thread_count():
    weight = _weight((257, 384), 6).view(257, 6, 64).contiguous()
    importance = torch.rand(257, 6, 64, generator=torch.Generator().manual_seed(7))
    keep = np.zeros((0, 0, 0), np.bool_)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        scale, zero = np.empty((257, 6), np.float32), np.empty((257, 6), np.float32)
        wls_scale_zero(weight.numpy(), keep, importance.numpy(), 384, 0.0, 15.0, scale, zero)
        results.append((scale, zero))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
