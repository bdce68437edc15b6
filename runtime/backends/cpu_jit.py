"""Loading the compiled CPU kernels with a safe fallback: ahead-of-time built, else Numba's JIT, else NumPy.

`kernels()` returns one namespace of compiled kernels — the products of cpu_kernels.py (affine_matmul,
fp16_matmul and their *_serial forms), `ops` (cpu_ops.py), `lut()` (cpu_lut_kernels.py), `vq()`
(cpu_vq_kernels.py), `trellis()` (cpu_trellis_kernels.py), `kind` ("aot" or "jit") and `parallel` (whether the
non-serial forms split rows over threads) — or None, and then the numpy backend keeps its NumPy path after one
notice on stderr saying why. $MXQ_KERNELS chooses:

    auto (default)  the ahead-of-time extension (cpu_aot.py: built once per machine, then loaded
                    without Numba or LLVM: +0.3 MiB resident); if it cannot be built (no C compiler,
                    no Numba, a build error), Numba's JIT with one notice
    aot             the ahead-of-time extension only (else NumPy)
    jit             Numba's JIT only (parallel kernels; ~120 MiB resident, see below)
    numpy           no compiled kernels: the NumPy reference path

and $MXQ_ACTIVATIONS how the affine kernels round x (cpu_weights.activation_low_part): 16 (~16 bits, two int8
parts) or 8 (faster, less exact); unset, cpu_weights.DEFAULT_ACTIVATIONS of this CPU (8 with AVX2 or VNNI). Each
setting is its own build.

The JIT's kernels are cached in $NUMBA_CACHE_DIR, which defaults here to the mxq cache directory's
numba/<hash of the kernel sources> ($MXQ_CACHE/numba/… or ~/.cache/mxq/numba/…), so only the first use
of a version on a machine compiles (~30 s). Its memory (resident, measured on x86-64 with every kernel cached;
`tools/bench_decode.py --kernel-memory`): `import llvmlite.binding` +40 MiB (LLVM's 170 MB shared
library, mostly file-backed pages touched while loading it), `import numba` +23 MiB (its Python
modules), loading the cached kernels +60 MiB (LLVM's JIT engine and the code it runs): ~120 MiB in all,
whatever the model's size — the reason for the ahead-of-time build.

Decode's big products and long-context attention run on the team of cpu_team.py in either build (its
workers spin between jobs and never hold the caller up). The JIT's remaining parallel loops (lut, vq and
trellis matrices, a lone affine block) use Numba's OpenMP threads, which wait passively between kernels
(OMP_WAIT_POLICY=passive unless set): spinning OpenMP workers on a busy machine (more runnable threads
than cores) made decoding 5-20x slower than one thread in our measurements, and a sleeping worker's
wake-up can take a scheduler period on a busy machine, so each such product runs on one thread or on
all, whichever has been faster lately (cpu_weights.ThreadChoice).
"""
from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

from ...paths import cache_root
from . import cpu_weights


def cache_dir() -> Path:
    """Where Numba caches its JIT-compiled kernels: $MXQ_CACHE/numba/<key> (default ~/.cache/mxq/numba/<key>),
    key = cpu_aot.key(), the hash of every kernel source. Numba checks a cached function against its own
    file only: in one directory for all versions, a kernel whose helpers changed (cpu_qdot's inner loop,
    cpu_stack's table fields) would run its old machine code."""
    from .cpu_aot import key

    return cache_root() / "numba" / key()


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


MODES = ("auto", "aot", "jit", "numpy")


def _load():
    mode = os.environ.get("MXQ_KERNELS", "").lower() or "auto"
    if mode == "numpy":
        return "MXQ_KERNELS=numpy"
    if mode not in MODES:
        return f"MXQ_KERNELS={mode!r} is not one of {', '.join(MODES)}"
    if cpu_weights.ACTIVATION_SETTING not in cpu_weights.ACTIVATIONS:
        return f"MXQ_ACTIVATIONS={cpu_weights.ACTIVATION_SETTING!r} is not one of {', '.join(cpu_weights.ACTIVATIONS)}"
    if mode == "jit":
        return _load_jit()
    from . import cpu_aot

    loaded = cpu_aot.load()
    if not isinstance(loaded, str) or mode == "aot":
        return loaded
    jit = _load_jit()
    if isinstance(jit, str):
        return f"{loaded}; Numba's JIT: {jit}"
    print(f"mxq: ahead-of-time CPU kernels unavailable ({loaded}); using Numba's JIT (+~120 MiB resident)",
          file=sys.stderr)
    return jit


def _load_jit():
    """Numba's JIT kernels as a namespace (see the module doc), or the reason they are unavailable."""
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
        from . import cpu_kernels, cpu_layers_kernels, cpu_ops, cpu_qdot, cpu_stack_kernels, cpu_team_kernels

        cache = Path(numba.config.CACHE_DIR)
        if not any(cache.glob("*/cpu_kernels.affine_matmul-*.nbi")):
            print(f"mxq: compiling the CPU kernels (once; about a minute; cached in {cache})", file=sys.stderr)
        cpu_kernels.warm_up()  # compile (or load from the cache) every kernel now, not mid-generation
        cpu_stack_kernels.warm_up()
        cpu_ops.warm_up()
        cpu_team_kernels.warm_up()
        cpu_layers_kernels.warm_up()
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the NumPy path
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return SimpleNamespace(kind="jit", parallel=True, dot_isa=cpu_qdot.DOT_ISA, affine_matmul=cpu_kernels.affine_matmul,
                           affine_matmul_serial=cpu_kernels.affine_matmul_serial,
                           stack_matmul=cpu_stack_kernels.stack_matmul,
                           stack_matmul_serial=cpu_stack_kernels.stack_matmul_serial,
                           fp16_matmul=cpu_kernels.fp16_matmul, fp16_matmul_serial=cpu_kernels.fp16_matmul_serial,
                           affine_dequantize=cpu_kernels.affine_dequantize, repack=cpu_kernels.repack,
                           tile_dequantize=cpu_kernels.tile_dequantize,
                           stack_matmul_team=cpu_team_kernels.stack_matmul_team, fp16_matmul_team=cpu_team_kernels.fp16_matmul_team,
                           attention_team=cpu_team_kernels.attention_team, team_serve=cpu_team_kernels.team_serve,
                           vq_grid_matmul_team=cpu_team_kernels.vq_grid_matmul_team,
                           decode_layers=cpu_layers_kernels.decode_layers,
                           ops=cpu_ops, lut=_jit_lut, vq=_jit_vq, trellis=_jit_trellis)


@cache
def _jit_lut():
    """The lut kernels (cpu_lut_kernels.py), compiled (or loaded from Numba's cache) on first use: when
    the first lut matrix is loaded, never mid-generation."""
    from . import cpu_lut_kernels

    cpu_lut_kernels.warm_up()
    return cpu_lut_kernels


@cache
def _jit_vq():
    """The vq kernels (cpu_vq_kernels.py), compiled (or loaded from Numba's cache) on first use: when
    the first vq matrix is loaded, never mid-generation."""
    from . import cpu_vq_kernels

    cpu_vq_kernels.warm_up()
    return cpu_vq_kernels


@cache
def _jit_trellis():
    """The trellis kernels (cpu_trellis_kernels.py), compiled (or loaded from Numba's cache) on first use: when
    the first trellis matrix is loaded, never mid-generation."""
    from . import cpu_trellis_kernels

    cpu_trellis_kernels.warm_up()
    return cpu_trellis_kernels
