"""Converter thread settings under CPU contention: spinning vs passive OpenMP waits vs one thread.

    python tools/bench_threads.py [--load 1] [--repeats 1]

Runs the same work — 9 HQQ quantizations (b2/3/4 × g32/64/128) of a random 1536×576 matrix — in a
fresh process per setting, while --load busy processes compete for the cores, and prints seconds
and the ratio to spinning waits (OMP_WAIT_POLICY=ACTIVE; torch with the variable unset behaves
the same under load: 12.95 s vs 1.82 s passive, measured once by hand). mxq's converter sets
OMP_WAIT_POLICY=PASSIVE before torch is imported (converter/__init__.py); this shows why.
"""
import argparse
import multiprocessing
import os
import subprocess
import sys

WORK = """
import os, time, torch
from mxq.format_spec import StorageConfig
import importlib
quantize = importlib.import_module("mxq.converter.quantize").quantize
if os.environ.get("THREADS"): torch.set_num_threads(int(os.environ["THREADS"]))
W = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)) * 0.02
t = time.perf_counter()
for b in (2, 3, 4):
    for g in (32, 64, 128):
        quantize(W, StorageConfig.affine(b, g), "hqq", pack=False)
print(time.perf_counter() - t)
"""


def burn():
    while True:
        pass


def run(env_overrides) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THREADS")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", WORK], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=int, default=1, help="busy processes competing for the cores")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.load)]
    for p in burners:
        p.start()
    try:
        settings = {"spinning": {"OMP_WAIT_POLICY": "ACTIVE"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
                    "1 thread": {"THREADS": "1"}}
        results = {name: min(run(env) for _ in range(args.repeats)) for name, env in settings.items()}
    finally:
        for p in burners:
            p.terminate()
    base = results["spinning"]
    print(f"{args.load} competing busy process(es), {os.cpu_count()} cores")
    for name, seconds in results.items():
        print(f"  {name:<15} {seconds:7.2f} s   {base / seconds:5.2f}x faster than spinning")


if __name__ == "__main__":
    main()
