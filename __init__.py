"""mxq — budget-exact mixed-precision quantization of LLMs into one self-contained file.

    import mxq
    model = mxq.load("model.mxq", device="cpu")
    for piece in model.generate("Once upon a time", max_new_tokens=32):
        print(piece, end="")
"""
__version__ = "0.1.0"


def load(path, device: str = "cpu", **options):
    """Open a .mxq file for inference (see mxq.runtime.load)."""
    from .runtime import load as runtime_load

    return runtime_load(path, device=device, **options)
