"""A file's decode products and attention on the thread team (cpu_team.py) against the calling thread alone.

    python tools/bench_team.py model.mxq [--positions 150,500] [--rounds 5] [--json]

The decode products of the file's decoder layers (q/k/v, o, gate/up, down: one compiled stack call each,
cpu_stack.py) are called as decode calls them: layer after layer, the four stacks of each in turn, so
that every call reads its weights from memory (one kind's stacks of all layers may fit the last-level
cache: SmolLM2's 30 q/k/v stacks are 7.9 MiB, and cycling them alone measured them at half their decode
time). Each call is timed and counted to its kind. A round runs all layers with the serial kernels, then
all with the team kernels (NumpyBackend.run_team, as decode runs it); the best of --rounds rounds each.
Then the lm_head product of one token, and decode attention of one layer at each of --positions cached
positions, serial and on the team.
Printed: µs per call and the team's speed-up (serial ÷ team), both measured in the same run (this VM
drifts over minutes: only the ratio compares across runs), and a layer's four stacks together. With
--baseline another build's kernels (e.g. of the commit before a kernel change) run the same stacks in the
same rounds (stacks, head and attention): a kernel change compared in one process.
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


def decode_order_us(kinds: dict, rounds: int) -> dict:
    """kind → [µs per mode]: the best over rounds of the mean per call, where kinds maps a kind to its calls
    per mode (lists of no-argument functions, one per layer), and a round runs, mode after mode, layer after
    layer all kinds' calls in turn."""
    n_modes, n_layers = len(next(iter(kinds.values()))), len(next(iter(kinds.values()))[0])
    best = {kind: [float("inf")] * n_modes for kind in kinds}
    for _ in range(rounds + 1):  # the first round warms up
        for mode in range(n_modes):
            total = dict.fromkeys(kinds, 0.0)
            for layer in range(n_layers):
                for kind, calls in kinds.items():
                    t0 = time.perf_counter()
                    calls[mode][layer]()
                    total[kind] += time.perf_counter() - t0
            for kind in kinds:
                best[kind][mode] = min(best[kind][mode], total[kind] / n_layers * 1e6)
    return best


def product_calls(lm, members_of, kernels, run_team):
    """(serial calls, team calls): one per layer, the stack of members_of(layer) multiplying a random x with
    `kernels` (a build's stack_matmul_serial and stack_matmul_team), the team ones through run_team(kernel,
    *args) (the loaded build: NumpyBackend.run_team, as decode runs them)."""
    be = lm.backend
    stacks = [be.stack(members_of(layer), 1) for layer in lm.model.layers]
    if any(stack is None for stack in stacks):
        return None  # some member is not affine throughout: multiplied one by one, not as a stack
    pairs = [stack_calls(be, stack, kernels, run_team) for stack in stacks]
    return [serial for serial, _ in pairs], [teamed for _, teamed in pairs]


