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

Errors are cached on disk per checkpoint content hash, keyed by quantizer, importance, outlier mode,
config label and sample, so converting the same model at another budget (or with more candidates)
measures only what is new.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..format_spec import tensor_nbytes
from ..paths import cache_root
from .options import SAMPLE_EVERY
from .quantize import _groups, quantize

CACHE_VERSION = 5  # bump when quantizer or estimator math changes
MIN_SAMPLE_ROWS = 64  # a sample (1 row in SAMPLE_EVERY) has at least this many rows (all of smaller matrices)


@dataclass
class ErrorTable:
    names: list  # decoder linear names, file order
    candidates: list  # Candidate objects
    error_sq: np.ndarray  # (N, C) float64: ‖W − Ŵ‖²_F
    weighted: np.ndarray  # (N, C) float64: Σ importance·(W − Ŵ)² (= error_sq without importance)
    weighted_se: np.ndarray  # (N, C) float64: standard error of `weighted` (0 where measured on all rows)
    costs: np.ndarray  # (N, C) int64 bytes
    numel: np.ndarray  # (N,) weights per matrix
    norms_sq: np.ndarray  # (N,) ‖W‖²_F


def default_cache_dir() -> Path:
    """Root of mxq's caches (errors/, calibration/): $MXQ_CACHE or ~/.cache/mxq."""
    return cache_root()


def _is_value(value) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in value))


def _is_norm(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


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


def sample_rows(out_features: int, every: int) -> torch.Tensor | None:
    """Evenly spaced row indices, ceil(out/every) of them but at least MIN_SAMPLE_ROWS; None for all rows."""
    count = max(math.ceil(out_features / max(every, 1)), MIN_SAMPLE_ROWS)
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


def measure_matrix(checkpoint, quantizer: str, importance, outlier_mode: str, sample_every: int, job):
    """One matrix's missing entries. job: (name, [(cache key, candidate, row-sampled?)]) →
    (‖W‖²_F, {cache key: [err_sq, weighted, weighted_se]}). A pure function of its arguments (the
    quantizer's kernels give the same bits for any thread count), so it may run on any machine."""
    name, entries = job
    weight = checkpoint.load(name)
    weights = importance(name) if importance is not None else None
    rows = sample_rows(weight.shape[0], sample_every)
    spread = {}  # group size -> per-row error proxies (weighted, plain)
    values = {}
    for key, candidate, sample in entries:
        subset = rows if sample else None
        result = quantize(weight, candidate.storage(weight.shape), quantizer, pack=False,
                          importance=weights, outlier_mode=outlier_mode, rows=subset)
        if subset is None:
            values[key] = [result.error_sq, result.weighted_error, 0.0]
        else:
            if candidate.group_size not in spread:
                spread[candidate.group_size] = group_spread(weight, weights, candidate.group_size)
            proxy_weighted, proxy_sq = spread[candidate.group_size]
            weighted, se = estimate(result.row_weighted.numpy(), proxy_weighted, subset.numpy())
            error_sq, _ = estimate(result.row_error_sq.numpy(), proxy_sq, subset.numpy())
            values[key] = [error_sq, weighted, se]
    return float(np.square(weight.numpy(), dtype=np.float64).sum()), values  # NumPy: the same bits for any thread count


def _map_here(function, jobs):
    """The default runner: jobs one after another in this process, yielding (index, result)."""
    return enumerate(map(function, jobs))


def measure(checkpoint, candidates, quantizer: str, cache: ErrorCache, progress=None, importance=None,
            importance_id: str = "none", outlier_mode: str = "magnitude",
            sample_every: int = SAMPLE_EVERY, tensors=None, runner=None) -> ErrorTable:
    """importance: None or a function name -> (out, in) tensor weighing errors (see quantize).
    sample_every: measure 1 row in this many (1: every row, exact errors).
    tensors: the 2-D tensors (checkpoint TensorInfos) to measure; default: the decoder linears.
    runner(function, jobs) yields (index into jobs, function(job)) in any order: the per-matrix work
    (default: here, in order; converter/cluster.py runs it as cluster tasks)."""
    linears = checkpoint.linears if tensors is None else list(tensors)
    names = [t.name for t in linears]
    costs = np.array([[tensor_nbytes(t.shape, c.storage(t.shape)) for c in candidates] for t in linears],
                     dtype=np.int64)
    numel = np.array([t.shape[0] * t.shape[1] for t in linears], dtype=np.int64)
    sampled = [c.scheme == "affine" and not c.outlier_percent and sample_every > 1 for c in candidates]
    keys = [f"fp16/{importance_id}" if c.scheme == "fp16" else
            f"{quantizer}/{importance_id}/{outlier_mode}/{c.label}" + (f"/rows1in{sample_every}" if s else "")
            for c, s in zip(candidates, sampled)]
    todo = [i for i, name in enumerate(names)
            if name not in cache.data["norms"] or any(cache.get(k, name) is None for k in keys)]
    bar = progress(total=len(todo) * len(candidates), desc="measure", unit="quant") if progress and todo else None
    jobs = [(names[i], [(k, c, s) for k, c, s in zip(keys, candidates, sampled) if cache.get(k, names[i]) is None])
            for i in todo]
    work = partial(measure_matrix, checkpoint, quantizer, importance, outlier_mode, sample_every)
    for count, (j, (norm_sq, values)) in enumerate((runner or _map_here)(work, jobs)):
        name = jobs[j][0]
        cache.data["norms"][name] = norm_sq
        for key, value in values.items():
            cache.put(key, name, value)
        if bar:
            bar.update(len(candidates))
        if count % 16 == 15:
            cache.save()
    if bar:
        bar.close()
    cache.save()
    values = np.array([[cache.get(k, n) for k in keys] for n in names], dtype=np.float64).reshape(
        len(names), len(keys), 3)
    norms_sq = np.array([cache.data["norms"][n] for n in names])
    return ErrorTable(names, list(candidates), values[..., 0], values[..., 1], values[..., 2], costs, numel,
                      norms_sq)
