"""The whole file under the budget: with --size / --fit the embedding and lm_head are allocation
decisions beside the decoder linears (their bytes exactly as the cost model says, a tied matrix stored
once), and --fit keeps the measured peak RSS of `mxq generate` within SIZE."""
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter.allocate import allocate
from mxq.converter.budget import MATRIX_CANDIDATES, padded, runtime_overhead
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.options import ConvertOptions, parse_size
from mxq.format_spec import MxqFile, tensor_nbytes
from mxq.runtime.footprint import MiB

FAST = dict(calib_tokens=1024)
MATRIX_LABELS = {c.label for c in MATRIX_CANDIDATES}


@pytest.fixture(scope="module")
def error_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("errors"))


def stored_once(f: MxqFile) -> dict:
    return {name: entry for name, entry in f.tensors.items() if entry.role in ("embedding", "lm_head")}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])  # untied lm_head; tied (stored once)
def test_size_allocates_the_embedding_and_lm_head_to_the_byte(name, tmp_path, error_cache):
    path = fixtures.ensure(name)
    fp16 = convert(path, tmp_path / "fp16.mxq", bpw=5.0, cache_dir=error_cache, **FAST)  # embeddings fp16
    labels = set()
    for target in (fp16.file_bytes * 60 // 100, fp16.file_bytes):
        report = convert(path, tmp_path / "s.mxq", size=target, cache_dir=error_cache, **FAST)
        actual = (tmp_path / "s.mxq").stat().st_size
        # no lower bound: whole-matrix steps are coarse on a tiny model (its embedding is most of the file),
        # and the MILP may rightly leave bytes unspent rather than take a 2.8 MB step
        assert actual == report.file_bytes <= target, (target, actual)
        with MxqFile.open(tmp_path / "s.mxq") as f:
            matrices = stored_once(f)
            assert set(matrices) == set(report.matrix_configs)  # a tied matrix: one tensor, one decision
            assert (len(matrices) == 1) == (name == "tiny-qwen2")
            for entry in f.tensors.values():  # the cost model's bytes are the bytes written
                assert entry.nbytes == tensor_nbytes(entry.shape, entry.config), entry.name
            for tensor, entry in matrices.items():
                assert entry.config.label in MATRIX_LABELS | {"fp16"}
                labels.add(entry.config.label)
    assert len(labels) >= 2  # the budget moved the embedding's config


def test_tight_size_quantizes_the_embedding_rather_than_starving_the_linears(tmp_path, error_cache):
    """Today's --size paid the embedding at fp16; now the MILP trades it against the linears."""
    path = fixtures.ensure("tiny-qwen2")
    fp16 = convert(path, tmp_path / "fp16.mxq", bpw=3.0, cache_dir=error_cache, **FAST)
    report = convert(path, tmp_path / "s.mxq", size=fp16.file_bytes, cache_dir=error_cache, **FAST)
    assert report.achieved_bpw > fp16.achieved_bpw  # the bytes the embedding gave up went to the linears
    assert next(iter(report.matrix_configs.values())) != "fp16"


def test_explicit_embedding_override_and_bpw_keep_todays_semantics(tmp_path, error_cache):
    path = fixtures.ensure("tiny-qwen2")
    bpw = convert(path, tmp_path / "b.mxq", bpw=4.0, cache_dir=error_cache, **FAST)
    fixed = convert(path, tmp_path / "q.mxq", size=bpw.file_bytes, quantize_embeddings=8, cache_dir=error_cache,
                    **FAST)
    assert bpw.matrix_configs == fixed.matrix_configs == {}
    with MxqFile.open(tmp_path / "b.mxq") as b, MxqFile.open(tmp_path / "q.mxq") as q:
        assert {e.config.label for e in stored_once(b).values()} == {"fp16"}
        assert {e.config.label for e in stored_once(q).values()} == {"b8g64"}


def test_padding_is_never_chosen():
    """Rows with different candidate counts share one MILP: padded entries are dominated."""
    costs = padded([np.array([10, 20, 40]), np.array([5, 50])], fill_cost=True)
    errors = padded([np.array([3.0, 2.0, 0.0]), np.array([9.0, 0.0])], fill_cost=False)
    assert costs.shape == errors.shape == (2, 3)
    for budget in range(15, 100):
        choice = allocate(costs, errors, budget)
        assert choice[1] < 2, (budget, choice)


def test_fit_and_size_options_fail_cleanly(tmp_path):
    path = fixtures.ensure("tiny-llama")
    out = tmp_path / "m.mxq"
    for options, message in ((dict(fit=2**30), "--context"), (dict(context=64, size=9 * 10**6), "--context"),
                             (dict(fit=20 * MiB, context=64), "the runtime itself needs"),
                             (dict(fit=2**30, context=100000), "exceeds the model's context"),
                             (dict(fit=2**30, context=64, batch=0), "--batch"),
                             (dict(size=9 * 10**6, bpw=4.0), "exactly one budget")):
        with pytest.raises(ConversionError, match=message):
            convert(path, out, cache_dir=None, **options)
    with pytest.raises(ConversionError, match="--fit 'lots'"):
        parse_size("lots", "--fit")
    done = subprocess.run([sys.executable, "-m", "mxq.cli", "convert", str(path), "-o", str(out), "--fit", "20MiB",
                           "--context", "64", "-q", "--no-cache"], capture_output=True, text=True)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the runtime itself needs" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def warm_kernels(tmp_path):
    """Compile (or load) the CPU kernels so that no measured run pays for the compiler."""
    from test_footprint import _env, peak_rss
    from test_runtime_files import write_test_mxq

    warm = write_test_mxq(fixtures.ensure("tiny-qwen2"), tmp_path / "warm.mxq")
    peak_rss(["generate", str(warm), "Hi", "-n", "2"], _env(True))


def fit_and_measure(path, tmp_path, fit: int, context: int, error_cache, options=FAST) -> tuple[int, int]:
    """(file bytes, measured peak RSS) of `mxq generate` with a prompt of about `context` tokens on the
    file `--fit fit --context context` (and `options`) wrote."""
    from test_footprint import NEW_TOKENS, _env, peak_rss, prompt_of

    out = tmp_path / f"fit{fit}.mxq"
    report = convert(path, out, fit=fit, context=context, cache_dir=error_cache, **options)
    overhead = runtime_overhead(read_checkpoint(path), ConvertOptions(fit=fit, context=context)).total
    assert report.file_bytes <= fit - overhead
    rss, err = peak_rss(["generate", str(out), prompt_of(out, context - NEW_TOKENS), "-n", str(NEW_TOKENS)],
                        _env(True))
    assert "prefill:" in err
    return report.file_bytes, rss


def test_fit_keeps_measured_peak_rss_within_size_on_a_tiny_model(tmp_path, error_cache):
    path = fixtures.ensure("tiny-llama")  # its 32k-vocabulary embedding and lm_head are most of the file
    overhead = runtime_overhead(read_checkpoint(path), ConvertOptions(fit=1, context=256)).total
    files = []
    warm_kernels(tmp_path)
    for extra in (4 * MiB, 7 * MiB, 13 * MiB):  # the file's share of SIZE: from 3-bit to fp16 embeddings
        file_bytes, rss = fit_and_measure(path, tmp_path, overhead + extra, 256, error_cache)
        assert rss <= overhead + extra, (extra, rss)
        files.append(file_bytes)
    assert files[0] < files[1] < files[2]


@pytest.mark.slow
def test_fit_keeps_measured_peak_rss_within_size_on_smollm2(tmp_path, smollm2_cache):
    path = fixtures.ensure("smollm2")
    overhead = runtime_overhead(read_checkpoint(path), ConvertOptions(fit=1, context=2048)).total  # ~190 MiB
    warm_kernels(tmp_path)
    files = []
    for extra in (64 * MiB, 90 * MiB, 120 * MiB):  # the file's share of SIZE: ~3.5 to ~5 bits per weight
        fit = overhead + extra
        # default calibration; wls rounding and affine configs: the bytes and RSS do not depend on the rounding,
        # and auto's gptq and shared codebooks (the 64 MiB file is ~3.6 bpw) would cost minutes
        file_bytes, rss = fit_and_measure(path, tmp_path, fit, 2048, smollm2_cache, dict(quantizer="wls", configs="all"))
        print(f"--fit {fit / MiB:.0f} MiB --context 2048: file {file_bytes / MiB:.1f} MiB, peak RSS {rss / MiB:.1f} MiB")
        assert rss <= fit, (fit, file_bytes, rss)
        files.append(file_bytes)
    assert files[0] < files[1] < files[2]


def test_provenance_records_the_fit_budget(tmp_path, error_cache):
    path = fixtures.ensure("tiny-qwen2")
    overhead = runtime_overhead(read_checkpoint(path), ConvertOptions(fit=1, context=128, batch=2)).total
    convert(path, tmp_path / "f.mxq", fit=overhead + 6 * MiB, context=128, batch=2, cache_dir=error_cache, **FAST)
    with MxqFile.open(tmp_path / "f.mxq") as f:
        budget = f.quantization["budget"]
        assert budget == {"fit_bytes": overhead + 6 * MiB, "context": 128, "batch": 2, "file_bytes": 6 * MiB}
        assert f.file_nbytes <= 6 * MiB
    with pytest.raises(ConversionError, match="the runtime itself needs"):
        convert(path, tmp_path / "g.mxq", fit=overhead, context=128, batch=2, cache_dir=error_cache, **FAST)


def test_size_loop_converges_when_the_layout_grows_with_the_plan():
    """The file's non-tensor bytes (its JSON) grow with the plan: the next solve must spend less than the
    plan that overshot, not merely less than the last budget (which could leave it stuck on that plan)."""
    from types import SimpleNamespace

    from mxq.converter.candidates import parse_candidates
    from mxq.converter.pipeline import _solve
    from mxq.format_spec import aligned_nbytes

    candidates = parse_candidates("b2g32,b3g32,b4g32,b8g32")
    names = [f"m{i}" for i in range(6)]
    shape = (64, 96)
    checkpoint = SimpleNamespace(tensors={n: SimpleNamespace(shape=shape) for n in names})
    errors = np.array([[8.0, 4.0, 2.0, 0.1]] * len(names)) * np.arange(1, 7)[:, None]
    table = SimpleNamespace(names=names, candidates=candidates, weighted=errors, unit=lambda i: (0, ()))  # whole matrices
    costs = np.array([aligned_nbytes(shape, c.storage(shape), 64) for c in candidates])

    def make_writer(choice):  # 1000 bytes of header, +40 per matrix above the cheapest config
        return SimpleNamespace(file_nbytes=1000 + int(costs[choice].sum()) + 40 * int((choice > 0).sum()))

    for size in range(1000 + 6 * int(costs[0]), 1000 + 6 * int(costs[-1]) + 400, 97):
        choice = _solve(checkpoint, [table], ConvertOptions(size=size), make_writer)
        assert make_writer(choice).file_nbytes <= size
