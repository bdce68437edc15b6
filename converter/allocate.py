"""Choose one config per matrix: a multiple-choice knapsack solved as a MILP with HiGHS.

    minimize   Σ_i Σ_c error[i,c] · x[i,c]
    subject to Σ_c x[i,c] = 1                 for every matrix i
               Σ_i Σ_c cost[i,c] · x[i,c] ≤ budget   (bytes)
               x[i,c] ∈ {0, 1}

Configs that another config of the same matrix beats on both cost and error are dropped first:
they can never be in an optimal solution, and the problem shrinks. A greedy solution (best error
drop per byte) is handed to HiGHS as the first incumbent. The solution is optimal to a relative
gap of 1e-6 of the objective, far below the noise of any error measure; tools/bench_allocate.py
times a 70B-shaped instance.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .errors import ConversionError


def pareto_mask(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """(N, C) bool: True where config c of matrix i is not dominated by another config of i."""
    n, c = costs.shape
    keep = np.ones((n, c), dtype=bool)
    for j in range(c):
        no_costlier = costs <= costs[:, j:j + 1]
        no_worse = errors <= errors[:, j:j + 1]
        strictly = (costs < costs[:, j:j + 1]) | (errors < errors[:, j:j + 1])
        dominated = (no_costlier & no_worse & strictly).any(axis=1)
        # among exact duplicates keep the first
        duplicate = ((costs == costs[:, j:j + 1]) & (errors == errors[:, j:j + 1]))[:, :j].any(axis=1)
        keep[:, j] = ~dominated & ~duplicate
    return keep


def greedy(costs: np.ndarray, errors: np.ndarray, budget: int) -> np.ndarray:
    """A feasible start: cheapest configs, then upgrades by best error drop per byte while they fit."""
    n = costs.shape[0]
    rows = np.arange(n)
    choice = costs.argmin(axis=1)
    spent = int(costs[rows, choice].sum())
    while True:
        extra = costs - costs[rows, choice][:, None]
        gain = (errors[rows, choice][:, None] - errors) / np.maximum(extra, 1)
        gain[(extra <= 0) | (spent + extra > budget)] = -np.inf
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if not np.isfinite(gain[i, j]) or gain[i, j] <= 0:
            return choice
        spent += int(extra[i, j])
        choice[i] = j


def allocate(costs: np.ndarray, errors: np.ndarray, budget: int, time_limit: float = 60.0,
             rel_gap: float = 1e-6) -> np.ndarray:
    """Index of the chosen config for each matrix (N,), optimal for the MILP above."""
    import highspy

    costs = np.asarray(costs, dtype=np.int64)
    errors = np.asarray(errors, dtype=np.float64)
    n, c = costs.shape
    lowest, highest = int(costs.min(axis=1).sum()), int(costs.max(axis=1).sum())
    if budget < lowest:
        raise ConversionError(f"budget of {budget:,} bytes is infeasible: the smallest configs need {lowest:,} bytes")
    keep = pareto_mask(costs, errors)
    rows, cols = np.nonzero(keep)  # candidate variables, grouped by matrix
    var_cost = costs[rows, cols].astype(np.float64)
    scale = max(float(np.abs(errors[rows, cols]).max()), 1e-300)
    var_error = errors[rows, cols] / scale  # objective scaled to O(1) for the solver's tolerances

    with _stdout_silenced():  # HiGHS ≥ 1.16 prints its banner to stdout on construction, before any option
        highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("mip_rel_gap", rel_gap)
    highs.setOptionValue("mip_abs_gap", 0.0)
    highs.setOptionValue("time_limit", float(time_limit))
    highs.setOptionValue("threads", 1)
    highs.setOptionValue("random_seed", 0)
    lp = highspy.HighsLp()
    nvars = rows.size
    lp.num_col_, lp.num_row_ = nvars, n + 1
    lp.col_cost_ = var_error
    lp.col_lower_ = np.zeros(nvars)
    lp.col_upper_ = np.ones(nvars)
    lp.row_lower_ = np.concatenate([np.ones(n), [-highspy.kHighsInf]])
    lp.row_upper_ = np.concatenate([np.ones(n), [float(budget)]])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, 2 * nvars + 1, 2, dtype=np.int32)
    index = np.empty(2 * nvars, dtype=np.int32)
    index[0::2], index[1::2] = rows, n
    value = np.empty(2 * nvars)
    value[0::2], value[1::2] = 1.0, var_cost
    lp.a_matrix_.index_, lp.a_matrix_.value_ = index, value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nvars
    highs.passModel(lp)
    start = greedy(costs, errors, budget)  # an incumbent lets branch and bound prune from the start
    highs.setSolution(_solution(highspy, rows, cols, start))
    highs.run()
    status = highs.getModelStatus()
    if status == highspy.HighsModelStatus.kTimeLimit and highs.getInfo().mip_gap < 1e-3:
        status = highspy.HighsModelStatus.kOptimal  # near-optimal within the time limit: accept
    if status != highspy.HighsModelStatus.kOptimal:
        raise ConversionError(f"allocation MILP ended with status {highs.modelStatusToString(status)}")
    x = np.asarray(highs.getSolution().col_value) > 0.5
    choice = np.full(n, -1, dtype=np.int64)
    choice[rows[x]] = cols[x]
    if (choice < 0).any() or int(costs[np.arange(n), choice].sum()) > budget:
        raise ConversionError("allocation MILP returned an invalid solution")
    return choice


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 points at /dev/null inside (C++ code writes there, past sys.stdout)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solution(highspy, rows, cols, start):
    solution = highspy.HighsSolution()
    solution.col_value = (cols == start[rows]).astype(np.float64).tolist()
    solution.value_valid = True
    return solution
