"""`mxq sweep`: the size/quality frontier of a checkpoint from one measurement.

    prepare (calibrate + measure the error table, both cached, as `mxq convert` does)
    ─► every budget of the grid: one MILP solve → predicted loss increase (Fisher), timed
    ─► a few budgets (--measure-at): convert, and the runtime measures the loss (CPU) on held-out
       calibration text (default) or --text; the fp16 file is measured once as the reference
    ─► sweep.csv, sweep.png (predicted vs measured), heatmap-<bpw>.png (layer × module → bits)

Budgets are bits per weight over the decoder linears, as `mxq convert --bpw`.
"""
from __future__ import annotations

import csv
import math
import os
import secrets
import sys
import time
from pathlib import Path

import click
import numpy as np

from ..format_spec.writer import check_output_path, temp_path
from .options import MAX_ROW_BLOCKS, QUANTIZERS, default

MEASURED_POINTS = 4  # budgets converted and measured by default, spread over the feasible sweep
HEATMAP_BPW = 4.25  # the default heatmap's budget (or the swept budget nearest to it)
CSV_FIELDS = ["bpw", "budget_bytes", "solve_seconds", "predicted_nats", "predicted_pct", "calibrated_pct",
              "predicted_ppl", "measured_nll", "measured_pct", "measured_ppl", "file_bytes"]


def grid(start: float, stop: float, step: float) -> list[float]:
    """start, start+step, … ≤ stop (rounded to 1e-6 so that 2.5 + 0.25·k prints cleanly)."""
    from .errors import ConversionError

    if not (step > 0 and math.isfinite(start) and math.isfinite(stop) and start <= stop):
        raise ConversionError(f"--from {start:g} --to {stop:g} --step {step:g}: need from ≤ to and step > 0")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > 1000:
        raise ConversionError(f"--from {start:g} --to {stop:g} --step {step:g} is {count} budgets; at most 1000")
    return [round(start + i * step, 6) for i in range(count)]


