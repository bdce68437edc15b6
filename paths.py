"""Where mxq keeps its caches: one root for all of them, $MXQ_CACHE or ~/.cache/mxq.

    errors/ calibration/   the converter's measured errors and calibration statistics
    emu/ nvrtc/ numba/     compiled kernels (CPU emulation, NVRTC, Numba)
    fixtures/              test and demo checkpoints built by tools/fixtures.py ($MXQ_FIXTURE_CACHE)
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MXQ_CACHE"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV)
    return Path(base) if base else Path.home() / ".cache" / "mxq"
