"""The `lut` scheme's reference codec (SPEC.md §7): non-uniform codebooks, as in CMPQ / SqueezeLLM.

Each output channel r (or each run of `codebook_rows` consecutive channels) has a codebook of 2^b
fp16 levels; the weight at (r, c) is the level its b-bit code picks:

    W[r, c] = codebook[r div codebook_rows, q[r, c]]        (+ CSR outliers, as in `affine`)

Codes are packed exactly like affine codes (packing.py), each row padded to whole packs of 32.
This module is the NumPy reference every backend and kernel is tested against.
"""
from __future__ import annotations

import numpy as np

from .layout import StorageConfig, lut_dims
from .packing import unpack_codes


def codebook_of_rows(codebook: np.ndarray, rows: np.ndarray, codebook_rows: int) -> np.ndarray:
    """float32 (R, 2^b): the codebook of each row in `rows` (R,)."""
    return codebook[np.asarray(rows) // codebook_rows].astype(np.float32)


def dequantize_lut(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """Reference dequantization of one `lut` tensor → float32 (out, in), outliers included."""
    from .affine import csr_entries  # the CSR outliers are shared with affine

    out_features, in_features, _ = lut_dims(shape)
    codes = unpack_codes(blobs["qweight"], config.bits)[:, :in_features]  # (out, in) uint8
    levels = codebook_of_rows(blobs["codebook"], np.arange(out_features), config.codebook_rows)  # (out, 2^b)
    weight = np.take_along_axis(levels, codes.astype(np.intp), axis=1)  # (out, in)
    if config.outliers:
        rows, cols, values = csr_entries(blobs)
        weight[rows, cols] += values
    return np.ascontiguousarray(weight)
