"""The error matrix: for every decoder linear × candidate config, ‖W − Ŵ‖²_F of exactly what the
file would store, and its exact cost in bytes (format_spec's cost model).

Errors are cached on disk per checkpoint content hash, keyed by quantizer and config label, so
converting the same model at another budget (or with more candidates) measures only what is new.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..format_spec import tensor_nbytes
from .quantize import quantize

CACHE_VERSION = 2  # bump when quantizer math changes


@dataclass
class ErrorTable:
    names: list  # decoder linear names, file order
    candidates: list  # Candidate objects
    error_sq: np.ndarray  # (N, C) float64: ‖W − Ŵ‖²_F
    weighted: np.ndarray  # (N, C) float64: Σ importance·(W − Ŵ)² (= error_sq without importance)
    costs: np.ndarray  # (N, C) int64 bytes
    numel: np.ndarray  # (N,) weights per matrix
    norms_sq: np.ndarray  # (N,) ‖W‖²_F


def default_cache_dir() -> Path:
    """Root of mxq's caches (errors/, calibration/): $MXQ_CACHE or ~/.cache/mxq."""
    return Path(os.environ.get("MXQ_CACHE", Path.home() / ".cache" / "mxq"))


class ErrorCache:
    """One JSON file per checkpoint hash:
    {"v": 2, "errors": {"<quantizer>/<importance id>/<outlier mode>/<config>": {name: [err_sq, weighted]}},
     "norms": {name: ‖W‖²}}."""

    def __init__(self, directory: Path | None, checkpoint_hash: str):
        self.path = None if directory is None else Path(directory) / f"{checkpoint_hash}.json"
        self.data = {"v": CACHE_VERSION, "errors": {}, "norms": {}}
        if self.path is not None and self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
                if isinstance(loaded, dict) and loaded.get("v") == CACHE_VERSION:
                    self.data = loaded
            except (OSError, ValueError):
                pass  # a damaged cache is ignored and rewritten

    def get(self, key: str, name: str):
        value = self.data["errors"].get(key, {}).get(name)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            return value
        return None

    def put(self, key: str, name: str, value: float):
        self.data["errors"].setdefault(key, {})[name] = value

    def save(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def measure(checkpoint, candidates, quantizer: str, cache: ErrorCache, progress=None, importance=None,
            importance_id: str = "none", outlier_mode: str = "magnitude") -> ErrorTable:
    """importance: None or a function name -> (out, in) tensor weighing errors (see quantize)."""
    linears = checkpoint.linears
    names = [t.name for t in linears]
    costs = np.array([[tensor_nbytes(t.shape, c.storage(t.shape)) for c in candidates] for t in linears],
                     dtype=np.int64)
    numel = np.array([t.shape[0] * t.shape[1] for t in linears], dtype=np.int64)
    keys = [f"fp16/{importance_id}" if c.scheme == "fp16" else f"{quantizer}/{importance_id}/{outlier_mode}/{c.label}"
            for c in candidates]
    todo = [i for i, name in enumerate(names)
            if name not in cache.data["norms"] or any(cache.get(k, name) is None for k in keys)]
    bar = progress(total=len(todo) * len(candidates), desc="measure", unit="quant") if progress and todo else None
    for i in todo:
        weight = checkpoint.load(names[i])
        weights = importance(names[i]) if importance is not None else None
        cache.data["norms"][names[i]] = float((weight.double() ** 2).sum())
        for key, candidate in zip(keys, candidates):
            if cache.get(key, names[i]) is None:
                result = quantize(weight, candidate.storage(weight.shape), quantizer, pack=False,
                                  importance=weights, outlier_mode=outlier_mode)
                cache.put(key, names[i], [result.error_sq, result.weighted_error])
            if bar:
                bar.update(1)
        if i % 16 == 15:
            cache.save()
    if bar:
        bar.close()
    cache.save()
    error_sq = np.array([[cache.get(k, n)[0] for k in keys] for n in names])
    weighted = np.array([[cache.get(k, n)[1] for k in keys] for n in names])
    norms_sq = np.array([cache.data["norms"][n] for n in names])
    return ErrorTable(names, list(candidates), error_sq, weighted, costs, numel, norms_sq)