def spread(points: list[float], n: int) -> list[float]:
    """n points of `points` spread evenly, ends included."""
    if n >= len(points):
        return list(points)
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)] if n > 1 else [points[len(points) // 2]]


def calibrated_scale(predicted: list[float], measured: list[float]) -> float | None:
    """k minimising Σ (measured − k·predicted)²: the Fisher estimate's scale on this text."""
    p, m = np.asarray(predicted), np.asarray(measured)
    return float((p * m).sum() / (p * p).sum()) if len(p) and (p * p).sum() > 0 else None


def heatmap_entries(table, choice) -> list:
    """(name, label, stored bits per weight) of every matrix of the error table under `choice`. A matrix
    split into row blocks shows its blocks' mean: bits per weight over all of them, and as its label the
    blocks' common label or, when they differ, their mean code width (e.g. '3.5')."""
    matrices: dict[str, list] = {}
    for i, (name, c) in enumerate(zip(table.names, choice)):
        matrices.setdefault(name, []).append((i, table.candidates[c]))
    entries = []
    for name, units in matrices.items():
        rows = [i for i, _ in units]
        bits = 8.0 * float(sum(table.costs[i, c] for i, c in zip(rows, choice[rows]))) / float(table.numel[rows].sum())
        labels = {candidate.label for _, candidate in units}
        if len(labels) == 1:
            label = labels.pop()
        else:
            code_bits = sum(candidate.bits * float(table.numel[i]) for i, candidate in units)
            label = f"{code_bits / float(table.numel[rows].sum()):.1f}"
        entries.append((name, label, bits))
    return entries


def sweep(hf_dir, out_dir, options, budgets_bpw, measure_at, heatmap_bpw, text=None, ctx=2048, max_chunks=16,
          keep_files=False, progress=None, log=print, text_name="--text") -> dict:
    """Run the sweep (see the module docstring); returns {"rows", "seconds", "paths", "scale", "fp"}.
    measure_at / heatmap_bpw None: MEASURED_POINTS spread over the feasible budgets / the one nearest HEATMAP_BPW."""
    from .prediction import (PREDICTION_GAP, Evaluation, convert_at, file_loss, fp_reference, heldout,
                             predicted_increase, prepare)
    from .allocate import allocate
    from .errors import ConversionError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sweep.csv", "sweep.png"):  # before any work: not a directory, a symlink, unwritable
        check_output_path(out_dir / name)
    seconds, started = {}, time.perf_counter()
    prepared = prepare(hf_dir, options, progress)
    seconds.update(prepared.seconds)
    table, calibration = prepared.table, prepared.calibration
    evaluation = heldout(prepared) if text is None else Evaluation(text_name, None, text, ctx, max_chunks)
    stage = time.perf_counter()
    fp = fp_reference(prepared, evaluation, out_dir)
    seconds["fp reference"] = time.perf_counter() - stage
    fp_loss = fp["nll"]
    log(f"fp16 reference on {evaluation.name}: loss {fp_loss:.4f}, ppl {fp['ppl']:.3f} "
        f"({fp['chunks']} chunks of {fp['chunks'] and fp.get('ctx', evaluation.ctx)} tokens"
        f"{', the model context' if fp.get('ctx', evaluation.ctx) < evaluation.ctx else ''})")

    numel = int(table.numel.sum())
    lowest, highest = 8.0 * table.costs.min(axis=1).sum() / numel, 8.0 * table.costs.max(axis=1).sum() / numel
    inside = lambda bpw: lowest <= bpw <= highest + 1e-9  # noqa: E731
    if not any(inside(b) for b in budgets_bpw):
        raise ConversionError(f"no budget in the sweep is feasible: configs {prepared.options.configs!r} span "
                              f"{lowest:.3f} to {highest:.3f} bpw")
    if measure_at is None:
        measure_at = spread([b for b in budgets_bpw if inside(b)], MEASURED_POINTS)
    if heatmap_bpw is None:
        heatmap_bpw = min((b for b in budgets_bpw if inside(b)), key=lambda b: abs(b - HEATMAP_BPW))
    wanted = sorted(set(budgets_bpw) | set(measure_at) | {heatmap_bpw})
    feasible = [b for b in wanted if inside(b)]
    rows_index = np.arange(len(table.names))
    solved, solve_seconds = {}, []
    for bpw in feasible:  # the sweep proper: one MILP per budget on the cached table
        budget = int(math.floor(bpw * numel / 8 + 1e-9))  # as pipeline._solve
        stage = time.perf_counter()
        choice = allocate(table.costs, table.weighted, budget, rel_gap=PREDICTION_GAP)
        solve_seconds.append(time.perf_counter() - stage)
        solved[bpw] = (budget, choice, solve_seconds[-1],
                       predicted_increase(float(table.weighted[rows_index, choice].sum()), calibration))
    seconds["solves"] = sum(solve_seconds)
    log(f"{len(solved)} MILP solves: {seconds['solves']:.2f} s ({1000 * seconds['solves'] / len(solved):.0f} ms "
        f"each, slowest {1000 * max(solve_seconds):.0f} ms)")
    skipped = [b for b in wanted if b not in solved]
    if skipped:
        log(f"skipped (outside the feasible {lowest:.3f}–{highest:.3f} bpw): " + ", ".join(f"{b:g}" for b in skipped))

    measured = {}
    stage = time.perf_counter()
    for bpw in [b for b in measure_at if b in solved]:
        # a file measured only is written under a private name: never over (then deleting) a file of the user's
        name = f"mxq-{bpw:g}bpw.mxq" if keep_files else f".mxq-{bpw:g}bpw-{secrets.token_hex(8)}.measured.mxq"
        path = out_dir / name
        try:
            report = convert_at(prepared, solved[bpw][0], path, progress)
            loss = file_loss(path, evaluation)
        finally:
            if not keep_files:
                path.unlink(missing_ok=True)
        measured[bpw] = (loss, report.file_bytes)
        log(f"{bpw:g} bpw: {report.file_bytes:,} bytes, predicted {100 * solved[bpw][3] / fp_loss:+.2f}%, measured "
            f"{100 * (loss['nll'] - fp_loss) / fp_loss:+.2f}% (ppl {loss['ppl']:.3f})")
    seconds["convert + measure"] = time.perf_counter() - stage
    positive = [b for b in measured if measured[b][0]["nll"] > fp_loss]  # below the fp loss: noise, no scale
    scale = calibrated_scale([solved[b][3] for b in positive], [measured[b][0]["nll"] - fp_loss for b in positive])

    rows = []
    for bpw in [b for b in sorted(set(budgets_bpw) | set(measured)) if b in solved]:
        budget, choice, solve_time, predicted = solved[bpw]
        loss, file_bytes = measured.get(bpw, (None, None))
        expected = predicted * (scale if scale is not None else 1.0)
        rows.append({
            "bpw": bpw, "budget_bytes": budget, "solve_seconds": round(solve_time, 4),
            "predicted_nats": predicted, "predicted_pct": 100 * predicted / fp_loss,
            "calibrated_pct": None if scale is None else 100 * expected / fp_loss,
            "predicted_ppl": math.exp(fp_loss + expected),
            "measured_nll": None if loss is None else loss["nll"],
            "measured_pct": None if loss is None else 100 * (loss["nll"] - fp_loss) / fp_loss,
            "measured_ppl": None if loss is None else loss["ppl"], "file_bytes": file_bytes, "fp_ppl": fp["ppl"]})
    paths = {"csv": str(out_dir / "sweep.csv")}
    staged = temp_path(out_dir / "sweep.csv")
    try:  # written whole or not at all
        with open(staged, "w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row[k] is None else f"{row[k]:.10g}" if isinstance(row[k], float)
                                     else row[k]) for k in CSV_FIELDS})
        os.replace(staged, paths["csv"])
    finally:
        staged.unlink(missing_ok=True)
    paths.update(_plots(out_dir, Path(hf_dir).resolve().name, rows, evaluation, scale, table, solved, heatmap_bpw,
                        log))
    seconds["total"] = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "paths": paths, "scale": scale, "fp": fp}


