"""A file's decode products and attention on the thread team (cpu_team.py) against the calling thread alone.

    python tools/bench_team.py model.mxq [--positions 150,500] [--rounds 5] [--json]

For every kind of decode product of the file's decoder layers (q/k/v, o, gate/up, down: one compiled
stack call each, cpu_stack.py), the stack kernels are called as decode calls them, cycling through all
layers so that each call reads its weights from memory: the serial kernel and the team kernel
(NumpyBackend.run_team, as decode runs it) alternately in every round, best of --rounds rounds each.
Then decode attention of one layer at each of --positions cached positions, serial and on the team.
Printed: µs per call and the team's speed-up (serial ÷ team), both measured in the same run (this VM
drifts over minutes: only the ratio compares across runs).
Needs the compiled kernels and MXQ_THREADS ≥ 2 (the default on a machine with 2 or more cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package


def paired_us(serial, teamed, rounds: int, repeat: int) -> tuple[float, float]:
    """Best over rounds of the mean µs per call of the `serial` and the `teamed` calls (lists of no-argument
    functions, each run `repeat` times per round), the two measured alternately in every round."""
    def mean_us(calls) -> float:
        t0 = time.perf_counter()
        for _ in range(repeat):
            for call in calls:
                call()
        return (time.perf_counter() - t0) / (repeat * len(calls)) * 1e6

    for call in serial + teamed:
        call()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, calls in enumerate((serial, teamed)):
            best[i] = min(best[i], mean_us(calls))
    return best[0], best[1]


def product_calls(lm, members_of):
    """(serial calls, team calls): one per layer, the stack of members_of(layer) multiplying a random x."""
    import numpy as np

    from mxq.runtime.backends.cpu_weights import kernel_extras

    be = lm.backend
    kernels = be.team_kernels
    serial, teamed = [], []
    for layer in lm.model.layers:
        stack = be.stack(members_of(layer), 1)
        if stack is None:
            return None  # some member is not affine throughout: multiplied one by one, not as a stack
        x = np.random.default_rng(0).standard_normal((1, stack.shape[1])).astype(np.float32)
        y = np.empty((1, stack.shape[0]), np.float32)
        args = (x, stack.table, stack.out_rows, *kernel_extras(None, None), y)
        parts = be.team_parts(stack.shape[0])
        serial.append(lambda args=args: kernels.stack_matmul_serial(*args, 1))
        teamed.append(lambda args=args, parts=parts: be.run_team(kernels.stack_matmul_team, *args, parts))
    return serial, teamed


def attention_calls(lm, positions: int):
    """(serial call, team call) of decode attention of layer 0 with `positions` cached positions."""
    import numpy as np

    c, be = lm.config, lm.backend
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((c.num_key_value_heads, positions + 1, c.head_dim)).astype(np.float32)
    vc = rng.standard_normal(kc.shape).astype(np.float32)
    q = rng.standard_normal((1, c.num_attention_heads * c.head_dim)).astype(np.float32)
    out = np.empty_like(q)
    args = (q, kc, vc, positions, np.float32(c.head_dim ** -0.5), -1, out)  # any scale times the same
    return (lambda: be.ops.attention_serial(*args, 1),
            lambda: be.run_team(be.team_kernels.attention_team, *args, op=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help=".mxq file")
    ap.add_argument("--positions", default="150,500", help="cached positions of the attention calls")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    import mxq

    lm = mxq.load(args.file)
    be = lm.backend
    if be.team is None:
        sys.exit("bench_team: needs the compiled kernels and at least 2 threads (MXQ_THREADS)")
    kinds = {"q/k/v": lambda w: (w.q, w.k, w.v), "o": lambda w: (w.o,), "gate/up": lambda w: (w.gate, w.up),
             "down": lambda w: (w.down,)}
    rows = []
    for kind, members_of in kinds.items():
        calls = product_calls(lm, members_of)
        if calls is None:
            continue
        s_us, t_us = paired_us(*calls, args.rounds, 20)
        rows.append({"call": f"{kind} stack", "serial_us": s_us, "team_us": t_us})
    for positions in map(int, args.positions.split(",")):
        serial, teamed = attention_calls(lm, positions)
        s_us, t_us = paired_us([serial], [teamed], args.rounds, 500)
        rows.append({"call": f"attention @{positions}", "serial_us": s_us, "team_us": t_us})
    if args.json:
        print(json.dumps({"file": args.file, "threads": be.threads, "rows": rows}, indent=1))
        return
    print(f"{args.file}: {len(lm.model.layers)} layers; team of {be.team.size} threads; best of {args.rounds} rounds")
    print(f"{'call':<16} {'serial µs':>10} {'team µs':>9} {'speed-up':>9}")
    for r in rows:
        print(f"{r['call']:<16} {r['serial_us']:>10.1f} {r['team_us']:>9.1f} {r['serial_us'] / r['team_us']:>8.2f}x")


if __name__ == "__main__":
    main()
