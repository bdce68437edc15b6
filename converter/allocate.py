"""Choose one config per matrix: a multiple-choice knapsack solved as a MILP with HiGHS.

    minimize   Σ_i Σ_c error[i,c] · x[i,c]
    subject to Σ_c x[i,c] = 1                 for every matrix i
               Σ_i Σ_c cost[i,c] · x[i,c] ≤ budget   (bytes)
               x[i,c] ∈ {0, 1}

Configs that another config of the same matrix beats on both cost and error are dropped first:
they can never be in an optimal solution, and the problem shrinks.
"""
from __future__ import annotations

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


def allocate(costs: np.ndarray, errors: np.ndarray, budget: int, time_limit: float = 60.0) -> np.ndarray:
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

    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("mip_rel_gap", 1e-9)
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
    highs.run()
    status = highs.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise ConversionError(f"allocation MILP ended with status {highs.modelStatusToString(status)}")
    x = np.asarray(highs.getSolution().col_value) > 0.5
    choice = np.full(n, -1, dtype=np.int64)
    choice[rows[x]] = cols[x]
    if (choice < 0).any() or int(costs[np.arange(n), choice].sum()) > budget:
        raise ConversionError("allocation MILP returned an invalid solution")
    return choice
