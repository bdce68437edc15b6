"""The `rows` scheme's reference codec (SPEC.md §8): row blocks with their own configs, in a stored row order.

A (out, in) matrix W is stored as k ≥ 2 blocks of whole rows; block i holds `count_i` rows and is
stored by its own scheme (affine, lut, vq or fp16) as a (count_i, in) matrix B_i. The stored rows are
block 0's, then block 1's, ... and stored row s is row `row_order[s]` of W:

    W[row_order[start_i + j], :] = B_i[j, :]        (start_i = count_0 + ... + count_{i-1}, 0 ≤ j < count_i)

row_order must be a permutation of 0 .. out−1. This module is the NumPy reference every backend
is tested against; writers (the converter) build a tensor's blobs with `join_blocks`.
"""
from __future__ import annotations

import numpy as np

from .layout import StorageConfig, block_blobs, row_order_dtype


def block_starts(config: StorageConfig) -> np.ndarray:
    """int64 (k + 1,): the first stored row of each block, then out_features."""
    return np.concatenate([[0], np.cumsum(config.row_counts)]).astype(np.int64)


def row_order_problem(row_order: np.ndarray, out_features: int) -> str | None:
    """Why `row_order` is not a permutation of 0 .. out_features−1, or None when it is."""
    order = np.asarray(row_order).reshape(-1).astype(np.int64)
    if order.size != out_features:
        return f"row_order has {order.size} entries, not {out_features}"
    if order.size and (order.min() < 0 or order.max() >= out_features):
        bad = int(order[(order < 0) | (order >= out_features)][0])
        return f"row_order holds row {bad}, outside 0..{out_features - 1}"
    counts = np.bincount(order, minlength=out_features)
    if np.any(counts != 1):
        row = int(np.flatnonzero(counts > 1)[0])
        return f"row_order is not a permutation: row {row} appears {int(counts[row])} times"
    return None


def inverse_order(row_order: np.ndarray) -> np.ndarray:
    """int64 (out,): the stored position of each logical row (inverse[row_order[s]] = s)."""
    order = np.asarray(row_order).astype(np.int64)
    inverse = np.empty(order.size, np.int64)
    inverse[order] = np.arange(order.size)
    return inverse


def content_problem(blobs: dict, shape, config: StorageConfig, weights: bool = False) -> str | None:
    """Why a tensor's blob CONTENT breaks the rules a reader checks before using it, or None:
    a float16 blob that is not finite (fp16 weights too with `weights`), the CSR outliers (SPEC.md §6.1)
    and, for `rows`, the row_order permutation and every block's outliers (shapes and dtypes are the
    reader's job, §9)."""
    return nonfinite_problem(blobs, weights) or structure_problem(blobs, shape, config)


def nonfinite_problem(blobs: dict, weights: bool = False) -> str | None:
    """A float16 blob (metadata, codebook, outlier values; with `weights`, an fp16 tensor's `data` too) holding
    NaN or ±inf, which no writer stores (SPEC.md §9): kernels would compute garbage from it, or fail. fp16
    weights are left to `mxq verify` by default: they can be large (an embedding), and a lean runtime touches
    only the rows it uses."""
    for name, array in blobs.items():
        if array.dtype != np.float16 or (not weights and name.rsplit(".", 1)[-1] == "data"):
            continue
        if not np.isfinite(array).all():
            return f"blob '{name}' holds NaN or infinity"
    return None


def structure_problem(blobs: dict, shape, config: StorageConfig) -> str | None:
    """content_problem's CSR and row_order rules."""
    from .affine import csr_problem

    if config.scheme == "rows":
        problem = row_order_problem(blobs["row_order"], shape[0])
        if problem:
            return problem
        for i, (count, block) in enumerate(config.blocks):
            problem = structure_problem(block_blobs(blobs, i), (count, shape[1]), block)
            if problem:
                return f"block {i}: {problem}"
        return None
    if config.scheme != "fp16" and config.outliers:
        return csr_problem(blobs, shape)
    return None


def dequantize_rows(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """Reference dequantization of one `rows` tensor → float32 (out, in) in the logical row order.
    Raises ValueError for a row_order that is not a permutation."""
    from .affine import dequantize

    out_features, in_features = shape
    problem = row_order_problem(blobs["row_order"], out_features)
    if problem:
        raise ValueError(problem)
    weight = np.empty((out_features, in_features), np.float32)
    starts = block_starts(config)
    order = blobs["row_order"].astype(np.int64)
    for i, (count, block) in enumerate(config.blocks):
        weight[order[starts[i]: starts[i + 1]]] = dequantize(block_blobs(blobs, i), (count, in_features), block)
    return weight


def join_blocks(row_order: np.ndarray, blocks: list) -> dict:
    """The blobs of a `rows` tensor: row_order (stored row s is logical row row_order[s]) and each
    block's own blobs (a dict per block, in stored order) under the names `i.<blob>`."""
    order = np.asarray(row_order)
    joined = {"row_order": order.astype(row_order_dtype(order.size))}
    for i, blobs in enumerate(blocks):
        joined.update({f"{i}.{name}": array for name, array in blobs.items()})
    return joined
