"""The `affine` scheme's math (SPEC.md §6): double-quantized metadata and dequantization.

Weight (out, in) is cut along `in` into groups of g (the last group padded). Each group has a
scale s and a zero z (z in code units), and the weight is  w = (q - z) · s  with q a b-bit code.
The (out, n_groups) scale and zero arrays are each stored as 8- or 6-bit codes (the config's
meta_bits) in runs of 128 consecutive values (row-major), every run with fp16 (step, min):
value = code · step + min. In memory codes are always uint8 (out, n_groups); 6-bit codes are
bit-packed only in the file (stored_blobs / loaded_blobs convert, the writer and reader call them).
This module is the NumPy reference every backend and kernel is tested against.
"""
from __future__ import annotations

import math

import numpy as np

from .layout import META_ARRAYS, META_GROUP_SIZE, StorageConfig, affine_dims, blob_specs, leaves
from .lut import dequantize_lut
from .trellis import dequantize_trellis
from .vq import dequantize_vq
from .packing import CODES_PER_PACK, pack_codes, unpack_codes
from .rows import dequantize_rows

def _fp16_toward(values: np.ndarray, direction: float) -> np.ndarray:
    """Round float32 values to fp16, stepping one ulp toward `direction` where rounding went past."""
    half = values.astype(np.float16)
    past = (half.astype(np.float32) > values) if direction < 0 else (half.astype(np.float32) < values)
    half[past] = np.nextafter(half[past], np.float16(direction))
    return half


