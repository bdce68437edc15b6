"""--row-blocks: matrices split into row blocks sorted by importance, each block a config of its own
(converter/row_blocks.py): the order, the cut, exact costs, the blobs, measurement and whole conversions."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fixtures
from test_measure import _Checkpoint
from mxq.converter import ConversionError, convert
from mxq.converter.candidates import parse_candidates
from mxq.converter.measure import ErrorCache, measure
from mxq.converter import row_blocks
from mxq.converter.options import MIN_BLOCK_ROWS, MIN_SPLIT_COLUMNS
from mxq.converter.quantize import quantize
from mxq.converter.row_blocks import (block_counts, quantize_rows, row_importance, row_order, rows_config, split,
                                      unit_nbytes)
from mxq.converter.sweep import heatmap_entries
from mxq.format_spec import MxqWriter, aligned_nbytes, blob_specs, dequantize, stored_blobs, tensor_nbytes
from mxq.format_spec.layout import block_blobs

FAST = dict(calib_tokens=1024)


@pytest.fixture(autouse=True)
def narrow_rows_split(monkeypatch):
    """The tiny fixtures' rows are 96 and 160 wide, narrower than MIN_SPLIT_COLUMNS: split them anyway."""
    monkeypatch.setattr(row_blocks, "MIN_SPLIT_COLUMNS", 64)


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[::7] *= 5  # rows of very different importance
    return w


def _restored(blobs, shape, config) -> np.ndarray:
    """A `rows` tensor decoded with format_spec's NumPy reference on each block, rows put back in W's order
    (by hand: independent of format_spec.rows)."""
    parts = [dequantize(block_blobs(blobs, b), (count, shape[1]), block) for b, (count, block) in
             enumerate(config.blocks)]
    restored = np.empty(shape, np.float32)
    restored[blobs["row_order"].astype(np.int64)] = np.concatenate(parts)
    assert np.array_equal(restored, dequantize(blobs, shape, config))  # format_spec's reference agrees
    return restored


def test_blocks_are_near_equal_and_never_below_the_minimum():
    assert block_counts((576, 576), 4) == [144] * 4
    assert block_counts((578, 96), 4) == [145, 145, 144, 144]
    assert block_counts((96, 96), 4) == [32, 32, 32]  # fewer blocks: each keeps MIN_BLOCK_ROWS rows
    assert block_counts((2 * MIN_BLOCK_ROWS - 1, 96), 4) == [2 * MIN_BLOCK_ROWS - 1]  # whole
    assert block_counts((4096, 4096), 1) == [4096]


def test_narrow_rows_stay_whole(monkeypatch):
    monkeypatch.undo()  # the real MIN_SPLIT_COLUMNS
    assert block_counts((576, MIN_SPLIT_COLUMNS), 4) == [144] * 4
    assert block_counts((576, MIN_SPLIT_COLUMNS - 1), 4) == [576]


def test_row_order_is_by_importance_with_ties_in_row_order():
    weight = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert row_order(weight, None).tolist() == [1, 3, 0, 2]  # ‖W_i‖²: 9, 4, 1, 1 (tie: row 0 before 2)
    importance = torch.tensor([[1.0, 1.0], [0.0, 1.0], [5.0, 0.0], [1.0, 1.0]])
    assert row_importance(weight, importance).tolist() == [1.0, 0.0, 5.0, 4.0]
    assert row_order(weight, importance).tolist() == [2, 3, 0, 1]
    w = _weight((300, 64))
    assert np.array_equal(row_order(w, None), row_order(w.clone(), None))


@pytest.mark.parametrize("labels", [["b3g64", "b4g32", "b2g128"], ["b3g64+o1%", "fp16", "l3c4"]])
def test_unit_costs_add_up_to_the_rows_config_exactly(labels):
    shape = (300, 200)  # metadata runs over each block's own (count, in) shape, not a share of the matrix's
    counts = block_counts(shape, 3)
    candidates = parse_candidates(",".join(labels))
    config = rows_config(shape, counts, candidates)
    assert config.row_counts == tuple(counts)
    assert sum(unit_nbytes(shape, counts, b, c) for b, c in enumerate(candidates)) == tensor_nbytes(shape, config)
    assert sum(unit_nbytes(shape, counts, b, c, 64) for b, c in enumerate(candidates)) == \
        aligned_nbytes(shape, config, 64)
    assert unit_nbytes(shape, [300], 0, candidates[0]) == tensor_nbytes(shape, candidates[0].storage(shape))


