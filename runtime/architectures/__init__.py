"""Model families as data (see base.py). Importing this package registers every family.

Adding a family = one module here that builds a `Family` and calls `register`, plus backend ops
only where its math is new."""
from .base import REFUSED_HF, Family, family, family_of_hf, families, supported_hf  # noqa: F401
from . import llama, qwen3, gemma3, phi3  # noqa: F401,I001  (registration, in this order)