def _plots(out_dir, model_name, rows, evaluation, scale, table, solved, heatmap_bpw, log) -> dict:
    from .. import plot

    paths = {}
    calibrated = f"; measured/predicted ×{scale:.2f}" if scale is not None else ""
    try:
        paths["plot"] = plot.frontier(rows, out_dir / "sweep.png",
                                      f"{model_name}: predicted (Fisher) and measured loss on {evaluation.name}"
                                      f"{calibrated}")
        if heatmap_bpw in solved:
            entries = heatmap_entries(table, solved[heatmap_bpw][1])
            bpw = 8.0 * table.costs[np.arange(len(table.names)), solved[heatmap_bpw][1]].sum() / table.numel.sum()
            paths["heatmap"] = plot.heatmap(entries, out_dir / f"heatmap-{heatmap_bpw:g}bpw.png",
                                            f"{model_name} at {heatmap_bpw:g} bpw (achieved {bpw:.3f} over decoder "
                                            "linears): bits per weight of each matrix")
    except plot.PlotUnavailable as error:
        log(f"plots skipped: {error}")
    return paths


def _floats(text: str, option: str) -> list[float]:
    from .errors import ConversionError

    if text.strip().lower() == "none":
        return []
    try:
        values = [round(float(part), 6) for part in text.split(",") if part.strip()]
    except ValueError:
        values = [math.nan]
    if not all(0 < v < math.inf for v in values):  # nan, inf and negatives too
        raise ConversionError(f"{option} {text!r:.60}: expected comma-separated positive numbers, e.g. 3,4.25,6")
    return values


SWEEP_HELP = """The size/quality frontier of the Hugging Face checkpoint HF_DIR, from one measurement.

\b
Calibration and the error table are computed once (and cached, as for `mxq convert`); every budget
from --from to --to in --step is then one MILP solve, and its loss increase is predicted with the
Fisher estimate (Σ F·ΔW² ≈ 2 × the loss increase). A few budgets (--measure-at) are converted and
measured with the runtime (CPU), next to the fp16 model, on held-out calibration text (the tokens
after the calibrated ones; never your evaluation text) or on --text FILE.

\b
Writes into -o DIR: sweep.csv (every budget: predicted, and measured where measured),
sweep.png (loss increase and perplexity against bpw) and heatmap-<bpw>.png (bits per weight of
every layer × module at --heatmap-bpw). Plots need matplotlib: pip install 'mxq[plot]'.

\b
Examples:
  mxq sweep ./SmolLM2-135M --from 2.5 --to 8 --step 0.25 -o smol-sweep
  mxq sweep ./SmolLM2-135M --measure-at 3,4.25,6 --text wikitext2-test.txt --ctx 2048 --max-chunks 16
"""