def test_rows_blobs_are_the_blocks_quantized_in_row_order():
    weight = _weight((200, 96), 1)
    importance = torch.rand(200, 96, generator=torch.Generator().manual_seed(2))
    parts = split(weight, importance, 4)
    assert parts.counts == (50, 50, 50, 50)
    config = rows_config(weight.shape, parts.counts, parse_candidates("b4g32,b3g32+o2%,b2g32,fp16"))
    blobs = quantize_rows(weight, config, importance, parts.order,
                          lambda w, c, imp: quantize(w, c, "wls", importance=imp).blobs)
    specs, stored = blob_specs(weight.shape, config), stored_blobs(blobs, weight.shape, config)
    assert sorted(stored) == sorted(specs)
    assert all(stored[n].dtype == np.dtype(s.dtype) and stored[n].shape == s.shape for n, s in specs.items())
    assert np.array_equal(np.sort(blobs["row_order"]), np.arange(200))
    restored = _restored(blobs, weight.shape, config)
    first = torch.from_numpy(parts.rows(0))
    block0 = quantize(weight[first], config.blocks[0][1], "wls", importance=importance[first]).blobs
    assert np.array_equal(restored[parts.rows(0)], dequantize(block0, (50, 96), config.blocks[0][1]))
    assert np.abs(restored[parts.rows(3)] - weight.numpy()[parts.rows(3)]).max() < 1e-3  # the fp16 block
    assert np.linalg.norm(restored - weight.numpy()) < 0.2 * np.linalg.norm(weight.numpy())


def test_block_errors_are_exact_on_every_row_and_cached_per_order(tmp_path):
    weights = {"a.weight": _weight((200, 64), 3), "b.weight": _weight((40, 64), 4)}  # b stays whole
    checkpoint = _Checkpoint(weights)
    candidates = parse_candidates("b3g32,b2g64+o1%")
    cache = ErrorCache(tmp_path, "h")
    table = measure(checkpoint, candidates, "wls", cache, sample_every=1, row_blocks=4)
    assert table.names == ["a.weight"] * 4 + ["b.weight"]
    assert [table.unit(i) for i in range(5)] == [(b, (50,) * 4) for b in range(4)] + [(0, (40,))]
    assert table.numel.tolist() == [50 * 64] * 4 + [40 * 64]
    assert table.norms_sq.sum() == pytest.approx(sum(float((w.double() ** 2).sum()) for w in weights.values()))
    order = row_order(weights["a.weight"], None)
    for b in range(4):
        rows = torch.from_numpy(order[50 * b:50 * (b + 1)])
        for c, candidate in enumerate(candidates):
            exact = quantize(weights["a.weight"][rows], candidate.storage((50, 64)), "wls")
            assert table.weighted[b, c] == exact.weighted_error and table.weighted_se[b, c] == 0
            assert table.costs[b, c] == unit_nbytes((200, 64), [50] * 4, b, candidate)
    sampled = measure(checkpoint, candidates, "wls", cache, sample_every=8, row_blocks=4)  # 16 of 50 rows a block
    assert np.all(sampled.weighted_se[:4, 0] > 0) and np.all(
        np.abs(sampled.weighted[:4, 0] - table.weighted[:4, 0]) < 5 * sampled.weighted_se[:4, 0] + 1e-12)
    whole = measure(checkpoint, candidates, "wls", cache, sample_every=1)  # K=1: its own entries
    assert whole.names == ["a.weight", "b.weight"] and not whole.blocks
    assert whole.weighted[1].tolist() == table.weighted[4].tolist()  # an unsplit matrix shares K=1's entries
    cache.save()
    again = measure(checkpoint, candidates, "wls", ErrorCache(tmp_path, "h"), sample_every=1, row_blocks=4,
                    runner=lambda f, jobs: pytest.fail("measured again") if jobs else iter(()))
    assert np.array_equal(again.weighted, table.weighted)
    two = measure(checkpoint, candidates, "wls", ErrorCache(tmp_path, "h"), sample_every=1, row_blocks=2)
    assert two.names == ["a.weight"] * 2 + ["b.weight"]  # another K: other entries, measured


