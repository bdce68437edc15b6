import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mxq.converter.allocate import allocate, pareto_mask
from mxq.converter.errors import ConversionError


def brute_force(costs, errors, budget):
    n, c = costs.shape
    best = None
    for combo in itertools.product(range(c), repeat=n):
        rows = np.arange(n)
        if costs[rows, combo].sum() <= budget:
            value = errors[rows, combo].sum()
            best = value if best is None or value < best else best
    return best


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 4), seed=st.integers(0, 10**6), slack=st.floats(0, 1))
def test_milp_is_optimal_against_brute_force(n, c, seed, slack):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 60, size=(n, c))
    errors = rng.random((n, c)) * rng.choice([1e-6, 1.0, 1e3])
    low, high = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    budget = int(low + slack * (high - low))
    choice = allocate(costs, errors, budget)
    rows = np.arange(n)
    assert costs[rows, choice].sum() <= budget
    assert errors[rows, choice].sum() == pytest.approx(brute_force(costs, errors, budget), rel=1e-6, abs=1e-15)


def test_milp_matches_dynamic_programming_on_a_larger_instance():
    """A 12-matrix × 6-config instance (too big to enumerate) checked by exact DP over integer costs."""
    rng = np.random.default_rng(3)
    n, c = 12, 6
    costs = rng.integers(5, 40, size=(n, c))
    errors = rng.random((n, c))
    budget = int(costs.min(axis=1).sum() + 0.4 * (costs.max(axis=1).sum() - costs.min(axis=1).sum()))
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    for i in range(n):
        nxt = np.full(budget + 1, np.inf)
        for j in range(c):
            w = costs[i, j]
            nxt[w:] = np.minimum(nxt[w:], best[: budget + 1 - w] + errors[i, j])
        best = nxt
    choice = allocate(costs, errors, budget)
    assert errors[np.arange(n), choice].sum() == pytest.approx(best.min(), rel=1e-6)


def test_infeasible_budget_is_a_clear_error():
    with pytest.raises(ConversionError, match="infeasible"):
        allocate(np.array([[10, 20]]), np.array([[1.0, 0.5]]), 9)


def test_pareto_mask_drops_dominated_configs():
    costs = np.array([[10, 20, 20, 30]])
    errors = np.array([[5.0, 3.0, 4.0, 3.0]])
    assert pareto_mask(costs, errors).tolist() == [[True, True, False, False]]
