"""Run the CUDA sources on the CPU: g++ + cuda_emu.h, launched from Python through ctypes.

    from mxq.kernels.emulator import get_emulator
    emu = get_emulator()                                   # builds (or reuses) the cached library
    emu.launch("gemv_affine_b4_g64", grid, block, (qweight, ..., np.int32(out), np.int32(in)))
    kernel = emu.get_function("rmsnorm_f32")               # like cupy.RawModule.get_function:
    kernel(grid, block, (x, weight, out, np.int32(dim), np.float32(eps)))

The same `.cu` files the GPU runs are compiled with `g++ -std=c++20 -O2 -pthread -include cuda_emu.h`
(one translation unit per source, plus a generated trampoline that exports, per kernel,
`mxq_emu_launch__<name>(grid, block, void** args)` and its C++ signature string) into one shared
library cached under $MXQ_CACHE/emu/<hash>/ (default ~/.cache/mxq/emu/<hash>/), keyed by the
sources, the header, the flags and the compiler version.

A launch runs the grid's blocks one after another, each with blockDim CUDA threads, in one of two
modes (see cuda_emu.h): exact about indexing, barriers and warp shuffles either way.
  "threads"  every CUDA thread is a real std::thread (the default; nondeterministic interleavings,
             ~15 ms per 256-thread GEMV block on 2 cores: fine for unit tests)
  "fibers"   every CUDA thread is a fiber switched at barriers/shuffles, in thread order and in
             reverse order on odd blocks (deterministic, ~50× faster: for running whole models)
Choose with Emulator(mode=...), launch(..., mode=...), EmulatedModule(mode=...) or $MXQ_EMU_MODE.

    from mxq.kernels.emulator import EmulatedModule
    module = EmulatedModule(mode="fibers", guard=False)   # what an emulated CUDA backend would hold
    module.get_function("add_f32")((grid,), (256,), (a, b, out, np.int32(n)))

Arguments are checked against the compiled signature: pointers take C-contiguous NumPy arrays of the
exact dtype (or None for NULL), writable ones where the kernel writes; scalars take numpy.int32 /
numpy.float32 (not Python numbers — CuPy would pass those as 64-bit values). With guard=True (the
default) every array is copied into a buffer with 256-byte poisoned margins (NaN bytes for float
arrays, 0xA5 for integer arrays): a kernel that reads past an argument sees poison, one that writes
past it (or writes to a `const` argument) raises EmulationError; results are copied back. Arguments
that are the same array share one guarded copy, so in-place calls (residual is y) keep their aliasing.
In either case an __ldg from an address off its type's alignment (a uint2 / uint4 / float4 vector load
off 8 / 16 bytes: "misaligned address" on the GPU) raises EmulationError.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..paths import cache_root
from .registry import KERNELS, SOURCES, kernels_in

KERNEL_DIR = Path(__file__).resolve().parent
HEADER = KERNEL_DIR / "cuda_emu.h"
CXX = os.environ.get("MXQ_EMU_CXX", "g++")
CXXFLAGS = ("-std=c++20", "-O2", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing",
            "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-unused-variable",
            "-Wno-unknown-pragmas")
GUARD_BYTES = 256
MODES = ("threads", "fibers")  # see cuda_emu.h: real std::threads per CUDA thread, or fibers

_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "u32": np.uint32, "u16": np.uint16,
           "u8": np.uint8, "i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64, "u64": np.uint64}
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
           "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
           "i8": ctypes.c_int8, "u8": ctypes.c_uint8}


class EmulationError(RuntimeError):
    """A kernel failed under emulation (deadlock, bad shuffle mask, out-of-bounds write, misaligned load, bad
    argument)."""


def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as exc:
        raise EmulationError(f"the CUDA emulator needs a C++20 compiler ({CXX}): {exc}") from exc


def _units(extra: tuple = ()) -> list[tuple[str, str, list[str]]]:
    """Translation units: (unit name, text to #include or inline, kernel names)."""
    units = [(Path(src).stem, f'#include "{KERNEL_DIR / src}"', kernels_in(src)) for src in SOURCES]
    return units + list(extra)


def _trampoline(unit, first: bool) -> str:
    _, body, names = unit
    lines = [body]
    if first:
        lines.append("MXQ_EMU_DEFINE_RUNTIME()")
    lines += [f"MXQ_EMU_EXPORT({name})" for name in names]
    return "\n".join(lines) + "\n"


def _digest(units) -> str:
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for i, unit in enumerate(units):
        h.update(_trampoline(unit, i == 0).encode())
    h.update(repr((CXX, CXXFLAGS, _compiler_version())).encode())
    return h.hexdigest()[:16]


def build_library(verbose: bool = False, units=None) -> Path:
    """Compile (once; cached by content hash) and return the path of the emulation library.
    `units` defaults to the kernel sources of the registry (see Emulator.from_source for others)."""
    units = _units() if units is None else units
    digest = _digest(units)
    root = cache_root() / "emu"
    target = root / digest / "libmxq_emu.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; others wait and reuse its result
        if target.exists():
            return target
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            procs, objects = [], []
            jobs = max(1, min(len(units), os.cpu_count() or 1))
            for i, unit in enumerate(units):
                cpp = work / f"{unit[0]}_emu.cpp"
                cpp.write_text(_trampoline(unit, i == 0))
                obj = cpp.with_suffix(".o")
                objects.append(obj)
                cmd = [CXX, *CXXFLAGS, "-include", str(HEADER), "-I", str(KERNEL_DIR), "-c", str(cpp), "-o", str(obj)]
                if verbose:
                    print(" ".join(cmd))
                while len([p for _, p in procs if p.poll() is None]) >= jobs:
                    _wait_one(procs)
                procs.append((unit[0], subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True)))
            failures = []
            for name, proc in procs:
                out, _ = proc.communicate()
                if proc.returncode != 0:
                    failures.append(f"g++ failed on {name}:\n{out}")
                elif verbose and out:
                    print(out)
            if failures:
                raise EmulationError("\n".join(failures))
            lib = work / "libmxq_emu.so"
            subprocess.run([CXX, "-shared", "-pthread", "-o", str(lib), *map(str, objects)], check=True,
                           capture_output=True, text=True)
            tmp_final = work / "final"
            tmp_final.mkdir()
            shutil.move(str(lib), tmp_final / "libmxq_emu.so")
            os.replace(tmp_final, root / digest)  # atomic: a half-built library is never visible
        except subprocess.CalledProcessError as exc:
            raise EmulationError(f"linking the emulation library failed:\n{exc.stderr}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _wait_one(procs) -> None:
    running = [p for _, p in procs if p.poll() is None]
    if running:
        running[0].wait()


def _parse_type(t: str) -> tuple[str, bool, bool]:
    """'const f32*' → ('f32', is_pointer=True, is_const=True)."""
    t = t.strip()
    const = t.startswith("const ")
    if const:
        t = t[len("const "):]
    pointer = t.endswith("*")
    return t.rstrip("*").strip(), pointer, const


class EmulatedKernel:
    """A kernel of the emulation library, callable like cupy.RawKernel: kernel(grid, block, args)."""

    def __init__(self, emulator: "Emulator", name: str, guard: bool | None = None, mode: str | None = None):
        self.emulator, self.name, self.guard, self.mode = emulator, name, guard, mode

    def __call__(self, grid, block, args, **kwargs):
        kwargs.setdefault("guard", self.guard)
        kwargs.setdefault("mode", self.mode)
        self.emulator.launch(self.name, grid, block, args, **kwargs)

    @property
    def signature(self) -> list[str]:
        return self.emulator.signature(self.name)


class Emulator:
    """ctypes front end of the emulation library (one per process: see get_emulator())."""

    def __init__(self, library: Path | None = None, guard: bool = True, names=None, mode: str | None = None):
        self.path = Path(library) if library else build_library()
        self.mode = mode or os.environ.get("MXQ_EMU_MODE", "threads")
        if self.mode not in MODES:
            raise EmulationError(f"emulation mode must be one of {MODES}, got {self.mode!r}")
        self._names = list(KERNELS) if names is None else list(names)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.mxq_emu_last_error.restype = ctypes.c_char_p
        self.lib.mxq_emu_set_mode.argtypes = [ctypes.c_int]
        self.guard = guard
        self._signatures: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_source(cls, code: str, names, guard: bool = True, mode: str | None = None) -> "Emulator":
        """An emulator for ad-hoc CUDA code (e.g. the harness's own self-tests): `code` is compiled
        like a kernel source (common.cuh is on the include path) and `names` are its extern "C"
        kernels. Argument checks then use only the compiled signatures."""
        unit = ("custom", code, list(names))
        return cls(build_library(units=[unit]), guard=guard, names=names, mode=mode)

    # -- introspection --
    def names(self) -> list[str]:
        return list(self._names)

    def signature(self, name: str) -> list[str]:
        """The compiled C++ parameter types, e.g. ['const u32*', ..., 'f32*', 'i32', 'i32']."""
        if name not in self._signatures:
            try:
                fn = getattr(self.lib, f"mxq_emu_sig__{name}")
            except AttributeError:
                raise EmulationError(f"no kernel named {name!r} in the emulation library") from None
            fn.restype = ctypes.c_char_p
            text = fn().decode()
            self._signatures[name] = text.split(",") if text else []
        return self._signatures[name]

    def get_function(self, name: str) -> EmulatedKernel:
        self.signature(name)
        return EmulatedKernel(self, name)

    # -- launching --
    def launch(self, name: str, grid, block, args, guard: bool | None = None, mode: str | None = None) -> None:
        """Run kernel `name` over `grid` × `block` (ints or tuples of up to 3) with `args`;
        `guard` and `mode` override the emulator's settings for this launch."""
        sig = self.signature(name)
        args = tuple(args)
        if len(args) != len(sig):
            raise EmulationError(f"{name} takes {len(sig)} arguments ({', '.join(sig)}), got {len(args)}")
        guard = self.guard if guard is None else guard
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")

        keep = []  # ctypes objects that must outlive the call
        slots = (ctypes.c_void_p * len(args))()
        guards: dict[tuple, _Guarded] = {}
        pointer_args = []
        for i, (value, t) in enumerate(zip(args, sig)):
            base, pointer, const = _parse_type(t)
            if pointer:
                pointer_args.append((i, value, base, const))
            else:
                slots[i] = ctypes.cast(ctypes.pointer(_scalar(name, i, value, base, keep)), ctypes.c_void_p)
        arrays = [(i, v, base, const) for i, v, base, const in pointer_args if v is not None]
        for i, value, base, const in arrays:
            _check_array(name, i, value, base, const)
        if guard and _overlapping_distinct(arrays):
            guard = False  # partially overlapping views: keep the raw aliasing
        for i, value, base, const in pointer_args:
            if value is None:
                address = None
            elif guard:
                key = (value.__array_interface__["data"][0], value.nbytes)
                g = guards.get(key)
                if g is None:
                    g = guards[key] = _Guarded(value)
                g.const = g.const and const
                g.names.append(f"argument {i} ({sig[i]})")
                address = g.address
            else:
                address = value.__array_interface__["data"][0]
            holder = ctypes.c_void_p(address)
            keep.append(holder)
            slots[i] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)

        fn = getattr(self.lib, f"mxq_emu_launch__{name}")
        fn.restype = ctypes.c_int
        g_arr = (ctypes.c_uint * 3)(*grid3)
        b_arr = (ctypes.c_uint * 3)(*block3)
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise EmulationError(f"emulation mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self.lib.mxq_emu_set_mode(MODES.index(mode))
            status = fn(g_arr, b_arr, slots)
            error = self.lib.mxq_emu_last_error().decode() if status else ""
        if status:
            raise EmulationError(f"{name}: {error}")
        problems = [p for g in guards.values() for p in g.finish()]
        if problems:
            raise EmulationError(f"{name}: " + "; ".join(problems))


_emulator: Emulator | None = None
_emulator_lock = threading.Lock()


def get_emulator() -> Emulator:
    """The process-wide emulator (building the library on first use)."""
    global _emulator
    with _emulator_lock:
        if _emulator is None:
            _emulator = Emulator()
        return _emulator


class EmulatedModule:
    """Stand-in for cupy.RawModule: .get_function(name) returns a callable kernel. `guard` and
    `mode` (None: the emulator's) apply to every launch through this module."""

    def __init__(self, emulator: Emulator | None = None, guard: bool | None = None, mode: str | None = None):
        self.emulator = emulator or get_emulator()
        self.guard, self.mode = guard, mode

    def get_function(self, name: str) -> EmulatedKernel:
        self.emulator.signature(name)
        return EmulatedKernel(self.emulator, name, guard=self.guard, mode=self.mode)


# ---- helpers ----------------------------------------------------------------------------------------

def _dim3(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),)
    value = tuple(int(v) for v in value)
    if not 1 <= len(value) <= 3 or any(v < 1 for v in value):
        raise EmulationError(f"{what} must be 1–3 positive integers, got {value}")
    return value + (1,) * (3 - len(value))


