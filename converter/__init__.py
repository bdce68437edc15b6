"""mxq.converter — Hugging Face checkpoint → budget-exact mixed-precision .mxq file.

    from mxq.converter import convert
    report = convert("SmolLM2-135M/", "smol.mxq", bpw=4.25)
"""
from .convert import ConvertOptions, Report, convert, parse_size
from .errors import ConversionError

__all__ = ["convert", "ConvertOptions", "Report", "ConversionError", "parse_size"]