@pytest.fixture(scope="module")
def tiny_llama():
    return fixtures.ensure("tiny-llama")


@pytest.fixture()
def written(monkeypatch):
    """name -> (plan, blobs) of every tensor the writer writes."""
    seen = {}
    real = MxqWriter.write

    def write(self, name, blobs):
        seen[name] = (self.tensors[self._next], blobs)
        return real(self, name, blobs)

    monkeypatch.setattr(MxqWriter, "write", write)
    return seen


def test_bpw_conversion_writes_the_cost_models_bytes(tiny_llama, tmp_path, written):
    from safetensors.numpy import load_file

    report = convert(tiny_llama, tmp_path / "m.mxq", bpw=3.0, row_blocks=4, cache_dir=str(tmp_path / "c"), **FAST)
    source = load_file(str(tiny_llama / "model.safetensors"))
    linear_bytes = numel = 0
    for name, (plan, blobs) in written.items():
        stored = stored_blobs(blobs, plan.shape, plan.config).values()
        assert sum(np.asarray(b).nbytes for b in stored) == tensor_nbytes(plan.shape, plan.config)
        if plan.role != "linear":
            continue
        linear_bytes += tensor_nbytes(plan.shape, plan.config)
        numel += plan.shape[0] * plan.shape[1]
        if plan.shape[0] >= 2 * MIN_BLOCK_ROWS:  # q/o/gate/up/down (96 and 160 rows) are split, k/v (48) not
            assert plan.config.row_counts == tuple(block_counts(plan.shape, 4))
            restored = _restored(blobs, plan.shape, plan.config)
            assert np.linalg.norm(restored - source[name]) < 0.5 * np.linalg.norm(source[name])
        else:
            assert plan.config.scheme == "affine"
    assert round(8 * linear_bytes / numel, 6) == report.achieved_bpw and linear_bytes <= 3.0 * numel / 8


def test_size_conversion_fills_the_budget_to_the_byte(tiny_llama, tmp_path, written):
    fixed = dict(quantize_embeddings=8, row_blocks=4, cache_dir=str(tmp_path / "c"), **FAST)
    reference = convert(tiny_llama, tmp_path / "ref.mxq", bpw=4.0, **fixed)
    target = reference.file_bytes - 15000
    report = convert(tiny_llama, tmp_path / "s.mxq", size=target, **fixed)
    actual = (tmp_path / "s.mxq").stat().st_size
    assert actual == report.file_bytes and target - 2048 < actual <= target
    assert any(plan.config.scheme == "rows" for plan, _ in written.values())


def test_whole_file_budget_keeps_embeddings_per_matrix(tiny_llama, tmp_path, written):
    report = convert(tiny_llama, tmp_path / "w.mxq", size=3_600_000, row_blocks=4, cache_dir=str(tmp_path / "c"),
                     **FAST)
    assert (tmp_path / "w.mxq").stat().st_size == report.file_bytes <= 3_600_000
    assert report.matrix_configs and all(not label.startswith("rows") for label in report.matrix_configs.values())


def test_gptq_rounds_each_row_block(tiny_llama, tmp_path, written):
    convert(tiny_llama, tmp_path / "g.mxq", bpw=3.5, row_blocks=3, quantizer="gptq", cache_dir=str(tmp_path / "c"),
            **FAST)
    split_plans = [(plan, blobs) for plan, blobs in written.values() if plan.config.scheme == "rows"]
    assert split_plans
    for plan, blobs in split_plans:
        stored = stored_blobs(blobs, plan.shape, plan.config).values()
        assert sum(np.asarray(b).nbytes for b in stored) == tensor_nbytes(plan.shape, plan.config)


