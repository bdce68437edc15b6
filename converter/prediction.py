"""A file's loss increase: predicted from the error table (Fisher), measured with the runtime.

    predicted   Σ F·ΔW² ≈ 2 × the loss increase summed over the calibration's scored tokens
                (converter/calibrate.py: F sums squared gradients of each chunk's summed loss), so the
                mean increase per token is  Σ_i weighted[i, choice_i] / (2 · scored tokens).
    measured    the runtime (CPU, NumPy) scores held-out calibration text, the tokens after those the
                calibration used, in the calibration's own CHUNK_TOKENS chunks; the fp model's loss on
                the same tokens comes from an all-fp16 file of the checkpoint (cached per checkpoint and
                tokens). Never the evaluation text.

The functions below take the error table's arrays (costs, objective) rather than the table itself, so
that any table with one row per stored tensor can use them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .allocate import allocate
from .errors import ConversionError
from .options import AUTO, AUTO_CONFIGS, measured_with

HELDOUT_TOKENS = 8192  # held-out tokens scored at most (beyond the calibration's own)
DEQUANTIZED_CAP_BYTES = 2 << 30  # measure with float32 weights cached when they take at most this much RAM
# MILP optimality gap for predictions (sweep budgets, the --max-loss search): 1e-4 of the objective is far below
# the error table's sampling error (±0.35% on SmolLM2) and solves 4-10× faster than allocate's default 1e-6
# on hard budgets (SmolLM2 at 4.5 bpw: 7 s instead of 27 s on a loaded machine). A file's own solve keeps 1e-6.
PREDICTION_GAP = 1e-4
MIN_HELDOUT_TOKENS = 1024  # fewer than this and the measured loss is too noisy to steer by


@dataclass
class Prepared:
    """What every budget of one checkpoint shares: the measured error table and its calibration."""
    hf_dir: str
    options: object  # ConvertOptions used to build it (cache_dir resolved)
    checkpoint: object
    checkpoint_hash: str
    table: object  # measure.ErrorTable
    calibration: object  # calibrate.Calibration
    text: str  # the calibration text
    seconds: dict
    notices: list
    keepalive: object = None  # the temporary cache directory under --no-cache (every convert reuses it)


def prepare(hf_dir, options, progress=None) -> Prepared:
    """Read, calibrate and measure as `mxq convert` does (both cached), without solving or writing."""
    from .measure import ErrorCache, default_cache_dir, measure
    from .pipeline import _calibrated, _candidates, _importance_id, _use_cores
    from .checkpoint import read_checkpoint
    from .shared_codebooks import shared_pairs

    if options.objective != "fisher":
        raise ConversionError(f"loss prediction needs --objective fisher (got {options.objective!r}): "
                              "its errors estimate the loss increase")
    _use_cores(options.jobs)
    keepalive = None
    if options.cache_dir is None:  # no cache: one temporary cache for this run, so no budget calibrates again
        keepalive = tempfile.TemporaryDirectory(prefix="mxq-cache-")
        options = replace(options, cache_dir=keepalive.name)
    if options.configs == AUTO:  # loss prediction takes no shared codebooks: auto's preset above its threshold
        options = replace(options, configs=AUTO_CONFIGS[0])
    seconds, started = {}, time.perf_counter()
    checkpoint = read_checkpoint(hf_dir)
    candidates = _candidates(options)
    if all(c.scheme == "fp16" for c in candidates):
        raise ConversionError(f"--configs {options.configs!r} has no quantized config: nothing to predict")
    if shared_pairs(candidates):  # their codebooks' (tables') reserved bytes move every budget
        raise ConversionError(f"--configs {options.configs!r}: loss prediction (--max-loss, mxq sweep) does not take "
                              "shared-codebook candidates (labels ending in s, the vqs presets; trellis ones)")
    cache_dir = default_cache_dir() if options.cache_dir == "default" else options.cache_dir
    checkpoint_hash = checkpoint.content_hash(cache_dir)  # remembered in the cache: each round reads it once
    seconds["read"] = time.perf_counter() - started
    stage = time.perf_counter()
    checkpoint, checkpoint_hash, calibration, _ = _calibrated(checkpoint, checkpoint_hash, options, cache_dir, progress)
    seconds["calibrate"] = time.perf_counter() - stage
    stage = time.perf_counter()
    importance_id = _importance_id(options, calibration)
    cache = ErrorCache(cache_dir and Path(cache_dir) / "errors", checkpoint_hash)
    table = measure(checkpoint, candidates, measured_with(options.quantizer), cache, progress,
                    calibration.fisher.__getitem__, importance_id, options.outlier_mode, options.measure_every,
                    row_blocks=options.row_blocks)
    seconds["measure"] = time.perf_counter() - stage
    return Prepared(str(hf_dir), replace(options, cache_dir=cache_dir), checkpoint, checkpoint_hash, table,
                    calibration, calibration_text(options), seconds, list(cache.notices), keepalive)


def calibration_text(options) -> str:
    from .calibrate import default_text
    from .pipeline import _calibration_text

    return _calibration_text(options) if options.calib else default_text()


def scored_tokens(calibration) -> int:
    """Tokens whose loss the calibration summed: every chunk's tokens but its last."""
    from .calibrate import CHUNK_TOKENS

    return calibration.tokens - calibration.tokens // CHUNK_TOKENS


