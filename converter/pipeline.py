"""HF checkpoint → budget-exact mixed-precision .mxq: read, measure, solve, write.

    read_checkpoint ─► measure (error matrix, cached) ─► allocate (MILP) ─► quantize + write (streamed)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..format_spec import MxqWriter, StorageConfig, TensorPlan, aligned_nbytes, tensor_nbytes
from ..format_spec.reader import open_regular
from .allocate import allocate
from .candidates import Candidate, parse_candidates
from .checkpoint import read_checkpoint
from .errors import ConversionError
from .measure import ErrorCache, default_cache_dir, measure
from .options import CALIBRATED_OBJECTIVES, MEASURED_WITH, ConvertOptions, parse_size  # noqa: F401 (re-exported)
from .quantize import quantize

EMBEDDING_CONFIGS = {8: StorageConfig.affine(8, 64), 4: StorageConfig.affine(4, 32)}


@dataclass
class Report:
    path: str
    file_bytes: int
    achieved_bpw: float
    budget: dict
    module_bits: dict
    config_counts: dict
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _candidates(options: ConvertOptions) -> list[Candidate]:
    candidates = parse_candidates(options.configs)
    if options.outliers:
        candidates = [Candidate(c.scheme, c.bits, c.group_size, options.outliers) if c.scheme == "affine" else c
                      for c in candidates]
    return candidates


def _plans(checkpoint, linear_configs: dict, options: ConvertOptions) -> list[TensorPlan]:
    plans = []
    for name, info in checkpoint.tensors.items():
        if info.role == "linear":
            config = linear_configs[name]
        elif info.role in ("embedding", "lm_head") and options.quantize_embeddings:
            config = EMBEDDING_CONFIGS[options.quantize_embeddings]
        else:
            config = StorageConfig.fp16()
        plans.append(TensorPlan(name, info.shape, config, info.role))
    return plans


def _objective(table, objective: str) -> np.ndarray:
    if objective == "frobenius":
        return np.sqrt(table.error_sq)
    return table.error_sq if objective == "frobenius_sq" else table.weighted


def _check_feasible(checkpoint, candidates, options) -> None:
    """Fail early when no allocation can meet the budget (costs need no measurement)."""
    linears = checkpoint.linears
    costs = np.array([[tensor_nbytes(t.shape, c.storage(t.shape)) for c in candidates] for t in linears])
    numel = sum(t.shape[0] * t.shape[1] for t in linears)
    if options.bpw is not None:
        lowest, highest = costs.min(axis=1).sum(), costs.max(axis=1).sum()
        if options.bpw * numel / 8 < lowest:
            raise ConversionError(f"--bpw {options.bpw} is infeasible with configs {options.configs!r}: the feasible "
                                  f"range is {8 * lowest / numel:.4f} to {8 * highest / numel:.4f} bpw")
        return
    cheapest = {t.name: candidates[int(np.argmin(row))].storage(t.shape) for t, row in zip(linears, costs)}
    plans = _plans(checkpoint, cheapest, options)
    smallest = MxqWriter("unused.mxq", model=checkpoint.model, tokenizer=checkpoint.tokenizer,
                         tokenizer_data=checkpoint.tokenizer_data, tensors=plans).file_nbytes
    if options.size < smallest:
        raise ConversionError(f"--size {options.size:,} bytes is infeasible: the smallest file with configs "
                              f"{options.configs!r} is about {smallest:,} bytes")


def _linear_configs(checkpoint, table, choice) -> dict:
    return {name: table.candidates[c].storage(checkpoint.tensors[name].shape) for name, c in zip(table.names, choice)}


def _solve(checkpoint, table, options, make_writer) -> np.ndarray:
    """Solve the MILP. For --size, iterate until the exact file layout (header, JSON, alignment,
    fp16 tensors and all) fits: the JSON's length moves by a few bytes with the plan."""
    objective = _objective(table, options.objective)
    total_numel = int(table.numel.sum())
    if options.bpw is not None:
        return allocate(table.costs, objective, int(math.floor(options.bpw * total_numel / 8 + 1e-9)))
    shapes = [checkpoint.tensors[n].shape for n in table.names]
    aligned = np.array([[aligned_nbytes(shape, c.storage(shape), 64) for c in table.candidates] for shape in shapes],
                       dtype=np.int64)
    cheapest = aligned.argmin(axis=1)
    rows = np.arange(len(shapes))
    overhead = make_writer(cheapest).file_nbytes - int(aligned[rows, cheapest].sum())
    smallest = overhead + int(aligned[rows, cheapest].sum())
    if options.size < smallest:
        raise ConversionError(f"--size {options.size:,} bytes is infeasible: the smallest file with configs "
                              f"{options.configs!r} is {smallest:,} bytes")
    budget = options.size - overhead
    for _ in range(8):
        choice = allocate(aligned, objective, max(budget, int(aligned[rows, cheapest].sum())))
        size = make_writer(choice).file_nbytes
        if size <= options.size:
            return choice
        budget -= size - options.size
    raise ConversionError("could not fit the --size budget (layout did not converge)")