def test_bad_row_blocks_fail_cleanly(tiny_llama, tmp_path):
    with pytest.raises(ConversionError, match="--row-blocks 0"):
        convert(tiny_llama, tmp_path / "m.mxq", bpw=3.0, row_blocks=0, cache_dir=None)
    assert not (tmp_path / "m.mxq").exists()


def test_heatmap_shows_a_split_matrixs_mean():
    candidates = parse_candidates("b2g64,b4g64")
    table = SimpleNamespace(names=["m.layers.0.q.weight"] * 2 + ["m.layers.0.k.weight"], candidates=candidates,
                            costs=np.array([[10, 20], [10, 20], [5, 9]]), numel=np.array([40, 40, 20]))
    entries = heatmap_entries(table, np.array([0, 1, 1]))
    assert entries == [("m.layers.0.q.weight", "3.0", 8.0 * 30 / 80), ("m.layers.0.k.weight", "b4g64", 8.0 * 9 / 20)]


def test_split_files_load_and_run_in_the_runtime(tiny_llama, tmp_path):
    import mxq
    from mxq.format_spec import MxqFile

    common = dict(cache_dir=str(tmp_path / "c"), **FAST)
    fp16 = convert(tiny_llama, tmp_path / "fp16.mxq", bpw=16, configs="fp16", **common)
    single = convert(tiny_llama, tmp_path / "single.mxq", bpw=16, configs="fp16", row_blocks=4, **common)
    assert single.config_counts == {"fp16": 14}  # one candidate: nothing to split
    rows16 = convert(tiny_llama, tmp_path / "rows16.mxq", size=fp16.file_bytes + 100_000, configs="fp16,b8g64",
                     row_blocks=4, input_scaling=0.0, **common)  # unscaled: the fp16 file's weights, permuted
    assert set(rows16.config_counts) == {"fp16"}
    convert(tiny_llama, tmp_path / "rows3.mxq", bpw=3.0, row_blocks=4, **common)
    ids = np.random.default_rng(3).integers(0, 200, size=24)
    with MxqFile.open(tmp_path / "rows16.mxq") as f:
        assert f.verify() == [] and any(e.config.scheme == "rows" for e in f.tensors.values())
    with mxq.load(tmp_path / "fp16.mxq") as lm:
        reference = lm.logits(ids)
    with mxq.load(tmp_path / "rows16.mxq") as lm:  # fp16 blocks in a permuted order: the same model
        assert np.abs(lm.logits(ids) - reference).max() <= 1e-4 * np.abs(reference).max()
    with MxqFile.open(tmp_path / "rows3.mxq") as f:
        assert f.verify() == []
        assert {len(e.config.blocks) for e in f.tensors.values() if e.config.scheme == "rows"} == {3, 4}
    with mxq.load(tmp_path / "rows3.mxq") as lm:
        logits = lm.logits(ids)
        assert logits.shape == reference.shape and np.isfinite(logits).all()


def test_a_files_blocks_read_back_as_the_tables_choice(tiny_llama, tmp_path):
    """--max-loss and `mxq sweep` read a written file's choice back per unit (prediction.file_choice)."""
    from mxq.converter.allocate import allocate
    from mxq.converter.options import ConvertOptions
    from mxq.converter.prediction import convert_at, file_choice, prepare

    prepared = prepare(tiny_llama, ConvertOptions(bpw=3.0, row_blocks=4, cache_dir=str(tmp_path / "c"), **FAST))
    table = prepared.table
    assert len(table.names) > len(set(table.names))  # split matrices: one unit per block
    budget = int(3.0 * int(table.numel.sum()) / 8)
    convert_at(prepared, budget, tmp_path / "m.mxq")
    assert np.array_equal(file_choice(prepared, tmp_path / "m.mxq"), allocate(table.costs, table.weighted, budget))
