"""Best-effort control of the BLAS thread count behind NumPy (OpenBLAS), without dependencies.

Why: decoding multiplies one token at a time (matrix–vector products that take tens of
microseconds); OpenBLAS's worker threads only add hand-off cost there, and on a machine whose
cores are busy with anything else they make each call 10–100x slower (busy-waiting threads
fighting for a core). So the numpy backend uses 1 BLAS thread for decode-sized products and the
library's default for prefill. If the library is not OpenBLAS (or cannot be found) nothing changes.
MXQ_BLAS_THREADS=N forces N threads everywhere.
"""
from __future__ import annotations

import ctypes
import os

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
            "openblas_get_num_threads")


class BlasThreads:
    def __init__(self):
        self._set = self._get = None
        try:
            import numpy  # noqa: F401 - make sure NumPy's BLAS is loaded before looking for it

            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                self._set = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
                self._get = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
                if self._set and self._get:
                    self._set.argtypes, self._get.restype = [ctypes.c_int], ctypes.c_int
                    break
                self._set = self._get = None
        except OSError:
            self._set = self._get = None
        self.default = self._get() if self._get else None
        self.current = self.default
        forced = os.environ.get("MXQ_BLAS_THREADS")
        self.forced = int(forced) if forced and forced.isdigit() and int(forced) > 0 else None
        if self.forced:
            self.set(self.forced)

    @property
    def available(self) -> bool:
        return self._set is not None

    def set(self, n: int | None) -> None:
        """Use n threads (None: the library's default); no-op when unchanged or unavailable."""
        if self._set is None:
            return
        n = self.forced or n or self.default
        if n != self.current:
            self._set(int(n))
            self.current = n


_instance = None


def blas_threads() -> BlasThreads:
    global _instance
    if _instance is None:
        _instance = BlasThreads()
    return _instance
