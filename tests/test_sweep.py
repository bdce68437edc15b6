"""--max-loss, `mxq sweep` and the allocation heatmap (`mxq inspect --plot`): search, prediction vs measurement,
CSV and PNG outputs, clean errors. Tiny fixtures here; the SmolLM2 checks are slow."""
import csv
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter import prediction
from mxq.converter.allocate import allocate
from mxq.converter.calibrate import default_text
from mxq.converter.options import ConvertOptions
from mxq.converter.sweep import calibrated_scale, grid, spread
from mxq import plot

FAST = dict(calib_tokens=1024)


def run_cli(*args, python_prelude=None):
    command = [sys.executable, "-m", "mxq.cli", *map(str, args)]
    if python_prelude:
        command = [sys.executable, "-c", f"{python_prelude}; import sys; sys.argv = ['mxq'] + {list(map(str, args))!r}; "
                                         "from mxq.cli import main; main()"]
    return subprocess.run(command, capture_output=True, text=True)


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tiny_llama():
    return fixtures.ensure("tiny-llama")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def short_heldout(monkeypatch):
    monkeypatch.setattr(prediction, "HELDOUT_TOKENS", 2048)  # fewer runtime tokens: a fast test


def test_grid_and_spread():
    budgets = grid(2.5, 8, 0.25)
    assert len(budgets) == 23 and budgets[0] == 2.5 and budgets[-1] == 8.0 and budgets[1] == 2.75
    assert grid(3, 3, 1) == [3.0]
    assert spread(budgets, 4) == [2.5, 4.25, 6.25, 8.0]
    for bad in [(5, 3, 1), (2, 3, 0), (2, 3, -1)]:
        with pytest.raises(ConversionError, match="--from"):
            grid(*bad)


def test_calibrated_scale_is_least_squares():
    assert calibrated_scale([1.0, 2.0], [2.0, 4.0]) == pytest.approx(2.0)
    assert calibrated_scale([], []) is None


def test_smallest_budget_is_the_smallest(rng=np.random.default_rng(0)):
    costs = np.sort(rng.integers(100, 1000, size=(12, 5)), axis=1)
    errors = np.sort(rng.uniform(0, 10, size=(12, 5)), axis=1)[:, ::-1].copy()  # costlier: smaller error
    rows = np.arange(12)
    full = errors[rows, allocate(costs, errors, int(costs.max(axis=1).sum()))].sum()
    limit = full * 1.5
    budget, choice = prediction.smallest_budget(costs, errors, limit, resolution=1)
    assert errors[rows, choice].sum() <= limit and costs[rows, choice].sum() <= budget
    assert errors[rows, allocate(costs, errors, budget - 1)].sum() > limit  # one byte less misses the limit
    with pytest.raises(ConversionError, match="largest configs"):
        prediction.smallest_budget(costs, errors, full * 0.5, resolution=1)


def test_max_loss_measures_the_file_and_reports_prediction_beside_it(tiny_llama, tmp_path, cache, short_heldout):
    out = tmp_path / "m.mxq"
    report = convert(tiny_llama, out, max_loss=2.0, cache_dir=cache, **FAST)
    target = report.target
    assert out.exists() and not list(tmp_path.glob(".mxq-*"))  # the rounds' other files are gone
    assert 1 <= len(target["rounds"]) <= 4 and target["heldout_tokens"] == 2048
    chosen = target["rounds"][target["chosen"]]
    assert chosen["file_bytes"] == out.stat().st_size == report.file_bytes
    if target["met"]:
        assert chosen["measured_pct"] <= 2.0
        assert chosen["file_bytes"] == min(r["file_bytes"] for r in target["rounds"] if r["measured_pct"] <= 2.0)
    # the measurement is the runtime's: evaluate the written file again, independently
    prepared = prediction.prepare(tiny_llama, ConvertOptions(bpw=4, cache_dir=cache, **FAST))
    nll = prediction.file_loss(out, prediction.heldout(prepared))["nll"]
    assert 100 * (nll - target["fp_loss"]) / target["fp_loss"] == pytest.approx(chosen["measured_pct"], abs=1e-6)
    assert any("predicted" in note and "measured" in note for note in report.notes)
    # its interval: the paired per-chunk differences against the fp16 file on the same held-out chunks
    low, high = chosen["measured_pct_95"]
    assert low < chosen["measured_pct"] < high and any("(95%: " in note for note in report.notes)


