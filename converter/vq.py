"""The `vq` scheme's quantizer (SPEC.md §12): one matrix's codebook, scales and indices.

    W (out, in) ──groups of g──► initial scales s₀ = rms(group)
        ├─ codebook: weighted k-means (kernels.vq_kmeans) of the normalized vectors w/s₀ (`dim` consecutive
        │  weights), each coordinate weighing importance·s₀² (its weight in ‖W − Ŵ‖ terms), on an evenly
        │  spread sample of FIT_VECTORS vectors of the whole matrix; rounded to fp16
        ├─ REFITS × { indices = the nearest scaled point (kernels.vq_round, importance-weighted)
        │             scales  = weighted least squares Σ a·w·p / Σ a·p² per group, double-quantized to the
        │                       config's metadata codes and decoded }
        └─ indices for the decoded scales ─► error ‖W − Ŵ‖²_F of what is stored (per row)

The codebook depends on the whole matrix only (not on a row sample), so quantizing a sample of rows
gives exactly those rows of the whole matrix's quantization (but for the metadata runs they share, as
affine): measure.py estimates a vq config's error from a row sample as it does an affine one's.
Outliers (+oN) are excluded from every fit and store their fp16 residual, as in affine and lut.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..format_spec import StorageConfig, decode_meta, encode_meta, pack_codes, snap_to_int8_grid
from ..format_spec.layout import vq_dims
from ..format_spec.vq import GRID_DIM
from .kernels import vq_kmeans, vq_round

FIT_VECTORS = 32768  # vectors the codebook is fitted on (an even spread over the matrix; 128 per point at 256)
KMEANS_ITERS = 16
REFITS = 2  # rounds of (indices, least-squares scales) before the final indices


def _padded(array: np.ndarray, width: int) -> np.ndarray:
    """(out, in) → (out, width) float32, zero columns appended."""
    out = np.zeros((array.shape[0], width), np.float32)
    out[:, :array.shape[1]] = array
    return out


def _initial_scales(w: np.ndarray, in_features: int, group_size: int) -> np.ndarray:
    """(out, G) float32: each group's RMS over its real weights (1 for an all-zero group); w (out, ≥ in),
    columns past in_features ignored."""
    n_groups = math.ceil(in_features / group_size)
    starts = np.arange(n_groups) * group_size
    counts = np.minimum(group_size, in_features - starts)  # (G,)
    sums = np.add.reduceat(np.square(w[:, :in_features], dtype=np.float64), starts, axis=1)  # (out, G)
    rms = np.sqrt(sums / counts)
    return np.where(rms > 0, rms, 1.0).astype(np.float32)


def fit_codebook(weight: np.ndarray, importance: np.ndarray | None, config: StorageConfig) -> np.ndarray:
    """The fp16 codebook (2^(dim·bits), dim) of W (out, in) for `config`: weighted k-means of its
    normalized vectors (module doc), on an evenly spaced sample of them (memory: the sample and the
    (out, G) scales, not copies of W). Deterministic: a function of W, the importance and the config."""
    xs, ws = sample_vectors(weight, importance, config.group_size, config.dim, FIT_VECTORS)
    return kmeans_codebook(xs, ws, config.index_bits, KMEANS_ITERS)


def kmeans_codebook(xs: np.ndarray, ws: np.ndarray, index_bits: int, iters: int) -> np.ndarray:
    """fp16 (2^index_bits, d): weighted k-means (kernels.vq_kmeans) of vectors xs (n, d) with weights ws (n, d),
    started from 2^index_bits distinct sample vectors chosen by a fixed seed (zeros when xs is empty); 4-D points
    then moved to the 8-bit grid of their largest coordinate (format_spec.snap_to_int8_grid: SPEC.md §12.5, the CPU
    runtime's integer kernel; each coordinate by ≤ max|point|/254), before any index or scale is fitted to them."""
    K, d = 1 << index_bits, xs.shape[1]
    if len(xs) == 0:
        return np.zeros((K, d), np.float16)
    start = np.random.default_rng(K * 7919 + d).permutation(len(xs))[:K]  # K distinct sample vectors
    points = np.zeros((K, d), np.float32)
    points[:len(start)] = xs[start]
    vq_kmeans(np.ascontiguousarray(xs, dtype=np.float32), np.ascontiguousarray(ws, dtype=np.float32), points, iters)
    points = np.clip(points, -65504.0, 65504.0).astype(np.float16)
    return snap_to_int8_grid(points) if d == GRID_DIM else points


def sample_vectors(weight: np.ndarray, importance: np.ndarray | None, group_size: int, dim: int, count: int):
    """(xs (n, dim), ws (n, dim)) float32, n ≤ count: W's vectors of `dim` consecutive weights at evenly spaced
    places, each divided by its group's RMS s₀, with the k-means weights importance·s₀² (1·s₀² without
    importance) normalized to mean 1; vectors whose weights are all 0 (padding, outliers) left out."""
    out_features, in_features = weight.shape
    g, d = group_size, dim
    n_groups = math.ceil(in_features / g)
    scale = _initial_scales(weight, in_features, g)  # (out, G)
    per_row = n_groups * g // d  # vectors per row, padding included
    total = out_features * per_row
    pick = np.unique(np.linspace(0, total - 1, min(2 * count, total)).round().astype(np.int64))
    rows = pick // per_row
    cols = (pick % per_row)[:, None] * d + np.arange(d)[None, :]  # (n, d)
    real = cols < in_features
    safe = np.minimum(cols, in_features - 1)
    s = scale[rows, cols[:, 0] // g][:, None]  # (n, 1)
    x = np.where(real, weight[rows[:, None], safe], 0.0) / s  # (n, d) normalized vectors
    a = importance[rows[:, None], safe] if importance is not None else np.ones(cols.shape, np.float32)
    aw = np.where(real, a, 0.0).astype(np.float64) * (s.astype(np.float64) ** 2)
    alive = np.flatnonzero(aw.sum(1) > 0)
    if alive.size == 0:
        return np.zeros((0, d), np.float32), np.zeros((0, d), np.float32)
    alive = alive[np.linspace(0, alive.size - 1, min(count, alive.size)).round().astype(np.int64)]
    xs = np.ascontiguousarray(x[alive], dtype=np.float32)
    ws = np.ascontiguousarray(aw[alive] / aw[alive].mean(), dtype=np.float32)
    return xs, ws


def shared_points(codebooks: dict | None, config: StorageConfig) -> np.ndarray:
    """The fp16 shared codebook (2^k, dim) a `shared` vq config uses; a trellis config: its table (4096, 1), keyed
    (K, 0) (converter/shared_codebooks.py)."""
    points = (codebooks or {}).get((config.bits, config.dim))
    if points is None and config.scheme == "trellis":
        raise ValueError(f"{config.label}: no trellis table for K = {config.bits} was given")
    if points is None:
        raise ValueError(f"{config.label}: no shared codebook for bits {config.bits}, dim {config.dim} was given")
    return points


def _round(w3, a3, keep3, in_features, scale, config, points, pack: bool, keep_residual: bool):
    """vq_round's (index, residual, row_sq, row_weighted) for the decoded `scale` (out, G)."""
    out_features, n_vectors, d = w3.shape
    width = vq_dims((out_features, in_features), config)[2]  # the row's padded index slots (SPEC.md §12.1)
    index_dtype = np.uint8 if config.index_bits <= 8 else np.uint16
    index = np.empty((out_features, width), index_dtype) if pack else np.zeros((0, 0), index_dtype)
    residual = np.empty(w3.shape, np.float32) if keep_residual else np.zeros((0, 0, 0), np.float32)
    row_sq, row_weighted = np.empty(out_features), np.empty(out_features)
    vq_round(w3, a3, keep3, in_features, scale, config.group_size, points, index, residual, row_sq, row_weighted)
    return index, residual, row_sq, row_weighted


def _least_squares_scales(w, a, points, index, scale, config, in_features):
    """Per group: s = Σ a·w·p / Σ a·p² for the chosen points (the old scale where Σ a·p² = 0)."""
    out_features, n_groups = scale.shape
    g, d = config.group_size, config.dim
    n_vectors = -(-in_features // d)
    p = points[index[:, :n_vectors].astype(np.intp)].reshape(out_features, n_vectors * d)  # (out, V·d)
    p = _padded(p[:, :in_features], n_groups * g).reshape(out_features, n_groups, g)
    wg = w.reshape(out_features, n_groups, g)
    ag = a.reshape(out_features, n_groups, g)
    num = (ag * wg * p).sum(2, dtype=np.float64)
    den = (ag * p * p).sum(2, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), scale).astype(np.float32)


def quantize_vq(weight: torch.Tensor, config: StorageConfig, pack: bool, importance, outliers,
                rows: torch.Tensor | None = None, keep_residual: bool = False, floor: float = 0.0,
                codebooks: dict | None = None):
    """(blobs, row_sq, row_weighted, residual (out, in) or None) of W (out, in) at a vq `config`: the
    module doc's fit. outliers: None or an (out, in) bool mask (they weigh nothing in the fits and their
    residuals are returned for the caller to store). rows: quantize only these rows (a sample), with the
    whole matrix's codebook. floor: added to the importance in the fits. codebooks: {(bits, dim): fp16
    points} of the file's shared codebooks (converter/shared_codebooks.py), which a `shared` config uses
    instead of fitting its own (its blobs then have no codebook: SPEC.md §12.4)."""
    w_full = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    imp_full = importance.numpy().astype(np.float32) + np.float32(floor) if importance is not None else None
    if outliers is not None:
        imp_full = np.where(outliers.numpy(), 0.0, imp_full if imp_full is not None else 1.0).astype(np.float32)
    points = shared_points(codebooks, config) if config.shared else fit_codebook(w_full, imp_full, config)
    decoded_points = points.astype(np.float32)
    if rows is not None:
        w_full = w_full[rows.numpy()]
        imp_full = imp_full[rows.numpy()] if imp_full is not None else None
    out_features, in_features = w_full.shape
    n_groups = vq_dims(w_full.shape, config)[3]
    g, d = config.group_size, config.dim
    w = _padded(w_full, n_groups * g)  # (out, G·g)
    a = _padded(imp_full, n_groups * g) if imp_full is not None else None
    n_vectors = -(-in_features // d)
    w3 = np.ascontiguousarray(w[:, :n_vectors * d].reshape(out_features, n_vectors, d))
    a3 = np.ascontiguousarray(a[:, :n_vectors * d].reshape(out_features, n_vectors, d)) if a is not None else \
        np.zeros((0, 0, 0), np.float32)
    keep3 = np.zeros((0, 0, 0), np.bool_)  # every real position counts in the errors ...
    if outliers is not None:  # ... but the outliers' (they also weigh 0 in a3)
        kept = ~outliers.numpy()[rows.numpy()] if rows is not None else ~outliers.numpy()
        keep3 = np.ascontiguousarray(np.pad(kept, ((0, 0), (0, n_vectors * d - in_features))).reshape(w3.shape))
    scale = _initial_scales(w, in_features, g)  # (out, G)
    fit_weights = a if a is not None else _padded(np.ones(w_full.shape, np.float32), n_groups * g)  # (out, G·g)
    for _ in range(REFITS):
        index = _round(w3, a3, keep3, in_features, scale, config, decoded_points, True, False)[0]
        fitted = _least_squares_scales(w, fit_weights, decoded_points, index, scale, config, in_features)
        codes, meta = encode_meta(fitted, config.meta_bits)
        scale = decode_meta(codes, meta).astype(np.float32)
    index, residual, row_sq, row_weighted = _round(w3, a3, keep3, in_features, scale, config, decoded_points,
                                                   pack, keep_residual or outliers is not None)
    blobs = {}
    if pack:
        blobs = {"qweight": pack_codes(index, config.index_bits), "codebook": points, "scale_codes": codes,
                 "scale_meta": meta}
        if config.shared:  # the file's codebook tensor
            del blobs["codebook"]
    residual_2d = None
    if residual.size:
        residual_2d = torch.from_numpy(_padded(residual.reshape(out_features, -1), n_vectors * d)[:, :in_features]
                                       .copy())
    return blobs, row_sq, row_weighted, residual_2d

