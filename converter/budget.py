"""What a byte budget buys: the matrices stored once (embedding, untied lm_head) as allocation
decisions beside the decoder linears, and the file bytes `--fit SIZE --context N` leaves once the
runtime's own memory is paid.

    --size S            file bytes ≤ S; every stored tensor's config chosen by one MILP
    --fit S --context N runtime footprint (runtime/footprint.py: file + KV cache for N positions × batch
                        + activations, scratch, tokenizer, interpreter, kernels) ≤ S, i.e. the same
                        allocation with file bytes ≤ S − (footprint of an empty file)

A tied matrix is one decision: it is stored once and its Fisher counts both uses (calibration_store.
MatrixFisher). Its errors are measured like a linear's (converter/measure.py) with the candidates below.
"""
from __future__ import annotations

import numpy as np

from ..format_spec import GROUP_SIZES
from ..runtime.errors import ModelError
from ..runtime.footprint import Footprint, footprint
from .candidates import META6_CHOICES, parse_candidates
from .errors import ConversionError

# fp16 and the affine widths an embedding can usefully take (the runtime gathers and dequantizes rows of
# any affine config; 2 bits is not offered: one embedding row is a whole token's meaning), with the
# linears' 6-bit metadata choices
MATRIX_CANDIDATES = parse_candidates(",".join(["fp16"] + [f"b{b}g{g}" for b in (8, 6, 5, 4, 3) for g in GROUP_SIZES]
                                              + META6_CHOICES))


def runtime_overhead(checkpoint, options) -> Footprint:
    """The footprint of `--fit`'s context and batch with a zero-byte file: what SIZE pays besides the
    file. Counted with the compiled kernels loaded and this machine's thread count (runtime defaults)."""
    try:
        return footprint(checkpoint.config, 0, options.context, options.batch, kernels=True,
                         tokenizer_bytes=len(checkpoint.tokenizer_data))
    except ModelError as error:
        raise ConversionError(f"--fit: {error}") from None


def file_budget(checkpoint, options) -> int:
    """Bytes the file may take: --size, or what --fit leaves after the runtime's own memory."""
    if options.fit is None:
        return options.size
    overhead = runtime_overhead(checkpoint, options).total
    if options.fit <= overhead:
        raise ConversionError(f"--fit {options.fit:,} bytes is infeasible: at --context {options.context} "
                              f"--batch {options.batch} the runtime itself needs {overhead:,} bytes before the file")
    return options.fit - overhead


def padded(rows: list[np.ndarray], fill_cost: bool) -> np.ndarray:
    """Rows of different lengths (one per matrix: its own candidates' costs or errors) → (N, width).
    Padding is never chosen: a padded cost is the row's maximum + 1, a padded error the row's maximum,
    so the row's costliest real config dominates it (allocate drops dominated configs; greedy never
    upgrades to a worse error)."""
    width = max(len(r) for r in rows)
    out = np.empty((len(rows), width), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        out[i, len(r):] = r.max() + 1 if fill_cost else r.max()
    return out
