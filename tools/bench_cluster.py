"""Cluster benchmark: `mxq convert --cluster local:1` and `local:2` against a local conversion, in one run.

    python tools/bench_cluster.py [--fixture smollm2] [--bpw 3.5] [--calib-tokens 8192] [--machines 1,2,4,8,16]
                                  [--cores-per-machine N] [--tasks 200]

Each conversion runs in its own process with an empty cache (calibration and errors):
  * local: the conversion without --cluster (the reference bytes, and the driver-side stage times);
  * local:1 and local:2: a Ray instance on this machine with 1 and 2 worker processes: seconds per stage,
    the seconds each worker spent in tasks, and the speed-up of 2 workers over 1 per stage;
  * sha256 of the three files (they must be identical);
  * per-task overhead: an empty task's round trip on one worker, the object store's throughput for a 64 MiB
    tensor, and per stage (workers × stage seconds − seconds in tasks) / tasks — everything a worker slot
    spends not computing (scheduling, transfers, waiting for the driver, the last tasks' tail);
  * a projection for N machines of --cores-per-machine cores: measurement (tasks in seconds and overhead)
    divides by N·cores; calibration's task seconds divide by min(N·cores, chunk batches per layer) and
    the driver's share stays; read, solve and write stay on the driver.
The load average is printed before and after each run: the ratios need a quiet machine (on a shared one,
processes compete for the cores and both runs slow down by different amounts).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402


def run_child(code: str) -> dict:
    """Run python code in a fresh process; it sets RESULT, printed as the last line of JSON."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport json as _j; print(_j.dumps(RESULT))"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def conversion(hf_dir, out, cache, **options) -> dict:
    load = os.getloadavg()[0]
    result = run_child(textwrap.dedent(f"""
        from mxq.converter import convert
        report = convert({str(hf_dir)!r}, {str(out)!r}, cache_dir={str(cache)!r}, **{options!r})
        RESULT = {{"seconds": report.seconds, "workers": report.workers}}
    """))
    result["load"] = (load, os.getloadavg()[0])
    result["sha256"] = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    return result


def task_overheads(tasks: int) -> dict:
    """An empty task's round trip (tasks submitted at once, one worker) and object store throughput."""
    return run_child(textwrap.dedent(f"""
        import time, logging, ray, torch
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)

        @ray.remote(num_cpus=1)
        def noop(x):
            return x

        @ray.remote(num_cpus=1)
        def echo(t):
            return t.sum()

        ray.get([noop.remote(0) for _ in range(20)])  # worker started and warm
        start = time.perf_counter()
        ray.get([noop.remote(i) for i in range({tasks})])
        per_task = (time.perf_counter() - start) / {tasks}
        tensor = torch.randn(16 << 20)  # 64 MiB float32
        ray.get(echo.remote(tensor))
        start = time.perf_counter()
        for _ in range(5):
            ray.get(echo.remote(tensor))
        mib_per_s = 5 * 64 / (time.perf_counter() - start)
        ray.shutdown()
        RESULT = {{"noop_ms": 1000 * per_task, "object_mib_per_s": mib_per_s}}
    """))


