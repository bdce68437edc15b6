"""Compile the kernel sources with NVRTC (no GPU needed) and load them on a GPU.

    from mxq.kernels import nvrtc
    results = nvrtc.compile_all()            # every source × sm_75 sm_80 sm_86 sm_87 sm_89 sm_90
    for r in results: print(r.source, r.arch, r.ok, r.log)
    module = nvrtc.load_module()             # on a GPU: .get_function(name)(grid, block, args)

NVRTC comes from the `nvidia-cuda-nvrtc-cu12` wheel through CuPy's binding
(`cupy_backends.cuda.libs.nvrtc`), which, unlike cupy.RawModule's own compile path, never queries a
device, so it works on machines without a GPU. Every compile is for a real architecture (sm_XX), which
yields the CUBIN and the PTX in one go. Results are cached under $MXQ_CACHE/nvrtc/<hash>/ (default
~/.cache/mxq/nvrtc/), keyed by the source and header texts, the options and the NVRTC version.

The kernels need no CUDA toolkit headers (kernels/common.cuh defines the few types they use), so
the loader works with just the NVRTC wheel and the driver.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import cache_root
from .registry import KERNELS, SOURCES, kernels_in

KERNEL_DIR = Path(__file__).resolve().parent
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
BASE_OPTIONS = ("-std=c++17",)


class NvrtcUnavailable(RuntimeError):
    """NVRTC (or CuPy's binding to it) is not installed or cannot be loaded."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds the compile log."""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the shared library failing to load
        raise NvrtcUnavailable(
            "NVRTC is not available: install CuPy and NVRTC (pip install 'mxq[cuda]', i.e. cupy-cuda12x and "
            f"nvidia-cuda-nvrtc-cu12) to compile mxq's CUDA kernels ({type(exc).__name__}: {exc})") from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def supported_archs() -> tuple[int, ...]:
    """Compute capabilities this NVRTC can compile for, e.g. (75, 80, 86, 87, 89, 90, ...)."""
    return tuple(_nvrtc().getSupportedArchs())


def _headers_digest() -> bytes:
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.suffix in (".cuh", ".h") and path.name != "cuda_emu.h":
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.digest()


@dataclass
class CompileResult:
    source: str
    arch: str
    ok: bool
    log: str
    ptx: str = ""
    cubin: bytes = b""
    seconds: float = 0.0
    cached: bool = False
    entries: list = field(default_factory=list)  # .entry names found in the PTX


def entry_points(ptx: str) -> list[str]:
    """Kernel entry points declared in a PTX text."""
    return re.findall(r"^\s*\.(?:visible\s+)?\.entry\s+([A-Za-z_]\w*)\s*\(", ptx, flags=re.M)


def compile_source(source: str, arch: str, extra_options: tuple = (), use_cache: bool = True) -> CompileResult:
    """Compile kernels/<source> for `arch` ('sm_87' or 87). Never raises on a compile error: check .ok."""
    nvrtc = _nvrtc()
    arch = arch if isinstance(arch, str) else f"sm_{arch}"
    text = (KERNEL_DIR / source).read_text()
    options = (f"--gpu-architecture={arch}", *BASE_OPTIONS, f"-I{KERNEL_DIR}", *extra_options)
    key = hashlib.sha256(text.encode() + _headers_digest() + repr((options[0], options[1:2], extra_options,
                                                                  nvrtc_version())).encode()).hexdigest()[:20]
    cache_dir = cache_root() / "nvrtc" / key
    if use_cache and (cache_dir / "result.json").exists():
        meta = json.loads((cache_dir / "result.json").read_text())
        return CompileResult(source, arch, meta["ok"], meta["log"], (cache_dir / "kernel.ptx").read_text(),
                             (cache_dir / "kernel.cubin").read_bytes(), 0.0, True, meta["entries"])
    start = time.perf_counter()
    prog = nvrtc.createProgram(text, source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
            ok = True
        except Exception:  # NVRTCError: the log says why
            ok = False
        log = nvrtc.getProgramLog(prog)
        log = log.decode() if isinstance(log, bytes) else log
        ptx = cubin = None
        if ok:
            ptx = nvrtc.getPTX(prog)
            ptx = ptx.decode(errors="replace") if isinstance(ptx, bytes) else ptx
            ptx = ptx.rstrip("\0")
            cubin = bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    result = CompileResult(source, arch, ok, log.strip().rstrip("\0"), ptx or "", cubin or b"",
                           time.perf_counter() - start, False, entry_points(ptx or ""))
    if use_cache and ok:
        tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "kernel.ptx").write_text(result.ptx)
        (tmp / "kernel.cubin").write_bytes(result.cubin)
        (tmp / "result.json").write_text(json.dumps({"ok": ok, "log": result.log, "entries": result.entries}))
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another process cached it first
            pass
    return result


def compile_all(archs=ARCHS, sources=SOURCES, extra_options: tuple = (), use_cache: bool = True) -> list[CompileResult]:
    """Every source for every arch; check each result's .ok and .log."""
    return [compile_source(s, a, extra_options, use_cache) for s in sources for a in archs]


# ---- loading on a GPU ------------------------------------------------------------------------------

def device_arch(device=None) -> int:
    """Compute capability of the current (or given) CuPy device as an int, e.g. 87."""
    import cupy
    dev = cupy.cuda.Device() if device is None else device
    return int(dev.compute_capability)


class CudaModule:
    """The kernels on a GPU: get_function(name) → cupy RawKernel, called as kernel(grid, block, args).
    Same interface as emulator.EmulatedModule, so the CUDA backend runs unchanged on both."""

    def __init__(self, arch: int | None = None, via: str = "cubin"):
        import cupy
        self.cupy = cupy
        self.arch = arch if arch is not None else device_arch()
        self.via = via
        self._modules: dict = {}

    def _module(self, source: str):
        mod = self._modules.get(source)
        if mod is not None:
            return mod
        cupy = self.cupy
        if self.via == "source":  # let CuPy compile the source itself (name expressions resolve the entries)
            mod = cupy.RawModule(code=(KERNEL_DIR / source).read_text(),
                                 options=(*BASE_OPTIONS, f"-I{KERNEL_DIR}"), name_expressions=kernels_in(source))
        else:
            supported = [a for a in supported_archs() if a <= self.arch]
            if not supported:
                raise KernelCompileError(f"this NVRTC cannot compile for sm_{self.arch}")
            target = self.arch if self.arch in supported else max(supported)
            result = compile_source(source, f"sm_{target}")
            if not result.ok:
                raise KernelCompileError(f"{source} for sm_{target}:\n{result.log}")
            cache = cache_root() / "nvrtc" / "load"
            cache.mkdir(parents=True, exist_ok=True)
            if target == self.arch:  # native code for this GPU
                path = cache / f"{Path(source).stem}-sm_{target}-{hashlib.sha256(result.cubin).hexdigest()[:16]}.cubin"
                if not path.exists():
                    path.write_bytes(result.cubin)
            else:  # newer GPU than NVRTC knows: the driver JIT-compiles the PTX
                path = cache / f"{Path(source).stem}-compute_{target}-{hashlib.sha256(result.ptx.encode()).hexdigest()[:16]}.ptx"
                if not path.exists():
                    path.write_text(result.ptx)
            mod = cupy.RawModule(path=str(path))
        self._modules[source] = mod
        return mod

    def get_function(self, name: str):
        kernel = KERNELS.get(name)
        if kernel is None:
            raise KeyError(f"unknown kernel {name!r}")
        return self._module(kernel.source).get_function(name)


def load_module(arch: int | None = None, via: str = "cubin") -> CudaModule:
    """Kernels for the current GPU. via='cubin': NVRTC → CUBIN for the device (PTX for a GPU newer
    than NVRTC) → cupy.RawModule(path=...); via='source': cupy.RawModule(code=..., name_expressions=...)."""
    return CudaModule(arch, via)
