"""Speed of the trellis quantizer's Viterbi (converter/trellis.py) against the textbook scan in window order it
replaced, both compiled by Numba and measured in one run on the same rows.

    python tools/bench_viterbi.py [--K 2,3,4,5] [--cols 2048] [--rows 4] [--rounds 5]

Per K: `rows` random rows of `cols` weights (Gaussian weights, importance uniform in [0.1, 2], scale 1) and a
random Gaussian table of 4096 levels. Both walks run on one thread, one row at a time; first they are checked
to pick the same windows (the tool stops if not), then timed alternately over --rounds rounds, the median per
kind. Columns: µs per weight (one Viterbi pass over one weight: 2^12 states) and the speed-up over the scan.
A conversion spends most of a trellis candidate's time here: PASSES passes per row measured or written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package

import numba  # noqa: E402
import numpy as np  # noqa: E402

from mxq.format_spec.layout import TRELLIS_WINDOW_BITS as WINDOW_BITS  # noqa: E402


@numba.njit(cache=True)
def scan_row(w, f, s, table, bits, out):
    """The textbook Viterbi in window order (the converter's up to 2026-12-05): for each predecessor tail the
    least over its 2^K windows, then each window's cost = that least + its error, windows 0..4095 in turn."""
    n, states, heads = len(w), 1 << WINDOW_BITS, 1 << bits
    tails = 1 << (WINDOW_BITS - bits)
    cost = np.empty(states)
    best_tail = np.empty(tails)
    back = np.empty((n, tails), np.int8)
    for state in range(states):
        d = w[0] - s[0] * table[state]
        cost[state] = f[0] * d * d
    for t in range(1, n):
        for tail in range(tails):
            best, best_low = np.inf, 0
            base = tail << bits
            for low in range(heads):
                c = cost[base | low]
                if c < best:
                    best, best_low = c, low
            best_tail[tail] = best
            back[t, tail] = best_low
        for state in range(states):
            d = w[t] - s[t] * table[state]
            cost[state] = best_tail[state & (tails - 1)] + f[t] * d * d
    state = np.argmin(cost)
    out[n - 1] = state
    for t in range(n - 1, 0, -1):
        tail = state & (tails - 1)
        state = (tail << bits) | back[t, tail]
        out[t - 1] = state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", default="2,3,4,5", help="bits per weight to time (comma-separated)")
    parser.add_argument("--cols", type=int, default=2048, help="weights per row")
    parser.add_argument("--rows", type=int, default=4, help="rows per timed call")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    args = parser.parse_args(argv)
    from mxq.converter.trellis import _viterbi_row

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    table = rng.standard_normal(1 << WINDOW_BITS)
    print(f"{'K':>2} {'scan µs/weight':>15} {'converter µs/weight':>20} {'speed-up':>9}")
    for bits in (int(k) for k in args.K.split(",")):
        w = rng.standard_normal((args.rows, args.cols))
        f, s = rng.uniform(0.1, 2.0, w.shape), np.ones_like(w)
        outs = {kind: np.empty(w.shape, np.int32) for kind in ("scan", "converter")}
        kinds = {"scan": scan_row, "converter": _viterbi_row}

        def run(kind):
            start = time.perf_counter()
            for r in range(args.rows):
                kinds[kind](w[r], f[r], s[r], table, bits, outs[kind][r])
            return (time.perf_counter() - start) / w.size * 1e6

        run("scan"), run("converter")
        if not np.array_equal(outs["scan"], outs["converter"]):
            sys.exit(f"K = {bits}: the converter's walk differs from the scan's")
        times = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                times[kind].append(run(kind))
        scan, ours = statistics.median(times["scan"]), statistics.median(times["converter"])
        print(f"{bits:>2} {scan:>15.2f} {ours:>20.2f} {scan / ours:>8.2f}×")


if __name__ == "__main__":
    main()
