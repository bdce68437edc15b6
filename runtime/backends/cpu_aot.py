"""The compiled CPU kernels built ahead of time: a plain CPython extension, loaded without Numba or LLVM.

Numba's JIT (cpu_jit.py) keeps LLVM and Numba resident in every process that runs the kernels: ~120 MiB,
as much as the whole SmolLM2 file. So the first run on a machine builds the serial kernels of
cpu_kernels.py, cpu_stack_kernels.py, cpu_ops.py, cpu_lut_kernels.py, cpu_vq_kernels.py, cpu_trellis_kernels.py,
cpu_team_kernels.py and cpu_layers_kernels.py
once with numba.pycc (cpu_aot_build.py, in a subprocess: its LLVM never enters this process) into

    $MXQ_CACHE/kernels/mxq_cpu_<key>.<python extension suffix>      (default ~/.cache/mxq/kernels)

and every run imports that file with importlib: +0.3 MiB resident, no Numba import (measured).
key: a hash of the kernel sources, this builder, the Python ABI, NumPy's version, this CPU (its
model and instruction-set flags: the code is compiled for the host CPU, as the JIT's is) and the
activations' rounding ($MXQ_ACTIVATIONS, cpu_weights.activation_low_part), so a changed kernel,
interpreter, machine or setting gets its own build. The build needs Numba and a C compiler (pycc
compiles Numba's small runtime helpers in C) — 7.6 minutes on a 2-core AVX2 machine (5 without the fused
decode layers, cpu_layers_kernels.py), from an empty Numba cache every time (see build). Without them, or
if the build fails, `load` returns the reason (recorded next to the module's path, `<name>.failed`, so
later runs do not retry; delete it to retry) and cpu_jit falls back to Numba's JIT. No C compiler is ever
required.

The extension's functions do not check their arguments' types (pycc: only the item size), so they are
called only through the weight handles and the backend, which pass exactly the types of the
kernels' examples() (the same as the JIT kernels compile for). pycc cannot build Numba's parallel
(OpenMP) loops: the big decode products and attention run on several threads through cpu_team.py's
*_team kernels instead (worker threads that spin between jobs; the calling thread takes the parts no
worker took).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ...paths import cache_root
from .cpu_weights import DOT_ISAS, activation_low_part, cpu_info

HERE = Path(__file__).resolve().parent
# module → its kernels built ahead of time (the serial ones; see the module docs)
EXPORTS = {
    "cpu_kernels": ("affine_matmul_serial", "fp16_matmul_serial", "affine_dequantize", "repack", "tile_dequantize"),
    "cpu_stack_kernels": ("stack_matmul_serial",),
    "cpu_ops": ("rms_norm", "rope", "silu_mul", "gelu_mul", "attention_serial"),
    "cpu_lut_kernels": ("lut_matmul_serial",),
    "cpu_vq_kernels": ("vq_matmul_serial", "vq_grid_matmul_serial"),
    "cpu_trellis_kernels": ("trellis_matmul_serial",),
    "cpu_team_kernels": ("stack_matmul_team", "fp16_matmul_team", "attention_team", "vq_grid_matmul_team",
                         "team_serve"),
    "cpu_layers_kernels": ("decode_layers",),
}
SOURCES = [HERE / f"{module}.py" for module in EXPORTS] + [HERE / "cpu_qdot.py", HERE / "cpu_tiles.py", HERE / "cpu_tiles_kernels.py",
                                                          HERE / "cpu_stack.py", HERE / "cpu_team.py", HERE / "cpu_weights.py", HERE / "cpu_layers.py",
                                                          HERE / "cpu_aot_build.py"]
BUILD_TIMEOUT_S = 1800  # a build takes 5-8 minutes alone on a 2-core AVX2 machine: room for a busy one


def cache_dir() -> Path:
    """$MXQ_CACHE/kernels (default ~/.cache/mxq/kernels)."""
    return cache_root() / "kernels"


def cpu_fingerprint() -> str:
    """This CPU's model and instruction-set flags (Linux /proc/cpuinfo), else what platform knows."""
    fields = cpu_info()
    if not fields:
        return platform.processor() or platform.machine()
    keep = ("vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features")
    return "|".join(f"{k}={fields[k]}" for k in keep if k in fields)


def key() -> str:
    """16 hex digits naming the build (see the module doc: sources, Python ABI, NumPy, CPU, activations)."""
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    for part in (sys.implementation.cache_tag, platform.machine(), ".".join(np.__version__.split(".")[:2]),
                 cpu_fingerprint(), f"low part {activation_low_part()}"):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def module_path() -> Path:
    """Where this machine's extension is (or will be) built."""
    return cache_dir() / f"mxq_cpu_{key()}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def load():
    """The kernels as a namespace (names as in the JIT modules, plus `lut`, `vq` and `trellis`), building them
    first when this machine has none yet; or a one-line reason why not."""
    path = module_path()
    failed = path.with_name(path.name + ".failed")
    if not path.exists():
        if failed.exists():
            return f"{failed.read_text(errors='replace').strip()} (recorded in {failed}; delete it to retry)"
        reason = build(path)
        if reason:
            try:
                failed.write_text(reason + "\n")
            except OSError:
                pass
            return reason
    try:
        name = path.name.split(".")[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        functions = {name: getattr(module, name) for names in EXPORTS.values() for name in names}
        dot_isa = DOT_ISAS[module.dot_isa_index()]  # the lowering it was built with (cpu_aot_build.dot_isa_index)
    except Exception as error:  # noqa: BLE001 - any import failure means: use the JIT
        return f"{path} does not load: {type(error).__name__}: {error}"
    for name in list(functions):  # serial only: e.g. `affine_matmul` runs affine_matmul_serial
        functions.setdefault(name.removesuffix("_serial"), functions[name])
    kernels = SimpleNamespace(kind="aot", parallel=False, path=path, dot_isa=dot_isa, **functions)
    kernels.ops = kernels  # the per-token ops (cpu_ops.py) and the lut, vq and trellis kernels: the same module
    kernels.lut = kernels.vq = kernels.trellis = lambda: kernels
    return kernels


def build(path: Path) -> str | None:
    """Run cpu_aot_build.py in a subprocess to write `path`; None on success, else the reason."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the kernel cache {path.parent}: {error.strerror}"
    print(f"mxq: compiling the CPU kernels (once, a few minutes; cached in {path.parent})", file=sys.stderr)
    package_root = str(HERE.parents[2])  # the directory holding the mxq package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        # An empty Numba cache: Numba checks a cached function against its own file only, so with a warm
        # cache a kernel of an unchanged file (cpu_kernels.affine_rows) whose helpers changed (cpu_qdot's
        # inner loop) would be built from its old machine code (seen: a new inner loop silently absent).
        with tempfile.TemporaryDirectory(prefix="mxq-kernel-build-") as numba_cache:
            env["NUMBA_CACHE_DIR"] = numba_cache
            done = subprocess.run([sys.executable, "-m", f"{__package__}.cpu_aot_build", str(path)],
                                  capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the kernel build did not finish: {error}"
    if done.returncode != 0 or not path.exists():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return f"the kernel build failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
    return None