@click.command("sweep", help=SWEEP_HELP)
@click.argument("hf_dir", type=click.Path())
@click.option("-o", "--output", "out_dir", default="mxq-sweep", show_default=True, type=click.Path(file_okay=False),
              help="Directory for sweep.csv, sweep.png and the heatmap.")
@click.option("--from", "start", type=float, default=2.5, show_default=True, help="Smallest budget (bpw).")
@click.option("--to", "stop", type=float, default=8.0, show_default=True, help="Largest budget (bpw).")
@click.option("--step", type=float, default=0.25, show_default=True, help="Budget step (bpw).")
@click.option("--measure-at", "measure_text", default=None,
              help=f"Budgets (bpw, comma-separated) to convert and measure, or 'none'  [default: "
                   f"{MEASURED_POINTS} spread over the sweep].")
@click.option("--heatmap-bpw", type=float, default=None,
              help=f"Budget whose allocation heatmap is drawn  [default: the swept budget nearest {HEATMAP_BPW:g}].")
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Measure on this UTF-8 text (e.g. WikiText-2 test) instead of held-out calibration text.")
@click.option("--ctx", type=click.IntRange(min=2), default=2048, show_default=True,
              help="With --text: tokens per chunk (as `mxq eval`).")
@click.option("--max-chunks", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --text: score the first M chunks.")
@click.option("--keep-files", is_flag=True, help="Keep the measured .mxq files in DIR.")
@click.option("--configs", default=default("configs"), show_default=True, help="Candidate configs (as `mxq convert`; here `auto` is always `all`: loss "
              "prediction takes no shared codebooks).")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default=default("quantizer"),
              show_default=True, help="Quantizer (as `mxq convert`).")
@click.option("--row-blocks", type=click.IntRange(min=1, max=MAX_ROW_BLOCKS), default=default("row_blocks"),
              show_default=True, help="Row blocks per matrix (as `mxq convert`).")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text (as `mxq convert`).")
@click.option("--calib-tokens", type=int, default=default("calib_tokens"), show_default=True,
              help="Calibration tokens; held-out text starts after them.")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where measured errors are cached.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the error cache.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Threads for quantization.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def sweep_command(hf_dir, out_dir, start, stop, step, measure_text, heatmap_bpw, text_path, ctx, max_chunks,
                  keep_files, configs, quantizer, row_blocks, calib, calib_tokens, cache_dir, no_cache, jobs, quiet):
    from tqdm import tqdm

    from ..runtime.commands import read_text_file
    from .options import ConvertOptions

    budgets = grid(start, stop, step)
    measure_at = None if measure_text is None else _floats(measure_text, "--measure-at")
    if heatmap_bpw is not None and not 0 < heatmap_bpw < math.inf:
        from .errors import ConversionError
        raise ConversionError(f"--heatmap-bpw {heatmap_bpw}: expected a positive number")
    text = read_text_file(text_path, "--text") if text_path else None
    options = ConvertOptions(bpw=8.0, configs=configs, quantizer=quantizer, row_blocks=row_blocks, calib=calib, calib_tokens=calib_tokens,
                             cache_dir=None if no_cache else (cache_dir or "default"), jobs=jobs)
    options.validate()  # bpw is a placeholder: every budget of the sweep replaces it
    progress = None if quiet else (lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, **kw))
    result = sweep(hf_dir, out_dir, options, budgets, measure_at, heatmap_bpw, text, ctx, max_chunks, keep_files,
                   progress, log=lambda line: click.echo(line), text_name=text_path and Path(text_path).name)
    click.echo("seconds: " + ", ".join(f"{stage} {t:.1f}" for stage, t in result["seconds"].items()))
    for kind, path in result["paths"].items():
        click.echo(f"wrote {path}")