def convert(hf_dir, out_path, options: ConvertOptions | None = None, progress=None, **kwargs) -> Report:
    """Convert an HF checkpoint directory to `out_path` under the options' budget.

    `progress` is a tqdm-like factory (or None for silence).
    """
    options = options or ConvertOptions(**kwargs)
    options.validate()
    _use_cores(options.jobs)
    seconds = {}
    started = time.perf_counter()
    checkpoint = read_checkpoint(hf_dir)
    rotation = None
    if options.rotate:  # everything below reads the rotated copy (converter/rotate.py)
        from .rotate import RotatedCheckpoint
        rotation = RotatedCheckpoint(checkpoint, options.rotate_seed)
        checkpoint = rotation.checkpoint
    candidates = _candidates(options)
    _check_feasible(checkpoint, candidates, options)  # before any expensive work
    checkpoint_hash = checkpoint.content_hash()
    seconds["read"] = time.perf_counter() - started

    cache_dir = default_cache_dir() if options.cache_dir == "default" else options.cache_dir
    importance, importance_id, calibration = None, "none", None
    if options.objective in CALIBRATED_OBJECTIVES and any(c.scheme == "affine" for c in candidates):
        stage = time.perf_counter()
        calibration = _calibration(checkpoint, checkpoint_hash, options, cache_dir, progress)
        importance_id = f"{options.objective}-{calibration.text_sha256[:16]}-{calibration.tokens}"
        if options.objective == "fisher":
            importance = calibration.fisher.__getitem__
        else:
            importance = lambda name: calibration.input_sq[name].expand(checkpoint.tensors[name].shape)  # noqa: E731
        seconds["calibrate"] = time.perf_counter() - stage

    stage = time.perf_counter()
    cache = ErrorCache(cache_dir and Path(cache_dir) / "errors", checkpoint_hash)
    table = measure(checkpoint, candidates, MEASURED_WITH.get(options.quantizer, options.quantizer), cache, progress, importance, importance_id,
                    options.outlier_mode, options.measure_every)
    if options.quantizer == "gptq" and options.objective in CALIBRATED_OBJECTIVES:
        table = _gptq_corrected(checkpoint, table, options, importance, progress)
    seconds["measure"] = time.perf_counter() - stage

    provenance = {
        "source": {"name": Path(hf_dir).resolve().name, "sha256": checkpoint_hash, **checkpoint.license},
        "converter": {"name": "mxq", "version": __version__},
        "options": {**asdict(options), "configs": [c.label for c in candidates], "cache_dir": None, "jobs": None},
    }
    if calibration is not None:
        provenance["calibration"] = {"text_sha256": calibration.text_sha256, "tokens": calibration.tokens,
                                     "fp_loss": round(calibration.loss, 6),
                                     "text": Path(options.calib).name if options.calib else "packaged Botchan excerpt"}
    if rotation is not None:
        provenance["source"]["sha256"] = rotation.source_sha256
        provenance["rotation"] = rotation.provenance
    if checkpoint.notes:
        provenance["notes"] = checkpoint.notes
    budget = {"bpw": options.bpw} if options.bpw is not None else {"size_bytes": options.size}

    def make_writer(choice) -> MxqWriter:
        rows = np.arange(len(choice))
        quantization = {
            "budget": budget, "objective": options.objective, "quantizer": options.quantizer,
            "configs": [c.label for c in candidates],
            "achieved_bpw_linear": round(8.0 * float(table.costs[rows, choice].sum()) / float(table.numel.sum()), 6),
            "expected_rel_error": round(math.sqrt(float(table.error_sq[rows, choice].sum())
                                                  / max(float(table.norms_sq.sum()), 1e-300)), 6),
        }
        plans = _plans(checkpoint, _linear_configs(checkpoint, table, choice), options)
        return MxqWriter(out_path, model=checkpoint.model, tokenizer=checkpoint.tokenizer,
                         tokenizer_data=checkpoint.tokenizer_data, tensors=plans, quantization=quantization,
                         provenance=provenance)

    stage = time.perf_counter()
    choice = _solve(checkpoint, table, options, make_writer)
    seconds["solve"] = time.perf_counter() - stage

    stage = time.perf_counter()
    writer = make_writer(choice)
    bar = progress(total=len(writer.tensors), desc="write", unit="tensor") if progress else None
    with writer:
        for name, blobs in _quantized(checkpoint, writer.tensors, options, importance):
            writer.write(name, blobs)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    seconds["write"] = time.perf_counter() - stage
    seconds["total"] = time.perf_counter() - started
    notes = checkpoint.notes + cache.notices + _sample_note(table, choice, options)
    return Report(str(out_path), writer.file_nbytes, writer.quantization["achieved_bpw_linear"], budget,
                  _module_bits(table, choice), _config_counts(table, choice), seconds, notes)


