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

import math

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


# -- codebooks on an 8-bit grid (SPEC.md §12.5: informative, not a format change) -------------------------------------
GRID_MAX = 127  # a grid codebook's coordinates are integers in [−127, 127] times one power of two
GRID_DIM = 4  # the points mxq's converter puts on the grid, and its CPU runtime's integer kernel takes (4 bytes a point)


def grid_exponent(amax: float) -> int:
    """The smallest e with amax ≤ GRID_MAX·2^e (amax > 0, finite)."""
    e = math.ceil(math.log2(amax / GRID_MAX))
    while amax > GRID_MAX * 2.0 ** e:  # (log2's rounding, either way)
        e += 1
    while amax <= GRID_MAX * 2.0 ** (e - 1):
        e -= 1
    return e


def int8_grid(points: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(codes int8 (n, d), e) with points == codes·2^e exactly (as fp16 widened to float), for the smallest such e
    whose codes fit [−127, 127]; None when the points are not on such a grid (or not all finite). An all-zero
    codebook is codes 0, e 0."""
    values = np.asarray(points).astype(np.float64)
    if not np.isfinite(values).all():
        return None
    amax = float(np.abs(values).max(initial=0.0))
    if amax == 0.0:
        return np.zeros(values.shape, np.int8), 0
    e = grid_exponent(amax)
    codes = values / 2.0 ** e  # exact: a power-of-two division of an fp16 value
    if not np.array_equal(codes, np.rint(codes)):
        return None
    return codes.astype(np.int8), e


def snap_to_int8_grid(points: np.ndarray) -> np.ndarray:
    """fp16 points (n, d) moved to the nearest points of the 8-bit grid of their largest |coordinate| (each
    coordinate by at most 2^(e−1), e = grid_exponent(max |points|)), so that int8_grid finds them; points already
    on a grid (and non-finite or all-zero ones) come back unchanged. Where a grid value is below fp16's normal
    range (max |points| < 2^-8) it may not be representable: then int8_grid returns None for the result."""
    points = np.asarray(points, dtype=np.float16)
    if int8_grid(points) is not None or not np.isfinite(points).all():
        return points
    values = points.astype(np.float64)
    e = grid_exponent(float(np.abs(values).max()))
    return (np.clip(np.rint(values / 2.0 ** e), -GRID_MAX, GRID_MAX) * 2.0 ** e).astype(np.float16)