def busy(result: dict, stage: str, what: str = "seconds") -> float:
    """seconds in tasks (or "cpu" seconds, or "tasks") of a stage over all workers."""
    return sum(work[what] for work in result["workers"].get(stage, {}).values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--bpw", type=float, default=3.5)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--machines", default="1,2,4,8,16")
    parser.add_argument("--cores-per-machine", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tasks", type=int, default=200, help="empty tasks for the round-trip overhead")
    args = parser.parse_args(argv)

    from mxq.converter.calibrate import BATCH_CHUNKS, CHUNK_TOKENS

    hf_dir = fixtures.ensure(args.fixture)
    options = dict(bpw=args.bpw, calib_tokens=args.calib_tokens)
    print(f"fixture {args.fixture}, --bpw {args.bpw}, --calib-tokens {args.calib_tokens}; "
          f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="mxq-bench-cluster-") as tmp:
        for name, extra in (("local", {}), ("local:1", {"cluster": "local:1"}), ("local:2", {"cluster": "local:2"})):
            runs[name] = conversion(hf_dir, Path(tmp) / f"{name}.mxq", Path(tmp) / f"cache-{name}", **options, **extra)
            seconds = ", ".join(f"{k} {v:.1f}" for k, v in runs[name]["seconds"].items())
            print(f"{name:8s} {seconds}  (load {runs[name]['load'][0]:.1f} → {runs[name]['load'][1]:.1f})", flush=True)
            for stage, workers in runs[name]["workers"].items():
                print(f"         {stage} per worker: " + ", ".join(
                    f"{w} {t['seconds']:.1f} s (CPU {t['cpu']:.1f} s, {t['tasks']} tasks)" for w, t in workers.items()))
    identical = len({r["sha256"] for r in runs.values()}) == 1
    print(f"sha256: {'identical' if identical else 'DIFFERENT'} "
          + ", ".join(f"{k} {r['sha256'][:16]}" for k, r in runs.items()))

    overheads = task_overheads(args.tasks)
    print(f"empty task round trip (one worker, {args.tasks} tasks): {overheads['noop_ms']:.2f} ms; "
          f"object store: {overheads['object_mib_per_s']:.0f} MiB/s for a 64 MiB tensor into a task")
    one, two = runs["local:1"], runs["local:2"]
    print("stage      local  1 worker  2 workers  speed-up   overhead/task     wall/CPU in tasks  CPU-bound (1 w, 2 w)")
    for stage in ("calibrate", "measure"):
        if stage not in one["seconds"]:
            continue
        over, contention, cpu_bound = [], [], []
        for workers, run in ((1, one), (2, two)):
            tasks = max(busy(run, stage, "tasks"), 1)
            over.append(1000 * (workers * run["seconds"][stage] - busy(run, stage)) / tasks)
            contention.append(busy(run, stage) / max(busy(run, stage, "cpu"), 1e-9))
            cpu_bound.append(busy(run, stage, "cpu") / workers)  # the tasks on idle cores, one per worker
        print(f"{stage:9s} {runs['local']['seconds'][stage]:6.1f} {one['seconds'][stage]:9.1f} "
              f"{two['seconds'][stage]:10.1f} {one['seconds'][stage] / two['seconds'][stage]:8.2f}×  "
              f"{over[0]:5.0f}, {over[1]:5.0f} ms  {contention[0]:8.2f}, {contention[1]:5.2f}  "
              f"{cpu_bound[0]:7.1f}, {cpu_bound[1]:5.1f} s = {cpu_bound[0] / cpu_bound[1]:.2f}×")
    print("(overhead/task: (workers × stage seconds − seconds in tasks) / tasks; wall/CPU in tasks is 1.0 on idle "
          "cores, more when other processes take turns on them; CPU-bound: the tasks' CPU seconds / workers, what the stage's "
          "tasks would take on idle cores)")

    # projection from the 1-worker run: task seconds divide over the cores; the rest stays
    local = runs["local"]["seconds"]
    serial = sum(local.get(s, 0.0) for s in ("read", "solve", "write"))
    cal_busy, cal_tasks = busy(one, "calibrate"), busy(one, "calibrate", "tasks")
    batches = -(-args.calib_tokens // CHUNK_TOKENS // BATCH_CHUNKS)
    cal_driver = one["seconds"].get("calibrate", 0.0) - cal_busy
    mea_busy = busy(one, "measure")
    mea_overhead = one["seconds"]["measure"] - mea_busy
    print(f"projection (N machines × {args.cores_per_machine} cores, from the 1-worker run; calibration parallel over "
          f"at most {batches} chunk batches per layer; on the driver: read+solve+write {serial:.1f} s, "
          f"calibration {cal_driver:.1f} s)")
    print("machines  calibrate  measure   total  speed-up vs local")
    for n in (int(m) for m in args.machines.split(",")):
        slots = n * args.cores_per_machine
        calibrate = cal_driver + cal_busy / min(slots, batches) if cal_tasks else 0.0
        measure = (mea_busy + mea_overhead) / slots
        total = serial + calibrate + measure
        print(f"{n:8d} {calibrate:10.1f} {measure:8.1f} {total:7.1f} {local['total'] / total:12.2f}×")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