def _quantized(checkpoint, plans, options, importance):
    """(name, blobs) of every planned tensor, in plan order."""
    linear_importance = lambda name: importance(name) if importance is not None else None  # noqa: E731
    if options.quantizer == "gptq":  # layer-sequential error compensation (converter/gptq.py)
        from .gptq import quantized_tensors
        yield from quantized_tensors(checkpoint, plans, linear_importance, options.outlier_mode,
                                     _calibration_text(options), options.calib_tokens)
        return
    for plan in plans:
        weights = linear_importance(plan.name) if plan.role == "linear" else None
        yield plan.name, quantize(checkpoint.load(plan.name), plan.config, options.quantizer, importance=weights,
                                  outlier_mode=options.outlier_mode).blobs


def _gptq_corrected(checkpoint, table, options, importance, progress):
    """The wls-measured table with each matrix's errors scaled by GPTQ's gain on it (gptq.py), measured
    at the affine candidate whose bits per weight are nearest the budget's."""
    from dataclasses import replace

    from .gptq import compensation_gains

    bpw = 8.0 * table.costs.sum(axis=0) / float(table.numel.sum())  # (C,) each candidate's bits per weight
    target = options.bpw if options.bpw is not None else float(np.median(bpw))
    affine = [c for c, candidate in enumerate(table.candidates) if candidate.scheme == "affine"]
    if not affine:
        return table
    reference = min(affine, key=lambda c: abs(bpw[c] - target))
    gains = compensation_gains(checkpoint, table.names, table.candidates[reference], importance,
                               options.outlier_mode, _calibration_text(options), options.calib_tokens, progress)
    return replace(table, weighted=table.weighted * gains[:, None], weighted_se=table.weighted_se * gains[:, None])


def _use_cores(jobs: int | None) -> None:
    """Quantization threads (Numba kernels and torch ops): `jobs`, or every core this process may use."""
    import numba
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = min(jobs or cores, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(jobs)
    torch.set_num_threads(jobs)


def _sample_note(table, choice, options) -> list[str]:
    """The error bar of row-sampled measurement, for the chosen allocation."""
    rows = np.arange(len(choice))
    se = table.weighted_se[rows, choice]
    if options.objective == "frobenius" or not se.any():
        return []
    relative = math.sqrt(float((se ** 2).sum())) / max(float(table.weighted[rows, choice].sum()), 1e-300)
    return [f"errors measured on 1 row in {options.measure_every}: the chosen allocation's total error is "
            f"known to ±{100 * relative:.2f}% (one standard error); the file's errors are exact"]


def _calibration_text(options) -> str | None:
    """The --calib text (None: the packaged default)."""
    if not options.calib:
        return None
    try:  # a regular file only: a FIFO would block forever
        with os.fdopen(open_regular(options.calib), "rb") as handle:
            return handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"{options.calib}: cannot read calibration text: {error}") from None


def _calibration(checkpoint, checkpoint_hash, options, cache_dir, progress):
    from .calibrate import load_or_calibrate

    return load_or_calibrate(checkpoint, checkpoint_hash, _calibration_text(options), options.calib_tokens,
                             cache_dir and Path(cache_dir) / "calibration", progress)


def _module_bits(table, choice) -> dict:
    sums: dict[str, list] = {}
    for i, name in enumerate(table.names):
        module = name.split(".")[-2]
        entry = sums.setdefault(module, [0, 0])
        entry[0] += int(table.costs[i, choice[i]])
        entry[1] += int(table.numel[i])
    return {module: 8.0 * b / n for module, (b, n) in sums.items()}


def _config_counts(table, choice) -> dict:
    counts: dict[str, int] = {}
    for c in choice:
        label = table.candidates[c].label
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))