def test_fp_reference_cache_without_chunks_is_measured_again(tiny_llama, tmp_path, short_heldout):
    """The fp16 file's held-out report is cached; one without its per-chunk losses (damaged, or from before
    they were kept) is measured again, not handed to the paired comparison."""
    own_cache = tmp_path / "cache"
    prepared = prediction.prepare(tiny_llama, ConvertOptions(bpw=4, cache_dir=str(own_cache), **FAST))
    evaluation = prediction.heldout(prepared)
    first = prediction.fp_reference(prepared, evaluation, tmp_path)
    [cached] = (own_cache / "heldout").glob("*.json")
    for damaged in ({"nll": first["nll"]}, {**first, "chunk_tokens": first["chunk_tokens"][:-1]},
                    {**first, "chunk_nll": ["x"] * len(first["chunk_nll"])}):
        cached.write_text(json.dumps(damaged))
        again = prediction.fp_reference(prepared, evaluation, tmp_path)
        assert again["chunk_nll"] == pytest.approx(first["chunk_nll"]) and again["chunk_tokens"] == first["chunk_tokens"]
    assert prediction.fp_reference(prepared, evaluation, tmp_path) == json.loads(cached.read_text())  # rewritten


def test_paired_difference_is_the_per_chunk_difference():
    from mxq.runtime.perplexity import Z95, paired_difference

    a = {"chunk_nll": [3.0, 3.5, 2.5], "chunk_tokens": [10, 10, 10]}
    b = {"chunk_nll": [2.9, 3.3, 2.4], "chunk_tokens": [10, 10, 10]}
    mean, se = paired_difference(a, b)
    diffs = np.subtract(a["chunk_nll"], b["chunk_nll"])
    assert mean == pytest.approx(diffs.mean()) and se == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert 0 < Z95 * se < 0.2  # tighter than either report's own spread over its chunks
    with pytest.raises(ValueError, match="same chunks"):
        paired_difference(a, {**b, "chunk_tokens": [10, 10, 9]})


def cli(*args):
    """mxq in this process (no interpreter start-up; monkeypatches apply): (exit code, stdout, stderr)."""
    from click.testing import CliRunner
    from mxq.cli import main

    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.stdout, result.stderr


def test_max_loss_cli_and_errors(tiny_llama, tmp_path, cache, short_heldout):
    out = tmp_path / "m.mxq"
    code, stdout, stderr = cli("convert", tiny_llama, "-o", out, "--max-loss", "5%", "--calib-tokens", "1024",
                               "--cache-dir", cache, "-q")
    assert code == 0, stderr
    assert "budget loss increase ≤ 5%" in stdout and "round 1:" in stdout and out.exists()
    assert "predicted" in stdout and "measured" in stdout and "chose round" in stdout
    short = tmp_path / "short.txt"
    short.write_text(default_text()[:5000])  # ~1400 tokens: 1024 calibrate, too few are left
    for args, message in [(["--max-loss", "1%", "--bpw", "4"], "exactly one budget"),
                          (["--max-loss", "0"], "outside"), (["--max-loss", "abc"], "expected a percentage"),
                          (["--max-loss", "1", "--objective", "frobenius"], "--objective fisher"),
                          (["--max-loss", "1", "--calib", short], "left to measure the loss on"),
                          (["--max-loss", "1", "--configs", "all+vqs"], "shared-codebook candidates"),
                          (["--max-loss", "1", "--configs", "all+trellis"], "trellis ones")]:
        code, stdout, stderr = cli("convert", tiny_llama, "-o", tmp_path / "x.mxq", *args, "--calib-tokens", "1024",
                                   "--cache-dir", cache, "-q")
        assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x.mxq").exists()


def test_sweep_writes_csv_frontier_and_heatmap(tiny_llama, tmp_path, cache, short_heldout):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "mxq-4.5bpw.mxq").write_text("the user's own file")  # a measured file's name: never overwritten
    code, stdout, stderr = cli("sweep", tiny_llama, "-o", out, "--from", "2.0", "--to", "5", "--step", "0.5",
                               "--measure-at", "4.5", "--calib-tokens", "1024", "--cache-dir", cache, "-q")
    assert code == 0, stderr
    assert "MILP solves" in stdout and "skipped (outside the feasible" in stdout  # 2.0 < the cheapest (2.40)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["bpw"]) for r in rows] == [2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    predicted = [float(r["predicted_nats"]) for r in rows]
    assert all(a >= b - 1e-12 for a, b in zip(predicted, predicted[1:]))  # more bits never predict more loss
    measured = [r for r in rows if r["measured_nll"]]
    assert [float(r["bpw"]) for r in measured] == [4.5] and all(int(r["file_bytes"]) > 0 for r in measured)
    assert all(math.isfinite(float(r["measured_ppl"])) for r in measured)
    assert png_size(out / "sweep.png")[0] > 800 and png_size(out / "heatmap-4bpw.png")[0] > 300
    assert [p.name for p in out.glob("*.mxq")] == ["mxq-4.5bpw.mxq"]  # measured files are not kept without
    assert (out / "mxq-4.5bpw.mxq").read_text() == "the user's own file"  # --keep-files (no dot-files left)
    assert not list(out.glob(".*"))


