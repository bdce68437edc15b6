"""Registers, spills, stack and shared memory of every mxq kernel on every target GPU architecture.

    python tools/kernel_report.py                  # table: one row per kernel, one column group per arch
    python tools/kernel_report.py --arch sm_87     # one arch
    python tools/kernel_report.py --filter gemv    # kernels whose name contains "gemv"
    python tools/kernel_report.py --via nvrtc      # use NVRTC's built-in ptxas (-Xptxas -v) instead of ptxas
    python tools/kernel_report.py --json           # machine-readable

How: each source is compiled by NVRTC to PTX for the arch (kernels/nvrtc.py, cached), then
`ptxas -arch=sm_XX -v` (from the CUDA toolkit on PATH) reports per-kernel resource usage. Exit status
1 if any GEMV kernel spills (the target is no spills), 2 if a tool is missing.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package

from mxq.kernels import nvrtc  # noqa: E402
from mxq.kernels.registry import KERNELS, SOURCES  # noqa: E402

_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """ptxas -v output → {kernel: {regs, spill_stores, spill_loads, stack, smem}}."""
    out, current = {}, None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return out


def usage(source: str, arch: str, via: str) -> dict:
    if via == "nvrtc":
        result = nvrtc.compile_source(source, arch, extra_options=("--ptxas-options=-v",), use_cache=False)
        if not result.ok:
            raise SystemExit(f"NVRTC failed on {source} for {arch}:\n{result.log}")
        return parse_ptxas(result.log)
    result = nvrtc.compile_source(source, arch)
    if not result.ok:
        raise SystemExit(f"NVRTC failed on {source} for {arch}:\n{result.log}")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(result.ptx)
        proc = subprocess.run(["ptxas", f"-arch={arch}", "-v", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ptxas failed on {source} for {arch}:\n{proc.stderr}")
    return parse_ptxas(proc.stderr + proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="sm_XX (repeatable); default: all six targets")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--via", choices=("ptxas", "nvrtc"), default="ptxas")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    archs = args.arch or list(nvrtc.ARCHS)
    try:
        nvrtc.nvrtc_version()
    except nvrtc.NvrtcUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.via == "ptxas" and shutil.which("ptxas") is None:
        print("ptxas not found on PATH (install the CUDA toolkit, or use --via nvrtc)", file=sys.stderr)
        return 2

    table: dict = {}  # kernel -> arch -> usage
    for source in SOURCES:
        for arch in archs:
            for kernel, u in usage(source, arch, args.via).items():
                table.setdefault(kernel, {})[arch] = u
    names = [k for k in KERNELS if args.filter in k and k in table]
    spilling = [(k, a) for k in names for a, u in table[k].items()
                if k.startswith("gemv") and (u["spill_stores"] or u["spill_loads"])]

    if args.json:
        print(json.dumps({k: table[k] for k in names}, indent=1))
    else:
        tool = "ptxas " + subprocess.run(["ptxas", "--version"], capture_output=True, text=True).stdout.split(
            "release")[-1].split(",")[0].strip() if args.via == "ptxas" else "NVRTC's ptxas"
        print(f"per kernel and arch: registers / spill bytes (stores+loads) / stack bytes / static smem bytes"
              f"  [NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))} PTX, {tool}]")
        width = max(len(n) for n in names)
        print(f"{'kernel':<{width}} | " + " | ".join(f"{a:^18}" for a in archs))
        print("-" * width + "-+-" + "-+-".join("-" * 18 for _ in archs))
        for name in names:
            cells = []
            for a in archs:
                u = table[name].get(a)
                cells.append("—" if u is None else
                             f"{u['regs']:>3}r {u['spill_stores'] + u['spill_loads']:>2}s {u['stack']:>2}k {u['smem']:>5}")
            print(f"{name:<{width}} | " + " | ".join(f"{c:>18}" for c in cells))
        print()
        print("GEMV spills: " + ("none" if not spilling else ", ".join(f"{k}@{a}" for k, a in spilling)))
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
