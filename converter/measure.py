"""The error matrix: for every decoder linear × candidate config, the error of what the file would
store (‖W − Ŵ‖²_F and the importance-weighted Σ F·ΔW²), and its exact cost in bytes (format_spec's
cost model).

Errors are estimated from a row sample: rows are quantized independently (groups run along rows),
so quantizing an evenly spaced 1/k of a matrix's rows estimates its error at 1/k of the work. The
sample's errors are scaled to the matrix by a per-row proxy known for every row (Σ over groups of
span² × importance: a ratio estimate, far tighter than k × the sample's sum when row importances
differ a lot, as Fisher diagonals do); every config of a matrix sees the same rows, so their
differences are measured more precisely still. Each estimate carries its standard error (rows as a
simple random sample). Configs
with outliers (chosen over the whole matrix) and fp16 are measured on all rows. The write stage
quantizes the chosen configs in full, and quantize() reports the exact errors of those bytes.

With --row-blocks K (row_blocks.py) the table's rows are allocation units: a matrix's row blocks (rows
sorted by importance, cut into K), each quantized as its own (count, in) matrix — the bytes the file
will hold — and, when sampled, estimated from an evenly spaced sample of the block's rows in importance
order (at least MIN_BLOCK_SAMPLE_ROWS) against the same per-row proxies, with its own standard error.

Errors are cached on disk per checkpoint content hash, keyed by quantizer, importance, outlier mode,
config label and sample, so converting the same model at another budget (or with more candidates)
measures only what is new.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..paths import cache_root
from .options import SAMPLE_EVERY
from .quantize import _groups, quantize
from .row_blocks import ORDER_VERSION, blocks_wanted, split, unit_costs
from .shared_codebooks import digest
from .trellis import VERSION as TRELLIS_VERSION
from ..format_spec.layout import file_codebook
from ..format_spec.vq import GRID_DIM

CACHE_VERSION = 6  # bump when quantizer or estimator math changes (6: 6-bit metadata for b <= 3)
MIN_SAMPLE_ROWS = 64  # a sample (1 row in SAMPLE_EVERY) has at least this many rows (all of smaller matrices)
MIN_BLOCK_SAMPLE_ROWS = 16  # a row block's sample has at least this many rows (all of smaller blocks)


@dataclass
class ErrorTable:
    """One row per allocation unit: a whole matrix, or one row block of a split matrix (row_blocks.py;
    a split matrix's blocks are consecutive rows, block 0 first)."""
    names: list  # (N,) the matrix of each unit (a split matrix's name repeats), file order
    candidates: list  # Candidate objects
    error_sq: np.ndarray  # (N, C) float64: ‖W − Ŵ‖²_F
    weighted: np.ndarray  # (N, C) float64: Σ importance·(W − Ŵ)² (= error_sq without importance)
    weighted_se: np.ndarray  # (N, C) float64: standard error of `weighted` (0 where measured on all rows)
    costs: np.ndarray  # (N, C) int64 bytes (block 0 of a split matrix includes its row_order)
    numel: np.ndarray  # (N,) weights per unit
    norms_sq: np.ndarray  # (N,) ‖W‖²_F of each matrix, on its first unit (0 on the others): sums are exact
    blocks: list = field(default_factory=list)  # (N,) (block index, row counts of the matrix's blocks); [] = whole

    def unit(self, i: int) -> tuple[int, tuple]:
        """(block index, row counts) of unit i; (0, ()) for a whole matrix."""
        return self.blocks[i] if self.blocks else (0, ())


def default_cache_dir() -> Path:
    """Root of mxq's caches (errors/, calibration/): $MXQ_CACHE or ~/.cache/mxq."""
    return cache_root()


# A cached number above this is damage: a float32 weight's squared error times a float32 Fisher is below
# 1e117, and 2^40 weights below 1e130 — while sums of damaged values near float64's limit overflow to inf.
ERROR_LIMIT = 1e150


def _is_value(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_norm(v) for v in value)


def _is_norm(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= ERROR_LIMIT)


class ErrorCache:
    """One JSON file per checkpoint hash:
    {"v": 4, "errors": {"<quantizer>/<importance id>/<outlier mode>/<config>[/rows1in<k>]":
                        {name: [err_sq, weighted, weighted_se]}}, "norms": {name: ‖W‖²}}.
    Entries are validated on read: damaged ones are dropped (and measured again), with one notice.
    Writes go to a temporary file, fsynced, then renamed over the cache: never a half-written cache."""

    def __init__(self, directory: Path | None, checkpoint_hash: str):
        self.path = None if directory is None else Path(directory) / f"{checkpoint_hash}.json"
        self.data = {"v": CACHE_VERSION, "errors": {}, "norms": {}}
        self.notices: list[str] = []
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self):
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as error:
            self._notice(f"error cache {self.path} is unreadable ({type(error).__name__}); measuring again")
            return
        if not isinstance(loaded, dict) or loaded.get("v") != CACHE_VERSION:
            return  # another version's cache: silently replaced
        errors, norms = loaded.get("errors"), loaded.get("norms")
        if not isinstance(errors, dict) or not isinstance(norms, dict):
            self._notice(f"error cache {self.path} is damaged (no errors/norms tables); measuring again")
            return
        dropped = 0
        for key, entries in errors.items():
            if not isinstance(entries, dict):
                dropped += 1
                continue
            good = {name: value for name, value in entries.items() if _is_value(value)}
            dropped += len(entries) - len(good)
            self.data["errors"][key] = good
        good_norms = {name: value for name, value in norms.items() if _is_norm(value)}
        dropped += len(norms) - len(good_norms)
        self.data["norms"] = good_norms
        if dropped:
            self._notice(f"error cache {self.path}: {dropped} damaged entries dropped; measuring them again")

    def _notice(self, text: str):
        self.notices.append(text)
        print(f"notice: {text}", file=sys.stderr)

    def get(self, key: str, name: str):
        return self.data["errors"].get(key, {}).get(name)

    def put(self, key: str, name: str, value: list):
        self.data["errors"].setdefault(key, {})[name] = value

    def save(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def sample_rows(out_features: int, every: int, minimum: int = MIN_SAMPLE_ROWS) -> torch.Tensor | None:
    """Evenly spaced row indices, ceil(out/every) of them but at least `minimum`; None for all rows."""
    count = max(math.ceil(out_features / max(every, 1)), minimum)
    if every <= 1 or count >= out_features:
        return None
    return torch.arange(count, dtype=torch.int64) * out_features // count


def group_spread(weight: torch.Tensor, importance: torch.Tensor | None, group_size: int):
    """Per-row proxies of a config's error, for every row: (Σ_groups span²·Σ importance, Σ_groups span²·count)
    over groups of group_size (a group's rounding error is ≈ count·step²/12 and its step ∝ its span, for
    any bit width). Two passes over the matrix; the sample's errors are scaled by these (ratio estimate)."""
    groups, real = _groups(weight, group_size)  # (out, G, g), (1, G, g)
    big = torch.finfo(torch.float32).max
    low, high = torch.where(real, groups, big).amin(2), torch.where(real, groups, -big).amax(2)
    span_sq = (high - low).double() ** 2  # (out, G)
    count = real.sum(2).double()  # (1, G)
    weights = _groups(importance, group_size)[0].sum(2, dtype=torch.float64) if importance is not None else count
    return (span_sq * weights).sum(1).numpy(), (span_sq * count).sum(1).numpy()


def estimate(sample: np.ndarray, proxy: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Total over all rows from the sampled rows' errors (n,): a ratio estimate Σ_all proxy · Σ_s err / Σ_s proxy
    (the mean times the row count when the sample's proxy is 0), and its standard error."""
    count, n = proxy.size, sample.size
    if n >= count:
        return float(sample.sum()), 0.0
    sampled_proxy = float(proxy[rows].sum())
    if sampled_proxy > 0:
        ratio = float(sample.sum()) / sampled_proxy
        total, residual = ratio * float(proxy.sum()), sample - ratio * proxy[rows]
    else:
        total, residual = count * float(sample.mean()), sample - sample.mean()
    variance = float((residual ** 2).sum()) / (n - 1) if n > 1 else 0.0
    return total, count * math.sqrt(max(1.0 - n / count, 0.0) * variance / n)


def measure_matrix(checkpoint, quantizer: str, importance, outlier_mode: str, sample_every: int, job,
                   row_blocks: int = 1, codebooks: dict | None = None):
    """One matrix's missing entries. job: (name, [(cache key, candidate, row-sampled?)]) →
    (‖W‖²_F, {cache key: [[err_sq, weighted, weighted_se] of each unit]}): one unit, the matrix, or
    with row_blocks > 1 its row blocks (row_blocks.split), each quantized as its own matrix, its sample
    evenly spread over the block's rows in importance order. codebooks: the file's shared vq codebooks and
    trellis tables (quantize). A pure function of its arguments (the quantizer's kernels give the same bits for
    any thread count), so it may run on any machine."""
    name, entries = job
    weight = checkpoint.load(name)
    weights = importance(name) if importance is not None else None
    blocks = split(weight, weights, row_blocks) if row_blocks > 1 else None
    if blocks is None:
        parts = [(None, weight, weights, sample_rows(weight.shape[0], sample_every))]
    else:
        parts = []
        for b, count in enumerate(blocks.counts):
            rows = torch.from_numpy(blocks.rows(b))
            parts.append((rows.numpy(), weight[rows], weights[rows] if weights is not None else None,
                          sample_rows(count, sample_every, MIN_BLOCK_SAMPLE_ROWS)))
    spread = {}  # group size -> per-row error proxies of the whole matrix (weighted, plain)
    values = {}
    for key, candidate, sample in entries:
        if sample and candidate.group_size not in spread:
            spread[candidate.group_size] = group_spread(weight, weights, candidate.group_size)
        values[key] = []
        for rows, part, part_weights, subset in parts:
            proxies = None
            if sample and subset is not None:
                proxies = [p if rows is None else p[rows] for p in spread[candidate.group_size]]
            values[key].append(_error(part, part_weights, candidate, quantizer, outlier_mode,
                                      subset if sample else None, proxies, codebooks))
    return float(np.square(weight.numpy(), dtype=np.float64).sum()), values  # NumPy: the same bits for any thread count


def _error(weight, weights, candidate, quantizer, outlier_mode, rows, proxies, codebooks=None) -> list:
    """[err_sq, weighted, weighted_se] of `weight` (a matrix, or one row block) stored as `candidate`:
    exact (rows None), or estimated from the row sample `rows` with the per-row proxies (weighted, plain)."""
    result = quantize(weight, candidate.storage(weight.shape), quantizer, pack=False, importance=weights,
                      outlier_mode=outlier_mode, rows=rows, codebooks=codebooks)
    if rows is None:
        return [result.error_sq, result.weighted_error, 0.0]
    weighted, se = estimate(result.row_weighted.numpy(), proxies[0], rows.numpy())
    error_sq, _ = estimate(result.row_error_sq.numpy(), proxies[1], rows.numpy())
    return [error_sq, weighted, se]


def _map_here(function, jobs):
    """The default runner: jobs one after another in this process, yielding (index, result)."""
    return enumerate(map(function, jobs))


def measure(checkpoint, candidates, quantizer: str, cache: ErrorCache, progress=None, importance=None,
            importance_id: str = "none", outlier_mode: str = "magnitude",
            sample_every: int = SAMPLE_EVERY, tensors=None, runner=None, row_blocks: int = 1,
            codebooks: dict | None = None) -> ErrorTable:
    """importance: None or a function name -> (out, in) tensor weighing errors (see quantize).
    sample_every: measure 1 row in this many (1: every row, exact errors).
    tensors: the 2-D tensors (checkpoint TensorInfos) to measure; default: the decoder linears.
    runner(function, jobs) yields (index into jobs, function(job)) in any order: the per-matrix work
    (default: here, in order; converter/cluster.py runs it as cluster tasks).
    row_blocks: split each matrix into this many row blocks (row_blocks.py), each an allocation unit.
    codebooks: the file's shared vq codebooks and trellis tables (converter/shared_codebooks.py; their digest
    keys the errors of the candidates that use them)."""
    linears = checkpoint.linears if tensors is None else list(tensors)
    names = [t.name for t in linears]
    row_blocks = blocks_wanted(row_blocks, candidates)
    counts, costs = unit_costs(linears, candidates, row_blocks)
    units = [(i, b) for i, c in enumerate(counts) for b in range(len(c))]

    def entry(i, b):  # a unit's name in the cache: the order depends on weights, importance (in the key) and K
        return names[i] if len(counts[i]) < 2 else f"{names[i]}/rows{row_blocks}v{ORDER_VERSION}/{b}"

    numel = np.array([counts[i][b] * linears[i].shape[1] for i, b in units], dtype=np.int64)
    sampled = [c.scheme in ("affine", "vq", "trellis") and not c.outlier_percent and sample_every > 1
               for c in candidates]
    keys = [f"fp16/{importance_id}" if c.scheme == "fp16" else
            # trellis has one fit, whatever the quantizer, and no outliers: its errors are shared by every run
            (f"trellis-v{TRELLIS_VERSION}/{importance_id}" if c.scheme == "trellis" else
             f"{quantizer}/{importance_id}/{outlier_mode}") + f"/{c.label}" + (f"/rows1in{sample_every}" if s else "")
            + (f"/codebook-{digest(codebooks, c)}" if file_codebook(c) is not None else "")
            + ("/grid8" if c.scheme == "vq" and not c.shared and c.dim == GRID_DIM else "")  # (vq.kmeans_codebook)
            for c, s in zip(candidates, sampled)]
    missing = lambda i, k: any(cache.get(k, entry(i, b)) is None for b in range(len(counts[i])))  # noqa: E731
    todo = [i for i, name in enumerate(names) if name not in cache.data["norms"] or any(missing(i, k) for k in keys)]
    bar = progress(total=len(todo) * len(candidates), desc="measure", unit="quant") if progress and todo else None
    jobs = [(names[i], [(k, c, s) for k, c, s in zip(keys, candidates, sampled) if missing(i, k)]) for i in todo]
    work = partial(measure_matrix, checkpoint, quantizer, importance, outlier_mode, sample_every,
                   row_blocks=row_blocks, codebooks=codebooks)
    for count, (j, (norm_sq, values)) in enumerate((runner or _map_here)(work, jobs)):
        i = todo[j]
        cache.data["norms"][names[i]] = norm_sq
        for key, unit_values in values.items():
            for b, value in enumerate(unit_values):
                cache.put(key, entry(i, b), value)
        if bar:
            bar.update(len(candidates))
        if count % 16 == 15:
            cache.save()
    if bar:
        bar.close()
    cache.save()
    values = np.array([[cache.get(k, entry(i, b)) for k in keys] for i, b in units], dtype=np.float64).reshape(
        len(units), len(keys), 3)
    norms_sq = np.array([cache.data["norms"][names[i]] if b == 0 else 0.0 for i, b in units])
    blocks = [(b, tuple(counts[i])) for i, b in units] if row_blocks > 1 else []
    return ErrorTable([names[i] for i, _ in units], list(candidates), values[..., 0], values[..., 1], values[..., 2],
                      costs, numel, norms_sq, blocks)
