"""mxq.converter — Hugging Face checkpoint → budget-exact mixed-precision .mxq file.

    from mxq.converter import convert
    report = convert("SmolLM2-135M/", "smol.mxq", bpw=4.25)

Attributes are imported on first use: the converter needs torch, and `mxq generate` (which
imports this package to register its CLI command) must not.
"""
import importlib
import os

from .errors import ConversionError

# torch's OpenMP threads spin while they wait; when other processes compete for the cores, the
# converter's many short elementwise passes then slow down ~7x (measured: 12.95 s vs 1.82 s for 9
# HQQ quantizations of a 1536×576 matrix on a loaded 2-core machine). Passive waiting avoids that.
# Effective only when torch has not been imported yet; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {"convert": "pipeline", "ConvertOptions": "pipeline", "Report": "pipeline", "parse_size": "pipeline"}
__all__ = ["convert", "ConvertOptions", "Report", "ConversionError", "parse_size"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
