"""Loading the compiled CPU kernels (cpu_kernels.py) with a safe fallback.

`kernels()` returns the cpu_kernels module once every kernel (and cpu_ops') is compiled — or loaded from the
cache: Numba's cache lives in $NUMBA_CACHE_DIR, which defaults here to the mxq cache directory's
numba/ ($MXQ_CACHE/numba or ~/.cache/mxq/numba), so only the first use on a machine compiles
(~30 s) — or None when Numba is missing, disabled (MXQ_KERNELS=numpy) or fails to compile. Then
the numpy backend keeps its NumPy path and one notice on stderr says why.

Memory (resident, measured on x86-64 with every kernel cached; `tools/bench_decode.py --kernel-memory`):
`import llvmlite.binding` +40 MiB (LLVM's 170 MB shared library, mostly file-backed pages touched
while loading it), `import numba` +23 MiB (its Python modules), loading the cached kernels +60 MiB
(LLVM's JIT engine and the code it runs; every (bits, group) variant lives in the same compiled
function, cpu_ops ~1 MiB): ~120 MiB in all, whatever the model's size.

Numba's OpenMP threads wait passively between kernels (OMP_WAIT_POLICY=passive unless set): spinning
workers on a busy machine (more runnable threads than cores) made decoding 5-20x slower than one
thread in our measurements. A sleeping worker's wake-up is cheap on an idle machine and can take a
scheduler period on a busy one, so each big product runs on one thread or on all, whichever has
been faster lately (cpu_weights.ThreadChoice). On a dedicated, otherwise idle machine a user may
set OMP_WAIT_POLICY=active: SmolLM2 then decoded ~1.1x faster on 2 cores (measured); never on a
shared one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ...paths import cache_root


def cache_dir() -> Path:
    """Where compiled kernels are cached: $MXQ_CACHE/numba (default ~/.cache/mxq/numba)."""
    return cache_root() / "numba"


_state: dict = {}


def kernels():
    """The compiled kernel namespace, or None (NumPy fallback) after one notice on stderr."""
    if "kernels" not in _state:
        _state["kernels"] = None
        reason = _load()
        if isinstance(reason, str):
            print(f"mxq: compiled CPU kernels unavailable ({reason}); using the slower NumPy path",
                  file=sys.stderr)
        else:
            _state["kernels"] = reason
    return _state["kernels"]


def disable(reason: str) -> None:
    """Fall back to NumPy for the rest of the process (a kernel failed at run time)."""
    if _state.get("kernels") is not None:
        print(f"mxq: compiled CPU kernels failed ({reason}); using the slower NumPy path", file=sys.stderr)
    _state["kernels"] = None


def _load():
    if os.environ.get("MXQ_KERNELS", "").lower() == "numpy":
        return "MXQ_KERNELS=numpy"
    if not os.environ.get("NUMBA_CACHE_DIR"):
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = str(cache_dir())
        except OSError as error:
            return f"cannot create the kernel cache {cache_dir()}: {error.strerror}"
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read when the OpenMP runtime loads (first kernel)
    try:
        import numba
    except ImportError:
        return "the Python package 'numba' is not installed"
    if numba.config.CACHE_DIR != os.environ["NUMBA_CACHE_DIR"]:
        numba.core.config.reload_config()  # numba was imported before the cache directory was set
    try:
        from . import cpu_kernels, cpu_ops

        cache = Path(numba.config.CACHE_DIR)
        if not any(cache.glob("*/cpu_kernels.affine_matmul-*.nbi")):
            print(f"mxq: compiling the CPU kernels (once; about a minute; cached in {cache})", file=sys.stderr)
        cpu_kernels.warm_up()  # compile (or load from the cache) every kernel now, not mid-generation
        cpu_ops.warm_up()
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the NumPy path
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return cpu_kernels
