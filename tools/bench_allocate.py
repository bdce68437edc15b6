"""MILP solve time for a 70B-shaped allocation problem (560 matrices × 12 configs, the paper's set).

    python tools/bench_allocate.py [--repeats 3]

Shapes are Llama-2-70B's decoder linears (80 layers × q,k,v,o,gate,up,down); costs come from the
real cost model; errors are synthetic but shaped like measured ones (‖W‖ · 2^-b, worse for larger
groups, with per-matrix noise). Prints solve time per budget and the ratio to a greedy
(marginal-error-per-byte) heuristic measured in the same run, plus the MILP's objective advantage.
"""
import argparse
import time

import numpy as np

from mxq.converter.allocate import allocate, greedy
from mxq.converter.candidates import PRESETS, parse_candidates
from mxq.format_spec import tensor_nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hidden, inter, kv = 8192, 28672, 1024
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)] * 80
    candidates = parse_candidates(",".join(PRESETS["paper"]))
    costs = np.array([[tensor_nbytes(s, c.storage(s)) for c in candidates] for s in shapes], dtype=np.int64)
    rng = np.random.default_rng(0)
    norms = np.sqrt([s[0] * s[1] for s in shapes]) * rng.uniform(0.5, 2.0, len(shapes))
    bits = np.array([c.bits for c in candidates])
    groups = np.array([c.group_size for c in candidates])
    errors = norms[:, None] * 2.0 ** -bits[None] * (1 + 0.15 * np.log2(groups / 32))[None] \
        * rng.uniform(0.8, 1.25, (len(shapes), len(candidates)))
    numel = sum(s[0] * s[1] for s in shapes)
    print(f"problem: {len(shapes)} matrices × {len(candidates)} configs ({numel / 1e9:.1f}B weights)")
    for bpw in (2.5, 3.0, 3.5, 4.25, 5.0, 6.5):
        budget = int(bpw * numel / 8)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            choice = allocate(costs, errors, budget)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        heuristic = greedy(costs, errors, budget)
        greedy_time = time.perf_counter() - started
        rows = np.arange(len(shapes))
        milp_err, greedy_err = errors[rows, choice].sum(), errors[rows, heuristic].sum()
        print(f"bpw {bpw:4}: MILP {min(times):.3f} s (best of {args.repeats}), greedy {greedy_time:.3f} s, "
              f"time ratio {min(times) / greedy_time:.2f}x; objective greedy/MILP {greedy_err / milp_err:.5f}; "
              f"achieved {8 * costs[rows, choice].sum() / numel:.4f} bpw")


if __name__ == "__main__":
    main()
