"""The runtime footprint model (runtime/footprint.py) against the measured peak RSS of `mxq generate`
(lean, CPU, a subprocess per run) on SmolLM2 converted data-free, for three contexts, with the
compiled kernels and with MXQ_KERNELS=numpy. Slow: a conversion (~1-2 min) and six generations.

    python tests/test_footprint.py [FILE]     prints the measured / predicted table
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mxq.format_spec import MxqFile
from mxq.runtime.backends import get_backend
from mxq.runtime.config import ModelConfig
from mxq.runtime.errors import ModelError
from mxq.runtime.footprint import MiB, file_footprint, footprint

REPO = Path(__file__).resolve().parents[1]
TEXT = Path("/work/shared/data/botchan.txt")
CONTEXTS = (64, 512, 2048)  # prompt + new tokens
NEW_TOKENS = 8
MARGIN, SLACK = 0.10, 48 * MiB  # the prediction may exceed the measurement by 10% + 48 MiB, never fall below it

SMALL = {"architecture": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": True}


def _env(kernels: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO.parent)}
    env.pop("MXQ_KERNELS", None)
    if not kernels:
        env["MXQ_KERNELS"] = "numpy"
    return env


def mxq(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mxq.cli", *args], capture_output=True, text=True, env=env)


# `mxq` with its own peak RSS (VmHWM of its process image) on the last line of stderr. Not
# getrusage(RUSAGE_CHILDREN): exec() folds the parent's high-water mark into the child's ru_maxrss.
MXQ_WITH_PEAK = ("import atexit, re, sys; from mxq.cli import main; atexit.register(lambda: sys.stderr.write("
                 "'\\npeak-rss-kb ' + re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1) + "
                 "'\\n')); sys.argv[0] = 'mxq'; main()")


def peak_rss(args, env) -> tuple[int, str]:
    """Run `mxq *args`; its peak RSS in bytes and its stderr."""
    done = subprocess.run([sys.executable, "-c", MXQ_WITH_PEAK, *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return int(re.search(r"peak-rss-kb (\d+)\n$", done.stderr).group(1)) * 1024, done.stderr


def prompt_of(file, tokens: int) -> str:
    """Text of about `tokens` tokens from the start of the calibration text."""
    from mxq.runtime.generate import load

    with load(file, verify=False) as model:
        ids = model.tokenizer.encode(TEXT.read_text(encoding="utf-8")[: tokens * 8])
        return model.tokenizer.decode(ids[:tokens])


def measure(file, context: int, kernels: bool) -> tuple[int, int, int]:
    """(positions used, measured peak RSS, predicted) of `mxq generate FILE PROMPT -n NEW_TOKENS`
    with a prompt of about context - NEW_TOKENS tokens."""
    prompt = prompt_of(file, context - NEW_TOKENS)
    rss, err = peak_rss(["generate", str(file), prompt, "-n", str(NEW_TOKENS)], _env(kernels))
    positions = int(re.search(r"prefill: (\d+) tokens", err).group(1)) + NEW_TOKENS
    with MxqFile.open(file) as f:
        predicted = file_footprint(f, positions, kernels=kernels).total
    return positions, rss, predicted


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    import fixtures

    out = tmp_path_factory.mktemp("footprint") / "smol.mxq"
    done = mxq("convert", str(fixtures.ensure("smollm2")), "-o", str(out), "--bpw", "4.25", "--objective",
               "frobenius", "--quantizer", "rtn", "--configs", "paper", env=_env(True))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
@pytest.mark.skipif(not TEXT.exists(), reason="needs the calibration text")
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "numpy"])
def test_prediction_bounds_measured_peak_rss(smol, kernels):
    if kernels:  # compile (or load) the kernels once so no measured run pays for the compiler
        peak_rss(["generate", str(smol), "Hi", "-n", "2"], _env(True))
    for context in CONTEXTS:
        positions, measured, predicted = measure(smol, context, kernels)
        print(f"context {positions}: measured {measured / MiB:.1f} MiB, predicted {predicted / MiB:.1f} MiB")
        assert measured <= predicted, (positions, measured, predicted)
        assert predicted <= measured * (1 + MARGIN) + SLACK, (positions, measured, predicted)


def test_terms_follow_the_runtime_allocations():
    c = ModelConfig.from_json(SMALL)
    small = footprint(c, 10_000, 100, tokenizer_bytes=1000, kernels=False, threads=1)
    big = footprint(c, 10_000, 200, batch=2, tokenizer_bytes=1000, kernels=True, threads=1)
    # float32 k and v per layer and position, as base.LayerCache allocates them
    assert small.items["kv_cache"] == 2 * 2 * 2 * 16 * 100 * 4
    assert big.items["kv_cache"] == 2 * 2 * small.items["kv_cache"]  # twice the positions, twice the batch
    assert big.items["activations"] > 2 * small.items["activations"]
    assert small.items["file"] == 10_000 and small.items["kernels"] == 0 < big.items["kernels"]
    assert small.total == sum(small.items.values())
    backend = get_backend("cpu", kernels=False)
    assert backend.new_cache(2, 2, 16, 100).nbytes == small.items["kv_cache"]  # what the runtime allocates
    backend.close()


def test_bad_requests_name_the_problem():
    c = ModelConfig.from_json(SMALL)
    with pytest.raises(ModelError, match="exceeds the model's context of 4096"):
        footprint(c, 1, 5000, tokenizer_bytes=0)
    with pytest.raises(ModelError, match="CPU runtime only"):
        footprint(c, 1, 10, device="cuda", tokenizer_bytes=0)
    with pytest.raises(ModelError, match="context and batch must be >= 1"):
        footprint(c, 1, 10, batch=0, tokenizer_bytes=0)


def test_inspect_shows_the_footprint(tmp_path):
    import json

    import fixtures
    from test_runtime_files import write_test_mxq

    path = write_test_mxq(fixtures.ensure("tiny-llama"), tmp_path / "tiny.mxq")
    shown = mxq("inspect", str(path), "--context", "100", "--batch", "2", "--json", env=_env(False))
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)["footprint"]
    with MxqFile.open(path) as f:
        expected = footprint(ModelConfig.from_json(f.model), f.file_nbytes, 100, 2, kernels=False,
                             tokenizer_bytes=f.tokenizer_nbytes)
    assert report["bytes"] == expected.items and report["total_bytes"] == expected.total
    assert report["bytes"]["file"] == path.stat().st_size
    table = mxq("inspect", str(path), "--context", "100", "--no-tensors", env=_env(False))
    assert "kv_cache" in table.stdout and "NumPy path" in table.stdout
    too_long = mxq("inspect", str(path), "--context", "10000000", env=_env(False))
    assert too_long.returncode == 1 and too_long.stderr.startswith("mxq: error: context 10000000 exceeds")


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(f"{'kernels':<8} {'positions':>9} {'measured MiB':>13} {'predicted MiB':>14} {'pred/meas':>10}")
    for use_kernels in (True, False):
        if use_kernels:
            peak_rss(["generate", str(path), "Hi", "-n", "2"], _env(True))  # compile the kernels first
        for ctx in CONTEXTS:
            n, m, p = measure(path, ctx, use_kernels)
            print(f"{'numba' if use_kernels else 'numpy':<8} {n:>9} {m / MiB:>13.1f} {p / MiB:>14.1f} {p / m:>10.3f}")