def encode_meta(values: np.ndarray, meta_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Double-quantize (out, n_groups) float values → (uint8 codes (out, n_groups), fp16 (n_runs, 2)).

    Each run of 128 consecutive values (row-major; the last run may be short) gets min rounded
    down and step rounded up to fp16, so every value is covered by codes 0..2^meta_bits − 1.
    """
    levels = (1 << meta_bits) - 1
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)) or (values.size and np.abs(values).max() > 60000.0):
        raise ValueError("metadata values must be finite and within fp16 range")
    flat = values.reshape(-1)
    n_runs = math.ceil(flat.size / META_GROUP_SIZE)
    padded = np.empty(n_runs * META_GROUP_SIZE, dtype=np.float32)
    padded[: flat.size] = flat
    padded[flat.size:] = flat[-1] if flat.size else 0.0  # padding repeats the last value: no effect on min/max
    runs = padded.reshape(n_runs, META_GROUP_SIZE)  # (n_runs, 128)
    run_min = _fp16_toward(runs.min(axis=1), -np.inf)
    run_step = _fp16_toward((runs.max(axis=1) - run_min.astype(np.float32)) / levels, np.inf)
    step32 = run_step.astype(np.float32)
    safe_step = np.where(step32 > 0, step32, 1.0)
    codes = np.rint((runs - run_min.astype(np.float32)[:, None]) / safe_step[:, None])
    codes = np.clip(codes, 0, levels).astype(np.uint8)
    codes[step32 == 0] = 0
    meta = np.stack([run_step, run_min], axis=1)  # (n_runs, 2): step, min
    return codes.reshape(-1)[: flat.size].reshape(values.shape), meta


def decode_meta(codes: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """Inverse of encode_meta: (out, n_groups) uint8 codes + fp16 (n_runs, 2) → float32 values."""
    flat = codes.reshape(-1).astype(np.float32)
    run = np.arange(flat.size) // META_GROUP_SIZE
    step = meta[:, 0].astype(np.float32)[run]
    low = meta[:, 1].astype(np.float32)[run]
    return (flat * step + low).reshape(codes.shape)


def dequantize(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """Reference dequantization of one stored tensor (any scheme) → float32 array of `shape` (`rows`: in
    the logical row order; ValueError if its row_order is not a permutation)."""
    if config.scheme == "fp16":
        return np.asarray(blobs["data"], dtype=np.float32).reshape(shape)
    if config.scheme == "lut":
        return dequantize_lut(blobs, shape, config)
    if config.scheme == "vq":
        return dequantize_vq(blobs, shape, config)
    if config.scheme == "trellis":
        return dequantize_trellis(blobs, shape, config)
    if config.scheme == "rows":
        return dequantize_rows(blobs, shape, config)
    out_features, in_features, n_groups = affine_dims(shape, config.group_size)
    g = config.group_size
    codes = unpack_codes(blobs["qweight"], config.bits).reshape(out_features, n_groups, g)
    scale = decode_meta(blobs["scale_codes"], blobs["scale_meta"])  # (out, n_groups)
    zero = decode_meta(blobs["zero_codes"], blobs["zero_meta"])  # (out, n_groups)
    weight = (codes.astype(np.float32) - zero[:, :, None]) * scale[:, :, None]  # (out, n_groups, g)
    weight = weight.reshape(out_features, n_groups * g)[:, :in_features]
    if config.outliers:
        rows, cols, values = csr_entries(blobs)
        weight[rows, cols] += values
    return np.ascontiguousarray(weight)


def csr_entries(blobs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outliers as (row, col, float32 value) triplets from the CSR blobs."""
    row_ptr = blobs["outlier_row_ptr"].astype(np.int64)
    rows = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
    return rows, blobs["outlier_cols"].astype(np.int64), blobs["outlier_values"].astype(np.float32)


def csr_problem(blobs: dict, shape) -> str | None:
    """Why the CSR outlier blobs are inconsistent with `shape`, or None when they are sound:
    row_ptr starts at 0, never decreases, ends at nnz; columns are < in_features and strictly
    increasing within a row. Runtimes check this before using the blobs."""
    row_ptr = blobs["outlier_row_ptr"].astype(np.int64)
    cols = blobs["outlier_cols"].astype(np.int64)
    if row_ptr[0] != 0 or row_ptr[-1] != cols.size:
        return f"outlier_row_ptr must run from 0 to {cols.size}"
    steps = np.diff(row_ptr)
    if np.any(steps < 0):
        return "outlier_row_ptr decreases"
    if cols.size and cols.max() >= shape[1]:
        return f"outlier column {int(cols.max())} >= in_features {shape[1]}"
    rising = np.diff(cols) > 0
    row_starts = row_ptr[1:-1]  # a new row may restart the column order
    rising[row_starts[(row_starts > 0) & (row_starts < cols.size)] - 1] = True
    if not np.all(rising):
        return "outlier columns are not strictly increasing within a row"
    return None


def build_csr(shape, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> dict:
    """CSR blobs (row_ptr uint32, cols uint16, values fp16) from outlier coordinates (any order)."""
    order = np.lexsort((cols, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    row_ptr = np.zeros(shape[0] + 1, dtype=np.uint32)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=row_ptr[1:])
    return {"outlier_row_ptr": row_ptr, "outlier_cols": cols.astype(np.uint16),
            "outlier_values": values.astype(np.float16)}


def _meta_form(blobs: dict, shape, config: StorageConfig, to_file: bool) -> dict:
    """stored_blobs / loaded_blobs: 6-bit metadata codes (affine's scales and zeros, vq's scales) between
    uint8 (out, G) and their packed file blob (layout.meta_codes_spec); every other blob is passed
    through as is (views stay views)."""
    out = dict(blobs)
    for prefix, part_shape, part in leaves(shape, config):
        if part.scheme not in META_ARRAYS or part.meta_bits == 8:
            continue
        out_features, _, n_groups = affine_dims(part_shape, part.group_size)
        n = out_features * n_groups
        for name in (prefix + array for array in META_ARRAYS[part.scheme]):
            if to_file:
                flat = np.zeros(-(-n // CODES_PER_PACK) * CODES_PER_PACK, np.uint8)
                flat[:n] = np.asarray(blobs[name]).reshape(-1)
                out[name] = pack_codes(flat, part.meta_bits)
            else:
                out[name] = unpack_codes(blobs[name], part.meta_bits)[:n].reshape(out_features, n_groups)
    return out


def stored_blobs(blobs: dict, shape, config: StorageConfig) -> dict:
    """A tensor's blobs as the file stores them (what check_blobs and the cost model describe), from
    their in-memory form (quantize's output; metadata codes uint8 (out, G) at any meta_bits)."""
    return _meta_form(blobs, shape, config, to_file=True)


def loaded_blobs(blobs: dict, shape, config: StorageConfig) -> dict:
    """The in-memory form of a tensor's file blobs (6-bit metadata codes unpacked to uint8 (out, G));
    8-bit codes and every other blob stay zero-copy views."""
    return _meta_form(blobs, shape, config, to_file=False)


def check_blobs(blobs: dict, shape, config: StorageConfig) -> None:
    """Raise ValueError unless `blobs` has exactly the dtypes and shapes the layout prescribes."""
    specs = blob_specs(shape, config)
    if set(blobs) != set(specs):
        raise ValueError(f"blobs {sorted(blobs)} != expected {sorted(specs)}")
    for name, spec in specs.items():
        array = blobs[name]
        if array.dtype != np.dtype(spec.dtype) or tuple(array.shape) != spec.shape:
            raise ValueError(f"blob {name}: {array.dtype}{list(array.shape)} != {spec.dtype}{list(spec.shape)}")