def _scalar(name, i, value, base, keep):
    want = _DTYPES.get(base)
    if want is None or base not in _CTYPES:
        raise EmulationError(f"{name}: argument {i} has an unsupported scalar type {base}")
    if not isinstance(value, np.generic) or value.dtype != np.dtype(want):
        raise EmulationError(
            f"{name}: argument {i} must be a numpy.{np.dtype(want).name} scalar, got {type(value).__name__} "
            f"{value!r} (CuPy passes Python ints/floats as 64-bit values)")
    c = _CTYPES[base](value.item())
    keep.append(c)
    return c


def _check_array(name, i, value, base, const):
    if not isinstance(value, np.ndarray):
        raise EmulationError(f"{name}: argument {i} must be a numpy array or None, got {type(value).__name__}")
    want = _DTYPES.get(base)
    if want is None or value.dtype != np.dtype(want):
        raise EmulationError(f"{name}: argument {i} must be a {base} array, got {value.dtype}")
    if not value.flags.c_contiguous:
        raise EmulationError(f"{name}: argument {i} must be C-contiguous")
    if not const and not value.flags.writeable:
        raise EmulationError(f"{name}: argument {i} is written by the kernel but the array is read-only")


def _overlapping_distinct(arrays) -> bool:
    spans = {}
    for _, value, _, _ in arrays:
        start = value.__array_interface__["data"][0]
        spans[(start, value.nbytes)] = (start, start + value.nbytes)
    ordered = sorted(spans.values())
    return any(a_end > b_start for (_, a_end), (b_start, _) in zip(ordered, ordered[1:]))