def stack_calls(be, stack, kernels, run_team):
    """(serial call, team call) of one KernelStack multiplying a random token with `kernels`."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, stack.shape[1])).astype(np.float32)
    args = stack.kernel_args(x, None, None, np.empty((1, stack.shape[0]), np.float32))
    parts = be.team_parts(stack.shape[0])  # on the team whatever its size (decode: from TEAM_MIN_WEIGHTS)
    return (lambda: kernels.stack_matmul_serial(*args, 1),
            lambda: run_team(kernels.stack_matmul_team, *args, parts))


def head_calls(lm, kernels, run_team):
    """(serial call, team call) of the lm_head product of one token with `kernels` (fp16 head, or an affine one as a
    stack), the team one through run_team; None when the head is neither (a lut head)."""
    import numpy as np

    from mxq.runtime.backends.cpu_weights import DenseWeight, kernel_extras

    be, head = lm.backend, lm.model.lm_head
    stack = be.stack((head,), 1)
    if stack is not None:
        return stack_calls(be, stack, kernels, run_team)
    if isinstance(head, DenseWeight):
        x = np.random.default_rng(0).standard_normal((1, head.shape[1])).astype(np.float32)
        args = (x, head.half_bits, *kernel_extras(None, None), np.empty((1, head.shape[0]), np.float32))
        parts = be.team_parts(head.shape[0])
        return (lambda: kernels.fp16_matmul_serial(*args, 1),
                lambda: run_team(kernels.fp16_matmul_team, *args, parts))
    return None


def load_baseline(path: str, be):
    """(the kernels of another ahead-of-time build at `path`, run_team for them: a Team of its own with as many
    threads as the backend's)."""
    import importlib.util

    from mxq.runtime.backends.cpu_team import Team

    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ops = module  # as cpu_aot's namespace: the per-token ops live in the same module
    team = Team(module, be.team.size - 1)

    def run_team(kernel, *args):
        team.wake()
        return kernel(*args, team.ctrl)

    return module, run_team


def attention_calls(lm, positions: int, kernels, run_team):
    """(serial call, team call) of decode attention of layer 0 with `positions` cached positions, with `kernels`."""
    import numpy as np

    c = lm.config
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((c.num_key_value_heads, positions + 1, c.head_dim)).astype(np.float32)
    vc = rng.standard_normal(kc.shape).astype(np.float32)
    q = rng.standard_normal((1, c.num_attention_heads * c.head_dim)).astype(np.float32)
    out = np.empty_like(q)
    args = (q, kc, vc, positions, np.float32(c.head_dim ** -0.5), -1, out)  # any scale times the same
    return (lambda: kernels.ops.attention_serial(*args, 1),
            lambda: run_team(kernels.attention_team, *args))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help=".mxq file")
    ap.add_argument("--positions", default="150,500", help="cached positions of the attention calls")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--baseline", metavar="SO", help="another ahead-of-time kernel build (a mxq_cpu_*.so of "
                    "$MXQ_CACHE/kernels, built by another checkout whose stack tables and tiles are laid out as "
                    "this one's): its stacks, head and attention are timed in the same rounds, and the ratios printed")
    args = ap.parse_args(argv)

    import mxq

    lm = mxq.load(args.file)
    be = lm.backend
    if be.team is None:
        sys.exit("bench_team: needs the compiled kernels and at least 2 threads (MXQ_THREADS)")
    kinds = {"q/k/v": lambda w: (w.q, w.k, w.v), "o": lambda w: (w.o,), "gate/up": lambda w: (w.gate, w.up),
             "down": lambda w: (w.down,)}
    baseline = load_baseline(args.baseline, be) if args.baseline else None
    rows = []
    calls = {}
    for kind, members_of in kinds.items():
        ours = product_calls(lm, members_of, be.team_kernels, be.run_team)
        if ours is not None:
            calls[kind] = list(ours) + (list(product_calls(lm, members_of, *baseline)) if baseline else [])
    if calls:
        timed = decode_order_us(calls, args.rounds)
        if len(calls) == len(kinds):
            timed["sum of the four"] = [sum(column) for column in zip(*timed.values())]
        for kind, t in timed.items():
            row = {"call": kind if kind.startswith("sum") else f"{kind} stack", "serial_us": t[0], "team_us": t[1]}
            if baseline:
                row.update(baseline_serial_us=t[2], baseline_team_us=t[3])
            rows.append(row)
    builds = [(be.team_kernels, be.run_team)] + ([baseline] if baseline else [])

    def paired_row(call, calls_of, repeat):
        """A row of the calls that calls_of(kernels, run_team) makes, every build's timed in the same rounds."""
        calls = [calls_of(*build) for build in builds]
        if calls[0] is None:
            return
        timed = [paired_us([serial], [teamed], args.rounds, repeat) for serial, teamed in calls]
        row = {"call": call, "serial_us": timed[0][0], "team_us": timed[0][1]}
        if baseline:
            row.update(baseline_serial_us=timed[1][0], baseline_team_us=timed[1][1])
        rows.append(row)

    paired_row("lm_head", lambda kernels, run_team: head_calls(lm, kernels, run_team), 20)
    for positions in map(int, args.positions.split(",")):
        paired_row(f"attention @{positions}",
                   lambda kernels, run_team: attention_calls(lm, positions, kernels, run_team), 500)
    if args.json:
        print(json.dumps({"file": args.file, "threads": be.threads, "rows": rows}, indent=1))
        return
    print(f"{args.file}: {len(lm.model.layers)} layers; team of {be.team.size} threads; best of {args.rounds} rounds")
    print(f"{'call':<16} {'serial µs':>10} {'team µs':>9} {'speed-up':>9}")
    for r in rows:
        print(f"{r['call']:<16} {r['serial_us']:>10.1f} {r['team_us']:>9.1f} {r['serial_us'] / r['team_us']:>8.2f}x")
    if baseline:
        print(f"baseline {args.baseline} (the same calls, its kernels, in the same rounds):")
        print(f"{'call':<16} {'serial µs':>10} {'team µs':>9} {'serial: this/base':>18} {'team: this/base':>16}")
        for r in rows:
            if "baseline_serial_us" in r:
                print(f"{r['call']:<16} {r['baseline_serial_us']:>10.1f} {r['baseline_team_us']:>9.1f} "
                      f"{r['serial_us'] / r['baseline_serial_us']:>18.3f} {r['team_us'] / r['baseline_team_us']:>16.3f}")


if __name__ == "__main__":
    main()
