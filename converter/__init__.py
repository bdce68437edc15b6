"""mxq.converter — Hugging Face checkpoint → budget-exact mixed-precision .mxq file.

    from mxq.converter import convert
    report = convert("SmolLM2-135M/", "smol.mxq", bpw=4.25)

Attributes are imported on first use: the converter needs torch, and `mxq generate` (which
imports this package to register its CLI command) must not.
"""
import importlib

from .errors import ConversionError

_LAZY = {"convert": "pipeline", "ConvertOptions": "pipeline", "Report": "pipeline", "parse_size": "pipeline"}
__all__ = ["convert", "ConvertOptions", "Report", "ConversionError", "parse_size"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
