"""mxq.runtime — run .mxq files without torch or transformers: NumPy on CPU (CuPy on GPU later).

    from mxq.runtime import load
    model = load("model.mxq", device="cpu")      # see runtime/generate.py for the API
"""
from .errors import ModelError
from .generate import GenerationStats, LoadedModel, load

__all__ = ["load", "LoadedModel", "GenerationStats", "ModelError"]