class _Guarded:
    """A copy of an array between poisoned margins; finish() checks margins and copies results back."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.const = True
        self.names: list[str] = []
        n = array.nbytes
        self.raw = np.empty(n + 2 * GUARD_BYTES + 64, dtype=np.uint8)
        offset = (-self.raw.__array_interface__["data"][0]) % 64
        self.buf = self.raw[offset: offset + n + 2 * GUARD_BYTES]
        poison = 0xFF if array.dtype.kind == "f" else 0xA5
        self.buf[:GUARD_BYTES] = poison
        self.buf[GUARD_BYTES + n:] = poison
        self.poison = poison
        self.body = self.buf[GUARD_BYTES: GUARD_BYTES + n]
        self.body[:] = array.reshape(-1).view(np.uint8)
        self.address = self.buf.__array_interface__["data"][0] + GUARD_BYTES

    def finish(self) -> list[str]:
        problems = []
        n = self.array.nbytes
        for label, margin in (("before", self.buf[:GUARD_BYTES]), ("past the end of", self.buf[GUARD_BYTES + n:])):
            bad = np.flatnonzero(margin != self.poison)
            if bad.size:
                problems.append(f"wrote {bad.size} byte(s) {label} {' / '.join(self.names)}")
        if self.const:
            if not np.array_equal(self.body, self.array.reshape(-1).view(np.uint8)):
                problems.append(f"wrote to read-only {' / '.join(self.names)}")
        else:
            self.array.reshape(-1).view(np.uint8)[:] = self.body
        return problems