def test_heatmap_grid_and_inspect_plot(tiny_llama, tmp_path, cache):
    entries = [(f"model.layers.{i}.{part}.weight", f"b{b}g64", b + 0.5) for i, b in ((0, 4), (1, 3))
               for part in ("self_attn.q_proj", "mlp.down_proj")]
    grid_ = plot.allocation_grid(entries + [("model.embed_tokens.weight", "fp16", 16.0)])
    assert grid_.layers == [0, 1] and grid_.modules == ["q_proj", "down_proj"]
    assert grid_.bpw.tolist() == [[4.5, 3.5], [4.5, 3.5]] and grid_.labels[0] == ["b4g64", "b3g64"]
    model = tmp_path / "m.mxq"
    convert(tiny_llama, model, bpw=3.5, cache_dir=cache, **FAST)
    result = run_cli("inspect", model, "--plot", tmp_path / "h.png", "--no-tensors")
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "h.png")[0] > 300
    missing = run_cli("inspect", model, "--plot", tmp_path / "n.png", python_prelude="import sys; "
                      "sys.modules['matplotlib'] = None")
    assert missing.returncode == 1 and "pip install 'mxq[plot]'" in missing.stderr and not (tmp_path / "n.png").exists()
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.heavy  # up to 4 conversions and held-out measurements of SmolLM2: 20+ min on a 2-core AVX2 machine
@pytest.mark.parametrize("percent", [1.0])
def test_smollm2_max_loss_is_met_measured(tmp_path, percent):
    report = convert(fixtures.ensure("smollm2"), tmp_path / "m.mxq", max_loss=percent)
    chosen = report.target["rounds"][report.target["chosen"]]
    assert chosen["measured_pct"] <= 1.5 * percent  # the bar: the 1% file within 1.5% measured
    assert not report.target["met"] or chosen["measured_pct"] <= percent


def test_sweep_measures_on_a_given_text(tiny_llama, tmp_path, cache):
    text = tmp_path / "eval.txt"
    text.write_text(default_text()[-3000:])
    code, stdout, stderr = cli("sweep", tiny_llama, "-o", tmp_path / "s", "--from", "4", "--to", "4", "--measure-at",
                               "4", "--text", text, "--ctx", "64", "--max-chunks", "2", "--calib-tokens", "1024",
                               "--cache-dir", cache, "-q")
    assert code == 0, stderr
    assert "fp16 reference on eval.txt" in stdout and "(2 chunks of 64 tokens)" in stdout
    (row,) = csv.DictReader(open(tmp_path / "s" / "sweep.csv"))
    assert float(row["measured_ppl"]) == pytest.approx(math.exp(float(row["measured_nll"])), rel=1e-5)
    code, _, stderr = cli("sweep", tiny_llama, "-o", tmp_path / "t", "--text", tmp_path / "missing.txt")
    assert code == 1 and "missing.txt" in stderr and len(stderr.strip().splitlines()) == 1


def test_sweep_budget_lists_must_be_positive_numbers(tiny_llama, tmp_path):
    for option, value in [("--measure-at", "nan"), ("--measure-at", "3,inf"), ("--measure-at", "-1"),
                          ("--measure-at", "abc"), ("--heatmap-bpw", "nan")]:
        code, stdout, stderr = cli("sweep", tiny_llama, "-o", tmp_path / "out", option, value, "-q")
        assert code == 1 and option in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_sweep_checks_its_outputs_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "out"
    (out / "sweep.png").mkdir(parents=True)
    code, stdout, stderr = cli("sweep", tiny_llama, "-o", out, "--measure-at", "none", "-q")
    assert code == 1 and "sweep.png" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in out.iterdir()) == ["sweep.png"] and "MILP" not in stdout  # nothing written or solved