def predicted_increase(weighted_total: float, calibration) -> float:
    """Mean loss increase per token (nats) that Σ F·ΔW² = weighted_total predicts."""
    return weighted_total / (2.0 * scored_tokens(calibration))


def smallest_budget(costs: np.ndarray, errors: np.ndarray, limit: float, resolution: int) -> tuple[int, np.ndarray]:
    """The smallest budget (bytes, to within `resolution`) whose optimal allocation has Σ errors ≤ limit,
    and that allocation, by bisection over MILP solves (the optimum only falls as the budget grows).
    costs, errors: (N, C). Raises ConversionError when even the largest configs exceed the limit."""
    rows = np.arange(costs.shape[0])
    lo, hi = int(costs.min(axis=1).sum()), int(costs.max(axis=1).sum())
    best = allocate(costs, errors, hi, rel_gap=PREDICTION_GAP)
    if errors[rows, best].sum() > limit:
        raise ConversionError(f"no allocation is predicted to be that close: the largest configs predict "
                              f"{errors[rows, best].sum() / limit:.2f}× the allowed loss increase")
    cheapest = allocate(costs, errors, lo, rel_gap=PREDICTION_GAP)
    if errors[rows, cheapest].sum() <= limit:
        return lo, cheapest
    while hi - lo > resolution:  # invariant: lo misses the limit, hi meets it (with allocation `best`)
        mid = (lo + hi) // 2
        choice = allocate(costs, errors, mid, rel_gap=PREDICTION_GAP)
        if errors[rows, choice].sum() <= limit:
            hi, best = mid, choice
        else:
            lo = mid
    return hi, best


# ---- held-out text and measured loss --------------------------------------------------------------

