"""HF checkpoint → budget-exact mixed-precision .mxq: read, measure, solve, write.

    read_checkpoint ─► measure (error matrix, cached) ─► allocate (MILP) ─► quantize + write (streamed)

With --bpw the allocation covers the decoder linears (embeddings fp16, or --quantize-embeddings).
With a byte budget (--size, --fit) and the Fisher objective it covers every stored matrix: the
embedding and an untied lm_head are measured with their own candidates (converter/budget.py) and
join the linears in one MILP. With --row-blocks K the linears' units are their row blocks (each a
config, converter/row_blocks.py), written as the `rows` scheme; embeddings and lm_head stay whole.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..format_spec import MxqWriter, StorageConfig, TensorPlan, tensor_nbytes
from ..format_spec.layout import CODEBOOK_ROLE, unpacked_extra_nbytes
from ..format_spec.reader import open_regular
from .allocate import allocate
from .budget import MATRIX_CANDIDATES, file_budget, padded, runtime_overhead
from .calibration_store import MatrixFisher
from .candidates import Candidate, parse_candidates, with_outliers
from .checkpoint import read_checkpoint
from .errors import ConversionError
from .measure import ErrorCache, default_cache_dir, measure
from .options import parse_size  # noqa: F401 (re-exported)
from .options import (AUTO, CALIBRATED_OBJECTIVES, ConvertOptions, auto_configs, auto_note, configs_note,
                      measured_with, resolved_configs, whole_file, write_quantizer)
from .quantize import quantize
from .row_blocks import quantize_rows, row_order, rows_config, unit_costs, unit_nbytes
from .shared_codebooks import codebook_plans, fit_shared_codebooks, reserved_nbytes, shared_pairs

EMBEDDING_CONFIGS = {8: StorageConfig.affine(8, 64), 4: StorageConfig.affine(4, 32)}


@dataclass
class Report:
    path: str
    file_bytes: int
    achieved_bpw: float
    budget: dict
    module_bits: dict
    config_counts: dict
    matrix_configs: dict = field(default_factory=dict)  # embedding / lm_head name -> config label
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    target: dict = field(default_factory=dict)  # --max-loss: target, rounds, predicted vs measured (target_loss.py)
    workers: dict = field(default_factory=dict)  # --cluster: stage -> worker -> {seconds, cpu, tasks} (cluster.py)


def _candidates(options: ConvertOptions) -> list[Candidate]:
    """--configs' candidates (auto before a byte budget's first solve: resolved_configs), with --outliers."""
    candidates = parse_candidates(resolved_configs(options))
    if options.outliers:
        candidates = [with_outliers(c, options.outliers) for c in candidates]
    return candidates


def _plans(checkpoint, configs: dict, options: ConvertOptions) -> list[TensorPlan]:
    """configs: name -> StorageConfig of every allocated tensor (the linears, and the matrices stored
    once when the budget covers the whole file); then the shared vq codebooks and trellis tables the candidates
    allow (always stored: their bytes are reserved, converter/shared_codebooks.py)."""
    plans = []
    for name, info in checkpoint.tensors.items():
        if name in configs:
            config = configs[name]
        elif info.role in ("embedding", "lm_head") and options.quantize_embeddings:
            config = EMBEDDING_CONFIGS[options.quantize_embeddings]
        else:
            config = StorageConfig.fp16()
        plans.append(TensorPlan(name, info.shape, config, info.role))
    return plans + codebook_plans(shared_pairs(_candidates(options)))


def _objective(table, objective: str) -> np.ndarray:
    if objective == "frobenius":
        return np.sqrt(table.error_sq)
    return table.error_sq if objective == "frobenius_sq" else table.weighted


def _check_feasible(checkpoint, candidates, options) -> None:
    """Fail early when no allocation can meet the budget (costs need no measurement)."""
    linears = checkpoint.linears
    counts, costs = unit_costs(linears, candidates, options.row_blocks)
    numel = sum(t.shape[0] * t.shape[1] for t in linears)
    if options.bpw is not None:
        reserved = reserved_nbytes(shared_pairs(candidates))  # shared codebooks: bytes of the linears' budget
        lowest, highest = costs.min(axis=1).sum() + reserved, costs.max(axis=1).sum() + reserved
        if options.bpw * numel / 8 < lowest:
            raise ConversionError(f"--bpw {options.bpw} is infeasible with configs {resolved_configs(options)!r}: the feasible "
                                  f"range is {8 * lowest / numel:.4f} to {8 * highest / numel:.4f} bpw")
        return
    cheapest, unit = {}, 0
    for t, c_t in zip(linears, counts):
        picks = [candidates[int(np.argmin(row))] for row in costs[unit:unit + len(c_t)]]
        cheapest[t.name] = picks[0].storage(t.shape) if len(c_t) < 2 else rows_config(t.shape, c_t, picks)
        unit += len(c_t)
    if whole_file(options):
        for name in _matrix_names(checkpoint):
            shape = checkpoint.tensors[name].shape
            cheapest[name] = min((c.storage(shape) for c in MATRIX_CANDIDATES), key=lambda s: tensor_nbytes(shape, s))
    plans = _plans(checkpoint, cheapest, options)
    smallest = _held_bytes(MxqWriter("unused.mxq", model=checkpoint.model, tokenizer=checkpoint.tokenizer,
                                     tokenizer_data=checkpoint.tokenizer_data, tensors=plans), options)
    budget = file_budget(checkpoint, options)
    if budget < smallest:
        raise ConversionError(f"{_budget_text(checkpoint, options)} is infeasible: the smallest file with configs "
                              f"{resolved_configs(options)!r} is about {smallest:,} bytes")


def _matrix_names(checkpoint) -> list[str]:
    """The matrices stored once that a whole-file budget allocates: the embedding, an untied lm_head."""
    return [name for name, info in checkpoint.tensors.items() if info.role in ("embedding", "lm_head")]


def _budget_text(checkpoint, options) -> str:
    if options.fit is None:
        return f"--size {options.size:,} bytes"
    return (f"--fit {options.fit:,} bytes at --context {options.context} --batch {options.batch} (a file budget of "
            f"{file_budget(checkpoint, options):,} bytes)")


def _configs(checkpoint, tables, choice) -> dict:
    """name -> StorageConfig of every allocated tensor; choice indexes each unit's own table's candidates
    (a split matrix's units are its row blocks: stored as one `rows` config, row_blocks.py)."""
    configs, picks, unit = {}, {}, 0
    for table in tables:
        for i, name in enumerate(table.names):
            b, counts = table.unit(i)
            candidate = table.candidates[choice[unit]]
            unit += 1
            shape = checkpoint.tensors[name].shape
            if len(counts) < 2:
                configs[name] = candidate.storage(shape)
                continue
            picks.setdefault(name, []).append(candidate)
            if b == len(counts) - 1:
                configs[name] = rows_config(shape, counts, picks.pop(name))
    return configs


def _unit_nbytes(checkpoint, table, i, candidate, alignment=None, memory=False) -> int:
    """Bytes unit i of `table` (a matrix or one of its row blocks) takes stored as `candidate`; with
    `memory`, plus what the runtime adds when it unpacks the unit's 6-bit metadata (--fit's bytes)."""
    b, counts = table.unit(i)
    shape = checkpoint.tensors[table.names[i]].shape
    nbytes = unit_nbytes(shape, counts or (shape[0],), b, candidate, alignment)
    if memory:
        block = (counts[b], shape[1]) if counts and len(counts) > 1 else shape
        nbytes += unpacked_extra_nbytes(block, candidate.storage(block))
    return nbytes


def _held_bytes(writer, options) -> int:
    """What the budget counts of a planned file: its bytes, and for --fit the runtime's unpacked metadata."""
    if options.fit is None:
        return writer.file_nbytes
    return writer.file_nbytes + sum(unpacked_extra_nbytes(plan.shape, plan.config) for plan in writer.tensors)


def _solve(checkpoint, tables, options, make_writer) -> np.ndarray:
    """Solve the MILP over the tables' tensors (the linears; then the matrices stored once, when the
    budget covers the whole file). For a byte budget, iterate until the exact file layout (header,
    JSON, alignment, fp16 tensors and all) fits: the JSON's length moves by a few bytes with the plan."""
    table = tables[0]
    if options.bpw is not None:  # the linears' bytes, the shared codebooks they may use included
        return allocate(table.costs, _objective(table, options.objective),
                        int(math.floor(options.bpw * int(table.numel.sum()) / 8 + 1e-9))
                        - reserved_nbytes(shared_pairs(table.candidates)))
    objective = padded([row for t in tables for row in _objective(t, options.objective)], fill_cost=False)
    memory = options.fit is not None
    aligned = padded([np.array([_unit_nbytes(checkpoint, t, i, c, 64, memory) for c in t.candidates], dtype=np.int64)
                      for t in tables for i in range(len(t.names))], fill_cost=True)
    cheapest = aligned.argmin(axis=1)
    rows = np.arange(len(aligned))
    overhead = _held_bytes(make_writer(cheapest), options) - int(aligned[rows, cheapest].sum())
    smallest = overhead + int(aligned[rows, cheapest].sum())
    target = file_budget(checkpoint, options)
    if target < smallest:
        raise ConversionError(f"{_budget_text(checkpoint, options)} is infeasible: the smallest file with configs "
                              f"{resolved_configs(options)!r} is {smallest:,} bytes")
    budget = target - overhead
    for _ in range(8):
        choice = allocate(aligned, objective, max(budget, int(aligned[rows, cheapest].sum())))
        size = _held_bytes(make_writer(choice), options)
        if size <= target:
            return choice
        budget = min(budget, int(aligned[rows, choice].sum())) - (size - target)  # below what this plan spent
    raise ConversionError("could not fit the byte budget (layout did not converge)")


def convert(hf_dir, out_path, options: ConvertOptions | None = None, progress=None, **kwargs) -> Report:
    """Convert an HF checkpoint directory to `out_path` under the options' budget.

    `progress` is a tqdm-like factory (or None for silence).
    """
    options = options or ConvertOptions(**kwargs)
    options.validate()
    if options.max_loss is not None:  # a search over budgets, each converted here (converter/target_loss.py)
        from .target_loss import convert_max_loss
        return convert_max_loss(hf_dir, out_path, options, progress)
    if options.cluster is None:
        return _convert(hf_dir, out_path, options, progress)
    from .cluster import connect  # the only import of Ray (converter/cluster.py), and only with --cluster

    cache_dir = default_cache_dir() if options.cache_dir == "default" else options.cache_dir
    options = replace(options, cache_dir=cache_dir and str(Path(cache_dir).absolute()))  # paths the workers read
    with connect(options.cluster) as cluster:
        report = _convert(Path(hf_dir).absolute(), out_path, options, progress, cluster)
        report.workers, report.notes = cluster.worker_seconds(), report.notes + cluster.notes
        return report


def read_source(hf_dir, options: ConvertOptions):
    """The checkpoint the converter quantizes, before calibration and input scaling: (checkpoint, its
    RotatedCheckpoint or None). With --rotate everything after reads the rotated copy (converter/rotate.py)."""
    checkpoint = read_checkpoint(hf_dir)
    if not options.rotate:
        return checkpoint, None
    from .rotate import RotatedCheckpoint
    rotation = RotatedCheckpoint(checkpoint, options.rotate_seed)
    return rotation.checkpoint, rotation


def _convert(hf_dir, out_path, options: ConvertOptions, progress, cluster=None) -> Report:
    """convert(); with `cluster` (converter/cluster.py), calibration and measurement run as its tasks."""
    if options.configs == AUTO and options.bpw is None and options.cache_dir is None and cluster is None:  # --no-cache
        with tempfile.TemporaryDirectory(prefix="mxq-cache-") as cache:  # auto may convert twice: calibrate once
            return _convert(hf_dir, out_path, replace(options, cache_dir=cache), progress, cluster)
    _use_cores(options.jobs)
    seconds = {}
    started = time.perf_counter()
    checkpoint, rotation = read_source(hf_dir, options)
    numel = sum(t.shape[0] * t.shape[1] for t in checkpoint.linears)
    configs_notes = []
    if options.configs == AUTO and options.bpw is not None:
        configs, why = auto_configs(options.bpw, numel)
        configs_notes.append(configs_note(options, configs, why))
        options = replace(options, configs=configs)
    candidates = _candidates(options)
    _check_feasible(checkpoint, candidates, options)  # before any expensive work
    cache_dir = default_cache_dir() if options.cache_dir == "default" else options.cache_dir
    checkpoint_hash = checkpoint.content_hash(cache_dir)
    seconds["read"] = time.perf_counter() - started

    importance, importance_id, calibration, scaling = None, "none", None, None
    source_hash = checkpoint_hash
    if options.objective in CALIBRATED_OBJECTIVES and any(c.scheme != "fp16" for c in candidates):
        stage = time.perf_counter()
        checkpoint, checkpoint_hash, calibration, scaling = _calibrated(
            checkpoint, checkpoint_hash, options, cache_dir, progress, cluster and cluster.calibration_runner(checkpoint))
        importance_id = _importance_id(options, calibration)
        if options.objective == "fisher":
            importance = calibration.fisher.__getitem__
        else:  # a partial, not a lambda: cluster workers receive it pickled
            from .calibrate import expanded_input_sq
            importance = functools.partial(expanded_input_sq, calibration.input_sq)
        seconds["calibrate"] = time.perf_counter() - stage

    stage = time.perf_counter()
    codebooks = fit_shared_codebooks(checkpoint, candidates, importance, progress,  # {} without shared candidates
                                     cache_dir and Path(cache_dir) / "codebooks",
                                     f"{checkpoint_hash[:16]}-{importance_id}")
    if codebooks:
        seconds["codebooks"] = time.perf_counter() - stage

    stage = time.perf_counter()
    cache = ErrorCache(cache_dir and Path(cache_dir) / "errors", checkpoint_hash)
    if cluster:  # workers read the checkpoint and the calibration statistics themselves
        cluster.require([checkpoint.path] + ([calibration.directory] if calibration else []))
    table = measure(checkpoint, candidates, measured_with(options.quantizer), cache, progress,
                    importance, importance_id,
                    options.outlier_mode, options.measure_every, runner=cluster and cluster.map,
                    row_blocks=options.row_blocks, codebooks=codebooks)
    tables = [table]
    if whole_file(options) and calibration is not None:
        matrices = [checkpoint.tensors[name] for name in _matrix_names(checkpoint)]
        tables.append(measure(checkpoint, MATRIX_CANDIDATES, measured_with(options.quantizer),
                              cache, progress,
                              calibration.matrices.__getitem__, f"{importance_id}/matrices{MatrixFisher.VERSION}",
                              options.outlier_mode,
                              options.measure_every, tensors=matrices))
    seconds["measure"] = time.perf_counter() - stage

    provenance = {
        "source": {"name": Path(hf_dir).resolve().name, "sha256": source_hash, **checkpoint.license},
        "converter": {"name": "mxq", "version": __version__},
        "options": {**asdict(options), "configs": [c.label for c in candidates], "cache_dir": None, "jobs": None,
                    "cluster": None},
    }
    if calibration is not None:
        provenance["calibration"] = {"text_sha256": calibration.text_sha256, "tokens": calibration.tokens,
                                     "fp_loss": round(calibration.loss, 6),
                                     "text": Path(options.calib).name if options.calib else "packaged Botchan excerpt"}
    if rotation is not None:
        provenance["source"]["sha256"] = rotation.source_sha256
        provenance["rotation"] = rotation.provenance
    if scaling is not None:
        provenance["input_scaling"] = scaling
    if checkpoint.notes:
        provenance["notes"] = checkpoint.notes
    if options.bpw is not None:
        budget = {"bpw": options.bpw}
    elif options.fit is None:
        budget = {"size_bytes": options.size}
    else:
        budget = {"fit_bytes": options.fit, "context": options.context, "batch": options.batch,
                  "file_bytes": file_budget(checkpoint, options)}

    def make_writer(choice) -> MxqWriter:
        rows, linear = np.arange(len(table.names)), choice[:len(table.names)]
        linear_bytes = float(table.costs[rows, linear].sum()) + reserved_nbytes(codebooks)  # + shared codebooks
        bpw_linear = round(8.0 * linear_bytes / float(table.numel.sum()), 6)
        quantization = {
            "budget": budget, "objective": options.objective, "quantizer": write_quantizer(options, bpw_linear),
            "configs": [c.label for c in candidates],
            "achieved_bpw_linear": bpw_linear,
            "expected_rel_error": round(math.sqrt(float(table.error_sq[rows, linear].sum())
                                                  / max(float(table.norms_sq.sum()), 1e-300)), 6),
        }
        plans = _plans(checkpoint, _configs(checkpoint, tables, choice), options)
        return MxqWriter(out_path, model=checkpoint.model, tokenizer=checkpoint.tokenizer,
                         tokenizer_data=checkpoint.tokenizer_data, tensors=plans, quantization=quantization,
                         provenance=provenance)

    stage = time.perf_counter()
    choice = _solve(checkpoint, tables, options, make_writer)
    seconds["solve"] = time.perf_counter() - stage
    if options.configs == AUTO:  # a byte budget's first solve, with AUTO_CONFIGS[0]: auto's preset by its bpw
        n = len(table.names)
        bpw_linear = 8.0 * (float(table.costs[np.arange(n), choice[:n]].sum()) + reserved_nbytes(codebooks)) / numel
        configs, why = auto_configs(bpw_linear, numel)
        if configs != resolved_configs(options):  # convert again (the first solve's errors come from the cache)
            report = _convert(hf_dir, out_path, replace(options, configs=configs), progress, cluster)
            report.notes.insert(0, configs_note(options, configs, why))
            return report
        configs_notes.append(configs_note(options, configs, why))

    stage = time.perf_counter()
    writer = make_writer(choice)
    bar = progress(total=len(writer.tensors), desc="write", unit="tensor") if progress else None
    with writer:
        matrices = set(tables[1].names) if len(tables) > 1 else set()

        def weights_of(name):  # a stored tensor's importance weights (None: unweighted)
            if name in matrices:  # an allocated embedding / lm_head
                return calibration.matrices[name]
            return importance(name) if importance is not None and checkpoint.tensors[name].role == "linear" else None

        for name, blobs in _quantized(checkpoint, writer.tensors, writer.quantization["quantizer"], options,
                                      weights_of, codebooks):
            writer.write(name, blobs)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    seconds["write"] = time.perf_counter() - stage
    seconds["total"] = time.perf_counter() - started
    notes = configs_notes + checkpoint.notes + cache.notices + _sample_note(table, choice[:len(table.names)], options)
    if options.quantizer == "auto":
        notes.append(auto_note(options, writer.quantization["achieved_bpw_linear"]))
    if options.fit is not None:
        unpacked = _held_bytes(writer, options) - writer.file_nbytes
        notes.append(f"--fit: file {writer.file_nbytes:,} + unpacked metadata {unpacked:,} + runtime "
                     f"{runtime_overhead(checkpoint, options).total:,} "
                     f"bytes at --context {options.context} --batch {options.batch} (runtime/footprint.py) "
                     f"≤ {options.fit:,} bytes")
    n = len(table.names)
    matrix_configs = {name: tables[1].candidates[c].label for name, c in zip(tables[1].names, choice[n:])} \
        if len(tables) > 1 else {}
    module_bits = {**_module_bits(table, choice[:n])}
    for t in tables[1:]:
        module_bits.update(_module_bits(t, choice[n:]))
    return Report(str(out_path), writer.file_nbytes, writer.quantization["achieved_bpw_linear"], budget,
                  module_bits, _config_counts(table, choice[:n]), matrix_configs, seconds, notes)


def _quantized(checkpoint, plans, quantizer: str, options, weights_of, codebooks: dict):
    """(name, blobs) of every planned tensor, in plan order, rounded by `quantizer` (options.write_quantizer's);
    weights_of(name): its importance or None; codebooks: the shared vq codebooks and trellis tables, whose tensors
    come last."""
    books = [plan for plan in plans if plan.role == CODEBOOK_ROLE]
    plans = plans[:len(plans) - len(books)]
    if quantizer == "gptq":  # layer-sequential error compensation (converter/gptq.py)
        from .gptq import quantized_tensors
        yield from quantized_tensors(checkpoint, plans, weights_of, options.outlier_mode,
                                     _calibration_text(options), options.calib_tokens, codebooks=codebooks)
    else:
        for plan in plans:
            weight, importance = checkpoint.load(plan.name), weights_of(plan.name)
            if plan.config.scheme == "rows":  # the row order measure() used: the same weights and importance
                block = functools.partial(_quantize_block, quantizer, options.outlier_mode, codebooks)
                yield plan.name, quantize_rows(weight, plan.config, importance, row_order(weight, importance), block)
                continue
            yield plan.name, quantize(weight, plan.config, quantizer, importance=importance,
                                      outlier_mode=options.outlier_mode, codebooks=codebooks).blobs
    for pair, plan in zip(sorted(codebooks), books):  # codebook_plans' order
        yield plan.name, {"data": codebooks[pair]}


def _quantize_block(quantizer: str, outlier_mode: str, codebooks, weight, config, importance) -> dict:
    """One row block's blobs (row_blocks.quantize_rows)."""
    return quantize(weight, config, quantizer, importance=importance, outlier_mode=outlier_mode,
                    codebooks=codebooks).blobs


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


def _importance_id(options, calibration) -> str:
    """The error cache's key for errors weighted by this calibration: its statistics' own cache key (the
    directory's name: checkpoint, tokenizer, text, tokens and how chunks are cut), not only the text and
    token count — the same text chunked another way (BOS first, since Gemma 3's fix) weighs differently."""
    return f"{options.objective}-{calibration.directory.name[:16]}"


def _calibration_text(options) -> str | None:
    """The --calib file's text (None: the packaged default)."""
    if not options.calib:
        return None
    try:  # a regular file only: a FIFO would block forever
        with os.fdopen(open_regular(options.calib), "rb") as handle:
            return handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"{options.calib}: cannot read calibration text: {error}") from None


def _calibration(checkpoint, checkpoint_hash, options, cache_dir, progress, runner=None):
    from .calibrate import load_or_calibrate

    return load_or_calibrate(checkpoint, checkpoint_hash, _calibration_text(options), options.calib_tokens,
                             cache_dir and Path(cache_dir) / "calibration", progress, runner)


def _calibrated(checkpoint, checkpoint_hash, options, cache_dir, progress, runner=None):
    """Calibrate (or load the cached statistics), then apply --input-scaling: (checkpoint, its hash, calibration,
    the scaling's provenance or None) — the weights scaled on load, the statistics transformed to match."""
    from .input_scaling import scaled

    calibration = _calibration(checkpoint, checkpoint_hash, options, cache_dir, progress, runner)
    return scaled(checkpoint, checkpoint_hash, calibration, options.input_scaling)


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
