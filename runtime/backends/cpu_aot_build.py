"""Build the ahead-of-time CPU kernels (cpu_aot.py) with numba.pycc — run by cpu_aot.build in a subprocess:

    python -m mxq.runtime.backends.cpu_aot_build OUT.so

Each kernel of cpu_aot.EXPORTS is exported with the argument types of its module's examples() (the
types the JIT kernels compile for) through a one-line Python wrapper that calls the @njit kernel: the
kernel then compiles with its own options (fastmath, inlining) and is linked into the extension.
Code is generated for this CPU's model and features, as Numba's JIT does (pycc's default would be the
generic CPU of the architecture: no AVX), and the functions release the GIL while they run (as the JIT
kernels' nogil=True), so the NumPy path's worker threads can run them side by side. (Both through
two private hooks of numba.pycc/numba.core.codegen; a Numba without them fails the build: JIT fallback.) The extension is written to a temporary name, then loaded
and run on every example in a child process (an illegal instruction or a crash there fails the build
instead of a later run), then renamed into place atomically (concurrent builds are harmless).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cpu_aot import EXPORTS


def exported_kernels():
    """(name, @njit kernel, Numba signature) of every kernel in cpu_aot.EXPORTS."""
    from numba import typeof, types

    for module_name, names in EXPORTS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        examples = dict(module.examples())  # one argument type set per kernel (see warm_up)
        for name in names:
            yield name, getattr(module, name), types.void(*(typeof(a) for a in examples[name]))


def wrapper(name: str, kernel):
    """def name(<the kernel's parameters>): kernel(<them>) — compiled by pycc, calling the @njit kernel."""
    params = ", ".join(inspect.signature(kernel.py_func).parameters)
    namespace = {"kernel": kernel}
    exec(f"def {name}({params}):\n    kernel({params})\n", namespace)  # noqa: S102 - our own parameter names
    return namespace[name]


def compile_extension(out: Path) -> None:
    from numba.core import codegen
    from numba.pycc import CC
    from numba.pycc import compiler as pycc_compiler
    from numba.pycc.platform import external_compiler_works

    if not external_compiler_works():
        raise RuntimeError("no working C compiler (numba.pycc needs one to link the kernels)")

    # pycc compiles for the named CPU without its feature flags; use exactly the host's, as the JIT does
    codegen.AOTCPUCodegen._customize_tm_features = lambda self: self._get_host_cpu_features()

    class NoGilFlags(pycc_compiler.Flags):  # the wrappers release the GIL, as the JIT kernels' nogil=True
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.release_gil = True

    pycc_compiler.Flags = NoGilFlags
    cc = CC(out.name.split(".")[0])
    cc.output_dir, cc.output_file, cc.target_cpu = str(out.parent), out.name, "host"
    for name, kernel, signature in exported_kernels():
        cc.export(name, signature)(wrapper(name, kernel))
    cc.export("dot_isa_index", "i8()")(dot_isa_index())
    cc.compile()


def dot_isa_index():
    """def dot_isa_index(): return <the position in cpu_weights.DOT_ISAS of the lowering these kernels are built
    with> — how cpu_aot.load learns it without LLVM."""
    from .cpu_qdot import DOT_ISA
    from .cpu_weights import DOT_ISAS

    namespace = {}
    exec(f"def dot_isa_index():\n    return {DOT_ISAS.index(DOT_ISA)}\n", namespace)  # noqa: S102 - a constant
    return namespace["dot_isa_index"]


def smoke_test(path: Path) -> None:
    """Load the extension at `path` and run every example through it (in the calling process)."""
    import numpy as np

    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for module_name, names in EXPORTS.items():
        examples = dict(importlib.import_module(f"{__package__}.{module_name}").examples())
        for name in names:
            args = examples[name]
            getattr(module, name)(*args)
            out = [a for a in args if isinstance(a, np.ndarray) and a.flags.writeable and a.size][-1]
            if not np.isfinite(out).all():
                raise RuntimeError(f"kernel {name} gave non-finite output on its example")


def main(argv) -> int:
    if len(argv) == 3 and argv[1] == "--smoke-test":
        smoke_test(Path(argv[2]))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the staging directory is removed
    try:
        build(out)
    except Exception as error:  # noqa: BLE001 - one line for the notice (cpu_aot.build shows the last line)
        message = str(error).strip().splitlines()
        print(f"{type(error).__name__}: {message[0] if message else ''}", file=sys.stderr)
        return 1
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        staged = Path(tmp) / out.name
        compile_extension(staged)
        check = subprocess.run([sys.executable, "-m", __spec__.name, "--smoke-test", str(staged)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            lines = [line for line in check.stderr.splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit status {check.returncode} (a crash or an illegal instruction)"
            raise RuntimeError(f"the built kernels fail their smoke test: {detail}")
        os.replace(staged, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
