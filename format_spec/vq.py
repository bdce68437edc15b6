"""The `vq` scheme's reference codec (SPEC.md §12): vector quantization with a per-tensor codebook.

Every `dim` consecutive inputs of a row form a vector; its (dim·b)-bit index picks one of the tensor's
2^(dim·b) codebook points (fp16, `dim` coordinates each), and a double-quantized scale per `group_size`
inputs (as affine's scales, SPEC.md §6.2; no zero) stretches it:

    W[r, c] = scale[r, c div g] · codebook[index[r, c div dim], c mod dim]        (+ CSR outliers)

Indices are packed like affine codes (packing.py) with dim·b bits each, a row's ceil(in / dim) indices
padded to whole uint32 words (format 1.8; whole packs of 32 in 1.6 and 1.7: either width decodes here).
This module is the NumPy reference every backend and kernel is tested against.
"""
from __future__ import annotations

import numpy as np

from .layout import StorageConfig, vq_dims
from .packing import unpack_codes


def vq_indices(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """(out, ceil(in / dim)) uint8 (uint16 for 12-bit indices): each row's codebook indices, padding dropped."""
    out_features, in_features, _, _ = vq_dims(shape, config)
    n_vectors = -(-in_features // config.dim)
    return unpack_codes(blobs["qweight"], config.index_bits)[:, :n_vectors]


def dequantize_vq(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """Reference dequantization of one `vq` tensor → float32 (out, in), outliers included; scale codes
    in their in-memory form (uint8 (out, G), format_spec.affine.loaded_blobs)."""
    from .affine import csr_entries, decode_meta  # affine's metadata and CSR outliers are shared

    out_features, in_features, _, n_groups = vq_dims(shape, config)
    points = np.asarray(blobs["codebook"]).astype(np.float32)  # (2^(dim·b), dim)
    index = vq_indices(blobs, shape, config).astype(np.intp)  # (out, n_vectors)
    weight = points[index].reshape(out_features, -1)[:, :in_features]  # (out, in)
    scale = decode_meta(blobs["scale_codes"], blobs["scale_meta"])  # (out, G)
    weight = weight * np.repeat(scale, config.group_size, axis=1)[:, :in_features]
    if config.outliers:
        rows, cols, values = csr_entries(blobs)
        weight[rows, cols] += values
    return np.ascontiguousarray(weight, dtype=np.float32)