def heldout_ids(prepared: Prepared) -> np.ndarray:
    """Token ids of the calibration text's chunks after those calibration used (calibrate.text_chunks: each
    starts like a sequence of the model), up to HELDOUT_TOKENS, concatenated: scored in chunks of
    CHUNK_TOKENS, each chunk is one such sequence. (n,) int64."""
    from .calibrate import CHUNK_TOKENS, text_chunks

    chunks = text_chunks(prepared.checkpoint, prepared.text)
    used = prepared.calibration.tokens // CHUNK_TOKENS
    left = chunks[used:used + HELDOUT_TOKENS // CHUNK_TOKENS]
    if left.numel() < MIN_HELDOUT_TOKENS:
        raise ConversionError(
            f"the calibration text gives {len(chunks)} chunks of {CHUNK_TOKENS} tokens and calibration uses {used}: "
            f"{left.numel():,} tokens are left to measure the loss on, at least {MIN_HELDOUT_TOKENS:,} are needed "
            f"(give a longer --calib text or fewer --calib-tokens)")
    return left.reshape(-1).numpy()


@dataclass
class Evaluation:
    """What a file's loss is measured on: token ids (held-out calibration text, tokenized like calibration)
    or a text tokenized by the file's own tokenizer as `mxq eval` does; ctx-token chunks, the first max_chunks."""
    name: str
    ids: np.ndarray | None
    text: str | None
    ctx: int
    max_chunks: int | None = None

    def key(self) -> str:
        data = self.ids.tobytes() if self.ids is not None else self.text.encode()
        return f"{hashlib.sha256(data).hexdigest()}/{self.ids is not None}/{self.ctx}/{self.max_chunks}"


def heldout(prepared: Prepared) -> Evaluation:
    from .calibrate import CHUNK_TOKENS

    ids = heldout_ids(prepared)
    return Evaluation(f"held-out calibration text ({len(ids):,} tokens)", ids, None, CHUNK_TOKENS)


def file_loss(path, evaluation: Evaluation) -> dict:
    """The runtime's (CPU) mean next-token loss of the .mxq file at `path` on `evaluation`:
    perplexity()'s report (nll, ppl, chunks, scored_tokens, chunk_nll, chunk_tokens, seconds)."""
    import mxq
    from ..format_spec import MxqFile
    from ..runtime.perplexity import perplexity

    with MxqFile.open(path) as f:
        dense_bytes = 4 * sum(entry.numel for entry in f.tensors.values())
    # float32 weights made once are faster over many chunks than dequantizing per chunk; lean beyond the cap
    with mxq.load(path, verify=False, cache_dequantized=dense_bytes <= DEQUANTIZED_CAP_BYTES) as model:
        ids = evaluation.ids if evaluation.ids is not None else model.tokenizer.encode(evaluation.text)
        return perplexity(model, ids, ctx=min(evaluation.ctx, model.context_length),
                          max_chunks=evaluation.max_chunks, progress=False)


def _usable_report(cached) -> bool:
    """A cached file_loss() report with what paired_difference reads: the mean and the per-chunk losses."""
    losses, counts = cached.get("chunk_nll"), cached.get("chunk_tokens")
    return (isinstance(cached.get("nll"), float) and isinstance(losses, list) and isinstance(counts, list)
            and len(losses) == len(counts) > 0 and all(isinstance(x, float) for x in losses)
            and all(isinstance(x, int) for x in counts))


def fp_reference(prepared: Prepared, evaluation: Evaluation, workdir) -> dict:
    """file_loss() of the all-fp16 file of the checkpoint (the fp model as the runtime runs it), cached per
    checkpoint and evaluation under the cache's heldout/ folder."""
    from .pipeline import convert

    cache_dir = prepared.options.cache_dir
    key = hashlib.sha256(f"{prepared.checkpoint_hash}/{evaluation.key()}/v2".encode()).hexdigest()[:32]  # v2: chunk_nll
    path = Path(cache_dir) / "heldout" / f"{key}.json" if cache_dir else None
    if path is not None and path.exists():
        try:
            cached = json.loads(path.read_text())
            if _usable_report(cached):
                return cached
        except (OSError, ValueError, AttributeError):
            pass  # damaged: measured again below
    fp_options = replace(prepared.options, bpw=16.0, size=None, max_loss=None, configs="fp16",
                         objective="frobenius", outliers=0.0, quantize_embeddings=None)
    fp_file = Path(workdir) / "fp16.mxq"
    convert(prepared.hf_dir, fp_file, fp_options)
    report = file_loss(fp_file, evaluation)
    fp_file.unlink()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(report))
        os.replace(temporary, path)
    return report


def convert_at(prepared: Prepared, budget: int, out_path, progress=None):
    """pipeline.convert at a decoder-linear budget of `budget` bytes (the bpw that floors to it)."""
    from .pipeline import convert

    numel = int(prepared.table.numel.sum())
    options = replace(prepared.options, bpw=(budget + 0.5) * 8 / numel, size=None, max_loss=None)
    return convert(prepared.hf_dir, out_path, options, progress=progress)


def file_choice(prepared: Prepared, path) -> np.ndarray:
    """The candidate index of every table row (a matrix, or one of its row blocks) as stored in the .mxq
    file at `path` (N,)."""
    from ..format_spec import MxqFile

    table = prepared.table
    with MxqFile.open(path) as f:
        stored = {name: f.tensors[name].config for name in table.names}
    choice = []
    for i, name in enumerate(table.names):
        shape, config = prepared.checkpoint.tensors[name].shape, stored[name]
        b, counts = table.unit(i)
        if len(counts) > 1:  # a row block: its own config over its own rows
            if config.scheme != "rows" or config.row_counts != counts:
                raise ConversionError(f"{path}: tensor '{name}' is stored as {config.label}, not in row blocks "
                                      f"of {counts}")
            shape, config = (counts[b], shape[1]), config.blocks[b][1]
        matches = [c for c, candidate in enumerate(table.candidates) if candidate.storage(shape) == config]
        if not matches:
            raise ConversionError(f"{path}: tensor '{name}' is stored as {stored[name].label}, not a candidate")
        choice.append(matches[0])
    return np.array(choice)


def workdir_for(out_path) -> tempfile.TemporaryDirectory:
    """A temporary directory next to `out_path` (same file system: the chosen file is renamed into place)."""
    return tempfile.TemporaryDirectory(prefix=".mxq-", dir=Path(out_path).resolve().parent)
