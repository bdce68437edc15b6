"""`mxq convert --max-loss P%`: the smallest file whose loss increase on held-out calibration text is at most
P% of the fp model's loss there.

    prepare (calibrate + measure, both cached)
    fp reference: the fp16 file's loss on the held-out tokens (runtime, cached)        converter/prediction.py
    round r:  k·predicted(allocation) ≤ target  →  smallest budget (bisection over MILP solves)
              → convert at that budget → the runtime measures the file's held-out loss
              → k = measured / predicted of this file (the Fisher estimate's scale, checked)

The Fisher estimate (Σ F·ΔW² / 2) is second order and diagonal, so its scale is only roughly right; every
round measures the file it wrote and rescales the prediction by measured/predicted before the next solve.
A round's file that meets the target measured is a candidate; the result is the smallest candidate. Rounds
stop when the last file meets the target with less than SLACK of it to spare (a smaller file would likely
miss), when the next budget was tried already, or after MAX_ROUNDS files. If no file met the target, the one
with the lowest measured loss is written and the report says by how much it missed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..runtime.perplexity import Z95, paired_difference
from .errors import ConversionError
from .prediction import (convert_at, file_choice, file_loss, fp_reference, heldout, predicted_increase, prepare,
                         scored_tokens, smallest_budget, workdir_for)

MAX_ROUNDS = 4  # files converted and measured at most
SLACK = 0.75  # a file measured at ≥ SLACK × target is close enough: stop searching for a smaller one
BPW_RESOLUTION = 0.005  # the budget search stops when its bracket is this narrow (bits per decoder-linear weight)


@dataclass
class Round:
    budget: int  # decoder-linear bytes
    bpw: float  # achieved over the decoder linears
    file_bytes: int
    scale: float  # k the prediction was multiplied by when this budget was solved
    predicted: float  # Fisher-predicted mean loss increase of the written file (nats per token, unscaled)
    measured: float  # runtime-measured mean loss increase on the held-out tokens (nats per token)
    measured_se: float | None  # its standard error over the held-out chunks (paired with the fp16 file's)
    path: str
    report: object  # pipeline.Report

    def line(self, fp_loss: float, target: float) -> str:
        pct = lambda nats: 100.0 * nats / fp_loss  # noqa: E731
        verdict = ("meets the target" if self.measured <= target else
                   f"MISSES the target by {pct(self.measured - target):.2f} points")
        low, high = self.measured_95()
        spread = "" if low is None else f" (95%: {pct(low):+.2f}% to {pct(high):+.2f}%)"
        return (f"{self.bpw:.3f} bpw, {self.file_bytes:,} bytes: predicted {pct(self.predicted):+.2f}% "
                f"(scaled ×{self.scale:.3g}: {pct(self.scale * self.predicted):+.2f}%), measured "
                f"{pct(self.measured):+.2f}%{spread}: {verdict}")

    def measured_95(self) -> tuple:
        """The measured increase's 95% interval (nats per token), (None, None) with one held-out chunk."""
        if self.measured_se is None:
            return None, None
        return self.measured - Z95 * self.measured_se, self.measured + Z95 * self.measured_se


def convert_max_loss(hf_dir, out_path, options, progress=None):
    """Write the smallest file predicted and checked to stay within options.max_loss percent (see above);
    returns the chosen file's pipeline.Report with the rounds in its notes."""
    started = time.perf_counter()
    prepared = prepare(hf_dir, options, progress)
    table, calibration = prepared.table, prepared.calibration
    rows = np.arange(len(table.names))
    evaluation = heldout(prepared)
    resolution = max(1, int(BPW_RESOLUTION * int(table.numel.sum()) / 8))
    with workdir_for(out_path) as workdir:
        stage = time.perf_counter()
        fp = fp_reference(prepared, evaluation, workdir)
        fp_loss = fp["nll"]
        reference_seconds = time.perf_counter() - stage
        target = options.max_loss / 100.0 * fp_loss  # nats per token
        rounds, scale, unreachable = [], 1.0, None
        for r in range(MAX_ROUNDS):
            limit = target / scale * 2.0 * scored_tokens(calibration)  # in Σ F·ΔW² units
            try:
                budget, _ = smallest_budget(table.costs, table.weighted, limit, resolution)
            except ConversionError as error:
                if not rounds:
                    raise
                unreachable = f"round {r + 1} not tried: after rescaling, {error}"
                break
            if any(done.budget == budget for done in rounds):
                break
            path = os.path.join(workdir, f"round{r}.mxq")
            report = convert_at(prepared, budget, path, progress)
            choice = file_choice(prepared, path)  # what the file stores, not what we asked for
            predicted = predicted_increase(float(table.weighted[rows, choice].sum()), calibration)
            measured, measured_se = paired_difference(file_loss(path, evaluation), fp)  # same held-out chunks
            rounds.append(Round(budget, report.achieved_bpw, report.file_bytes, scale, predicted, measured,
                                measured_se, path, report))
            if SLACK * target <= measured <= target:
                break
            scale = max(measured, 0.01 * predicted) / predicted  # measured ≤ 0 (noise): a floor, not a sign flip
        met = [done for done in rounds if done.measured <= target]
        chosen = min(met, key=lambda done: done.file_bytes) if met else min(rounds, key=lambda done: done.measured)
        os.replace(chosen.path, out_path)
    report = chosen.report
    report.path = str(out_path)
    report.budget = {"max_loss_percent": options.max_loss, "bpw": round(chosen.bpw, 6)}
    report.seconds = {**prepared.seconds, "fp reference": reference_seconds,
                      "rounds": time.perf_counter() - started - sum(prepared.seconds.values()) - reference_seconds,
                      "total": time.perf_counter() - started}
    measured_on = (f"held-out calibration text: {len(evaluation.ids):,} tokens after the {calibration.tokens:,} "
                   f"calibrated on, {evaluation.ctx}-token chunks; fp16 loss {fp_loss:.4f}, target "
                   f"+{options.max_loss:g}% = +{target:.4f} nats")
    lines = [measured_on] + [f"round {i + 1}: {done.line(fp_loss, target)}" for i, done in enumerate(rounds)]
    verdict = (f"chose round {rounds.index(chosen) + 1}: the smallest file that meets the target measured" if met else
               f"NO file met the target: wrote the closest (round {rounds.index(chosen) + 1}), "
               f"{100.0 * (chosen.measured - target) / fp_loss:.2f} points over")
    report.notes = prepared.notices + report.notes + lines + ([unreachable] if unreachable else []) + [verdict]
    report.target = {"max_loss_percent": options.max_loss, "fp_loss": fp_loss, "heldout_tokens": len(evaluation.ids),
                     "met": bool(met), "rounds": [{"bpw": d.bpw, "file_bytes": d.file_bytes, "scale": d.scale,
                                                   "predicted_pct": 100 * d.predicted / fp_loss,
                                                   "measured_pct": 100 * d.measured / fp_loss,
                                                   "measured_pct_95": [None if x is None else 100 * x / fp_loss
                                                                       for x in d.measured_95()]} for d in rounds],
                     "chosen": rounds.index(chosen)}
    return report
