"""Shared test helpers: random stored tensors and small .mxq files written through the writer."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mxq.format_spec import (MINOR_VERSION, MxqWriter, StorageConfig, TensorPlan, blob_specs, build_csr, encode_meta,
                              pack_codes)
from mxq.format_spec.layout import CODEBOOK_ROLE, file_codebooks, leaves, vq_dims
from mxq.format_spec.trellis import pack_windows

REPO = Path(__file__).resolve().parents[1]

# Tests never read or write the user's ~/.cache/mxq (errors, calibration statistics, compiled kernels):
# they get their own cache, kept between runs so compiled kernels are reused ($MXQ_TEST_CACHE to move it).
# Fixture checkpoints are the exception: tools/fixtures.py builds them once into $MXQ_FIXTURE_CACHE.
TEST_CACHE = Path(os.environ.get("MXQ_TEST_CACHE") or Path(tempfile.gettempdir()) / f"mxq-test-cache-{os.getuid()}")
os.environ["MXQ_CACHE"] = str(TEST_CACHE)
# the kernels' ~16-bit rounding of activations, whatever this CPU's default (cpu_weights.DEFAULT_ACTIVATIONS: 8 bits
# with AVX2 or VNNI): the parity tests' tolerances are ~16-bit ones; tests set 8 where they check it
os.environ["MXQ_ACTIVATIONS"] = "16"
# `python -m pytest` puts the working directory (the repository root) first on sys.path, which makes mxq's own
# folders importable as top-level packages: `kernels/` then shadows Hugging Face's `kernels` distribution,
# which transformers (a dependency of the tests, ≥ 5.25) imports. mxq itself is imported as `mxq` through its
# installed distribution, so the root is taken off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(REPO / "tools"))  # tools/ scripts (fixtures) are importable as plain modules


def hf_greedy(hf, prompt, n):
    """transformers' greedy tokens (n of them) after `prompt`, one at a time through its KV cache."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def random_affine_blobs(rng, shape, config: StorageConfig) -> dict:
    """Valid blobs for an affine tensor: random codes (padding codes 0), plausible scales/zeros."""
    out_features, in_features = shape
    n_groups = -(-in_features // config.group_size)
    codes = rng.integers(0, 1 << config.bits, size=(out_features, n_groups * config.group_size))
    codes[:, in_features:] = 0
    scales = rng.uniform(0.001, 0.05, size=(out_features, n_groups)).astype(np.float32)
    zeros = rng.uniform(-1, (1 << config.bits) + 1, size=(out_features, n_groups)).astype(np.float32)
    scale_codes, scale_meta = encode_meta(scales, config.meta_bits)
    zero_codes, zero_meta = encode_meta(zeros, config.meta_bits)
    blobs = {"qweight": pack_codes(codes, config.bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
             "zero_codes": zero_codes, "zero_meta": zero_meta}
    if config.outliers:
        flat = rng.choice(out_features * in_features, size=config.outliers, replace=False)
        blobs.update(build_csr(shape, flat // in_features, flat % in_features,
                               rng.standard_normal(config.outliers).astype(np.float32)))
    return blobs


def random_lut_blobs(rng, shape, config: StorageConfig) -> dict:
    """Valid blobs for a lut tensor: random codes (padding codes 0), sorted random fp16 codebooks."""
    out_features, in_features = shape
    n_packs = -(-in_features // 32)
    codes = rng.integers(0, 1 << config.bits, size=(out_features, n_packs * 32))
    codes[:, in_features:] = 0
    n_codebooks = -(-out_features // config.codebook_rows)
    codebook = np.sort(rng.standard_normal((n_codebooks, 1 << config.bits)).astype(np.float16) * np.float16(0.05), 1)
    blobs = {"qweight": pack_codes(codes, config.bits), "codebook": codebook}
    if config.outliers:
        flat = rng.choice(out_features * in_features, size=config.outliers, replace=False)
        blobs.update(build_csr(shape, flat // in_features, flat % in_features,
                               rng.standard_normal(config.outliers).astype(np.float32)))
    return blobs


def random_vq_blobs(rng, shape, config: StorageConfig, minor: int = MINOR_VERSION) -> dict:
    """Valid blobs for a vq tensor (in-memory form: scale codes uint8 (out, G)): random indices (padding
    indices 0; rows padded as format 1.`minor` pads them, layout.vq_dims), a random fp16 codebook, signed scales,
    outliers as for lut."""
    out_features, in_features = shape
    n_vectors = -(-in_features // config.dim)
    n_groups = -(-in_features // config.group_size)
    index = rng.integers(0, 1 << config.index_bits, size=(out_features, vq_dims(shape, config, minor)[2]))
    index[:, n_vectors:] = 0
    codebook = shared_codebook(config) if config.shared else \
        (rng.standard_normal((1 << config.index_bits, config.dim)) * 1.5).astype(np.float16)
    scale_codes, scale_meta = encode_meta(rng.normal(0.0, 0.02, (out_features, n_groups)), config.meta_bits)
    blobs = {"qweight": pack_codes(index, config.index_bits), "codebook": codebook, "scale_codes": scale_codes,
             "scale_meta": scale_meta}
    if config.outliers:
        flat = rng.choice(out_features * in_features, size=config.outliers, replace=False)
        blobs.update(build_csr(shape, flat // in_features, flat % in_features,
                               rng.standard_normal(config.outliers).astype(np.float32)))
    return blobs


def random_walks(rng, shape, bits: int) -> np.ndarray:
    """(out, in) int64 windows of random walks through the trellis of `bits` bits per weight (SPEC.md §13)."""
    out_features, in_features = shape
    windows = np.empty(shape, np.int64)
    windows[:, 0] = rng.integers(0, 4096, out_features)
    heads = rng.integers(0, 1 << bits, shape) << (12 - bits)
    for c in range(1, in_features):
        windows[:, c] = (windows[:, c - 1] >> bits) | heads[:, c]
    return windows


def random_trellis_blobs(rng, shape, config: StorageConfig) -> dict:
    """Valid blobs for a trellis tensor (in-memory form: scale codes uint8 (out, G)): random walks, the file's
    table for its bits (trellis_table) as its `codebook` blob, positive scales."""
    out_features, in_features = shape
    n_groups = -(-in_features // config.group_size)
    scale_codes, scale_meta = encode_meta(rng.uniform(0.005, 0.03, (out_features, n_groups)), config.meta_bits)
    return {"qweight": pack_windows(random_walks(rng, shape, config.bits), config.bits),
            "codebook": trellis_table(config.bits), "scale_codes": scale_codes, "scale_meta": scale_meta}


def trellis_table(bits: int) -> np.ndarray:
    """The random fp16 table (4096, 1) every test file uses for trellis tensors of `bits` bits per weight."""
    return np.random.default_rng(7000 + bits).standard_normal((4096, 1)).astype(np.float16)


def shared_codebook(config: StorageConfig) -> np.ndarray:
    """The random fp16 codebook every test file uses as its shared one for config's (bits, dim): one per (bits,
    dim), the same in every tensor (what the reader hands each shared tensor as its `codebook` blob)."""
    rng = np.random.default_rng(1000 * config.bits + config.dim)
    return (rng.standard_normal((1 << config.index_bits, config.dim)) * 1.5).astype(np.float16)


def file_plans_and_blobs(plans, blobs_of):
    """The writer's view of test tensors: `plans` [TensorPlan] plus a codebook tensor (SPEC §12.4, §13) for each
    file codebook they use (shared vq codebooks, trellis tables), and {name: blobs to write}: blobs_of(name)
    without those `codebook` blobs (which the reader puts back)."""
    needed, stored = {}, {}
    for plan in plans:
        blobs = dict(blobs_of(plan.name))
        for prefix, _, part in leaves(plan.shape, plan.config):
            if (name_shape := file_codebooks(part)):
                ((name, _),) = name_shape.items()
                needed[name] = blobs.pop(prefix + "codebook")
        stored[plan.name] = blobs
    books = [TensorPlan(name, book.shape, StorageConfig.fp16(), CODEBOOK_ROLE) for name, book in sorted(needed.items())]
    stored.update({name: {"data": book} for name, book in needed.items()})
    return plans + books, stored


def random_blobs(rng, shape, config: StorageConfig) -> dict:
    if config.scheme == "fp16":
        return {"data": rng.standard_normal(shape).astype(np.float16)}
    make = {"lut": random_lut_blobs, "vq": random_vq_blobs, "trellis": random_trellis_blobs}.get(config.scheme,
                                                                                               random_affine_blobs)
    return make(rng, shape, config)


def write_random_file(path, tensors, seed=0, tokenizer_data=b"tokenizer bytes", **writer_options):
    """Write `tensors` [(name, shape, config)] with random content; returns {name: blobs}."""
    rng = np.random.default_rng(seed)
    plans = [TensorPlan(name, shape, config, "linear" if config.scheme != "fp16" else "norm")
             for name, shape, config in tensors]
    written = {plan.name: random_blobs(rng, plan.shape, plan.config) for plan in plans}
    plans, stored = file_plans_and_blobs(plans, written.get)
    with MxqWriter(path, model={"architecture": "llama"}, tokenizer={"kind": "sentencepiece"},
                   tokenizer_data=tokenizer_data, tensors=plans, **writer_options) as writer:
        for plan in plans:
            writer.write(plan.name, stored[plan.name])
    return written


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two converted tiny models that exercise every weight path of a backend (the CPU kernels and the
    CUDA backend are both tested on them): tiny-llama (2/3/4-bit matrices, fp16 embedding and untied
    fp16 lm_head) and tiny-qwen2 (q/k/v biases, 4/5/6-bit, a tied 8-bit embedding that is also the
    lm_head: the quantized-embedding gather and an affine lm_head GEMV); every affine config allowed,
    0.5% outliers, group sizes 32 and 64 picked by the allocator. RTN: what a backend sees is the same
    stored format whatever chose the codes, and RTN measures the candidates in ~1 s."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert

    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for name, bpw, quantize_embeddings in (("tiny-llama", 3.5, None), ("tiny-qwen2", 5.5, 8)):
        paths[name] = root / f"{name}.mxq"
        convert(fixtures.ensure(name), paths[name], bpw=bpw, configs="all", outliers=0.5, quantizer="rtn",
                quantize_embeddings=quantize_embeddings, cache_dir=None)
    return paths


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One error and calibration cache (cache_dir) for the session's SmolLM2 conversions with the default
    calibration (test_convert_smollm2's budgets, test_budget's --fit): calibrated and measured once."""
    return str(tmp_path_factory.mktemp("smollm2-cache"))


@pytest.fixture
def small_file(tmp_path):
    """A small valid file with affine (with and without outliers) and fp16 tensors."""
    path = tmp_path / "small.mxq"
    tensors = [("a", (5, 70), StorageConfig.affine(3, 32, 4)),
               ("b", (3, 128), StorageConfig.affine(4, 64)),
               ("n", (7,), StorageConfig.fp16())]
    blobs = write_random_file(path, tensors)
    return path, tensors, blobs


# ---- subprocesses started early ---------------------------------------------------------------------------------
# A few slow tests wait on a single-threaded compile in a subprocess (test_cpu_kernels: Numba's JIT kernels into the
# test cache, the integer-dot lowerings this CPU does not pick by default). Marked @pytest.mark.early(key, argv,
# env), such a subprocess starts once the tests are collected, at the lowest CPU priority, so it runs on what CPU
# the tests before it leave idle (the second core of a 2-core machine during the first test's kernel build, a
# conversion's single-threaded stages); the test then only waits for it (early_result). Nothing else changes:
# the same command, environment and checks as when the test ran it itself.
EARLY: dict = {}  # key → subprocess.Popen
EARLY_RESULTS: dict = {}  # key → its subprocess.CompletedProcess, once waited for


def early_start(key: str, argv: list, env: dict) -> subprocess.Popen:
    """Start argv (niced) under `key`, once."""
    if key not in EARLY:
        EARLY[key] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      preexec_fn=lambda: os.nice(19))
    return EARLY[key]


def early_result(key: str, argv: list, env: dict) -> subprocess.CompletedProcess:
    """What `argv` printed and returned: the run started at collection, or one started now."""
    if key not in EARLY_RESULTS:
        process = early_start(key, argv, env)
        stdout, stderr = process.communicate()
        EARLY_RESULTS[key] = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    return EARLY_RESULTS[key]


def pytest_collection_finish(session):
    for item in session.items:  # the selected tests, after -m and -k
        for marker in item.iter_markers("early"):
            early_start(*marker.args)


def pytest_sessionfinish(session):
    for process in EARLY.values():  # not waited for (the test deselected by -x, or failed before)
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="session")
def trellis_llama(tmp_path_factory):
    """tiny-llama converted with trellis candidates (`b4g64,t4g64,t2g64`, wls, 4.6 bpw: the two tables, 8 KiB each,
    fit the budget), made once for the model-level trellis tests of test_cuda_backend.py, test_cpu_layers.py,
    test_cpu_trellis.py and test_trellis.py. The allocator picks trellis for the decoder linears (fp16 embedding and
    lm_head); the file must hold trellis matrices of both tables, or every test using it would test nothing."""
    fixtures = pytest.importorskip("fixtures")
    from mxq.converter import convert

    path = tmp_path_factory.mktemp("trellis-llama") / "t.mxq"
    convert(fixtures.ensure("tiny-llama"), path, bpw=4.6, configs="b4g64,t4g64,t2g64", quantizer="wls",
            objective="frobenius", cache_dir=None)
    from mxq.format_spec import MxqFile

    with MxqFile.open(path) as f:
        labels = {e.config.label for e in f.tensors.values() if e.config.scheme == "trellis"}
    assert {"t2g64", "t4g64"} <= labels, labels
    return path
