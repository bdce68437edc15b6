"""Backends by device name. A backend module is imported only when its device is asked for, so
the CPU runtime never imports CuPy. To add one: a module defining a `Backend` subclass, and a line
in BACKENDS."""
from __future__ import annotations

import importlib

from ..errors import ModelError

# device -> (module, class name)
BACKENDS = {
    "cpu": ("mxq.runtime.backends.numpy_backend", "NumpyBackend"),
    "cuda": ("mxq.runtime.backends.cuda_backend", "CudaBackend"),
}


def get_backend(device: str = "cpu", **options):
    """A backend instance for `device`; options (e.g. cache_dequantized) go to its constructor."""
    if not isinstance(device, str) or device not in BACKENDS:
        raise ModelError(f"unknown device {device!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[device]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise ModelError(f"device {device!r} is not available in this installation of mxq "
                             f"(no {module_name}); use --device cpu") from None
        raise ModelError(f"device {device!r} needs the Python package {error.name!r}, which is not "
                         f"installed (pip install 'mxq[cuda]'); use --device cpu") from None
    return getattr(module, class_name)(**options)
