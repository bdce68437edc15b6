"""Group-wise affine quantization of one weight matrix to exactly what the file stores.

    W (out, in) ──pad to G·g──► groups (out, G, g)
        ├─ outliers (optional): the largest-|w| weights leave the groups (stored as fp16 CSR residuals)
        ├─ scale/zero per group: min-max (`rtn`), HQQ's half-quadratic proximal updates of the zero
        │  on an l_p<1 error (`hqq`, calibration-free), or an importance-weighted search over candidate
        │  scales with a weighted least-squares fit of scale and offset for each (`wls`, as llama.cpp's
        │  k-quants; weights from calibration when given, else |w|-based; a Numba kernel, kernels.py)
        ├─ double-quantize scale and zero to 8- or 6-bit codes (format_spec.encode_meta), decode them back
        └─ codes = clamp(round(w / ŝ + ẑ)) with the *decoded* ŝ, ẑ ─► error ‖W − Ŵ‖²_F of what is stored
           (kernels.round_groups, per row, so a row sample's errors can be scaled to the matrix)

    W (out, in) ──vq──► a codebook of `dim`-dimensional points per matrix, a scale per group, an index per
        `dim` weights (converter/vq.py)

    W (out, in) ──lut──► per output channel (or per `codebook_rows` channels) 2^b levels by weighted
        k-means (importance as above, data-free: plain k-means), rounded to fp16 ─► codes = the nearest
        stored level; outliers as above (the `quantizer` knob is affine's: lut has one fit)

    W (out, in) ──trellis──► each row one walk through a trellis of the file's table for its bits, a scale
        per group (converter/trellis.py; one fit, whatever the `quantizer` knob; no outliers)

`rtn`/`hqq` run in row chunks of ~256K weights so their many elementwise passes stay in cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..format_spec import StorageConfig, build_csr, decode_meta, encode_meta, pack_codes
from ..format_spec.layout import lut_dims
from .kernels import lut_kmeans, lut_round, round_groups, wls_scale_zero
from .options import OUTLIER_MODES, QUANTIZERS
from .trellis import quantize_trellis
from .vq import quantize_vq, shared_points

CHUNK_WEIGHTS = 1 << 18
ZERO_LIMIT = float(1 << 14)  # |zero point| in quantization steps; fp16 run metadata holds it exactly enough
HQQ_ITERS, HQQ_LP, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


@dataclass
class Quantized:
    blobs: dict  # blob name -> numpy array, exactly as the writer stores them
    error_sq: float  # ‖W − Ŵ‖²_F of the stored tensor
    weighted_error: float  # Σ importance·(W − Ŵ)² (equals error_sq without importance)
    residual: torch.Tensor | None = None  # W − Ŵ (out, in) before outliers; only when asked for
    row_weighted: torch.Tensor | None = None  # (out,) float64: weighted_error of each row
    row_error_sq: torch.Tensor | None = None  # (out,) float64: error_sq of each row (without outliers' leftovers)


def sum64(t) -> float:
    """Σ t as a float, summed by NumPy in float64 (pairwise, one thread). torch splits a whole-tensor sum
    of 32768+ elements over its threads, so the last bits would depend on the thread count — and a
    1-thread cluster task must give the bits of an N-thread local run."""
    return float(np.sum(t.detach().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64))


def _groups(weight: torch.Tensor, group_size: int):
    """(out, in) → (out, G, g) weights, zero-padded to G·g columns (a view when no padding is needed),
    and a (1, G, g) mask of real positions."""
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group_size)
    if n_groups * group_size == in_features and weight.is_contiguous():
        padded = weight.to(torch.float32)
    else:
        padded = torch.zeros(out_features, n_groups * group_size, dtype=torch.float32)
        padded[:, :in_features] = weight
    mask = torch.zeros(n_groups * group_size, dtype=torch.bool)
    mask[:in_features] = True
    return padded.view(out_features, n_groups, group_size), mask.view(1, n_groups, group_size)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm, as in HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def _scale_zero(w: torch.Tensor, keep: torch.Tensor, bits: int, quantizer: str):
    """Per-group (scale, zero) for one chunk (`rtn`, `hqq`); w (rows, G, g), keep marks weights that count."""
    levels = (1 << bits) - 1
    big = torch.finfo(torch.float32).max
    low = torch.where(keep, w, big).amin(dim=2)  # (rows, G)
    high = torch.where(keep, w, -big).amax(dim=2)
    empty = ~keep.any(dim=2)
    low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
    span = high - low
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    zero = -low / scale
    if quantizer == "hqq":
        zero = _hqq_zero(w, keep, scale, zero, levels)
    return scale, zero


def _bounded_zero(scale: torch.Tensor, zero: torch.Tensor):
    """A nearly constant group far from 0 (span ≪ |values|) gets a zero point of ±|w|/span levels,
    beyond what the fp16 run metadata can hold. Cap |zero| at ZERO_LIMIT by coarsening that group's
    scale: the offset −zero·scale (the group's lowest value) is kept, the codes' step grows, and the
    extra error is at most |w| / (2·ZERO_LIMIT) per weight. (out, G) tensors."""
    over = zero.abs() > ZERO_LIMIT
    if not bool(over.any()):
        return scale, zero
    factor = torch.where(over, zero.abs() / ZERO_LIMIT, torch.ones_like(zero))
    return scale * factor, zero / factor


def _hqq_zero(w, keep, scale, zero, levels):
    """HQQ (Badri & Shaji 2023): alternate an l_p shrinkage of the residual with a closed-form zero."""
    keep_f = keep.to(torch.float32)
    count = keep_f.sum(dim=2).clamp_min(1.0)
    s, z = scale.unsqueeze(2), zero.unsqueeze(2)
    beta, best = HQQ_BETA, math.inf
    for _ in range(HQQ_ITERS):
        q = torch.round(w / s + z).clamp_(0, levels)
        residual = w - (q - z) * s
        shrunk = _shrink_lp(residual, beta, HQQ_LP)
        z = (((q - (w - shrunk) / s) * keep_f).sum(dim=2) / count).unsqueeze(2)
        beta *= HQQ_KAPPA
        error = sum64(residual.abs() * keep_f)
        if error >= best:
            break
        best = error
    return z.squeeze(2)


def _decoded(values: torch.Tensor, meta_bits: int):
    """Double-quantize like the file does; returns (codes, meta, decoded float32 torch values)."""
    codes, meta = encode_meta(values.numpy(), meta_bits)
    return codes, meta, torch.from_numpy(decode_meta(codes, meta))




def quantize(weight: torch.Tensor, config: StorageConfig, quantizer: str = "hqq", pack: bool = True,
             importance: torch.Tensor | None = None, outlier_mode: str = "magnitude",
             rows: torch.Tensor | None = None, codebooks: dict | None = None) -> Quantized:
    """Quantize a float32 (out, in) matrix to `config`. With pack=False only the errors are computed.

    importance: None or a non-negative (out, in) tensor (e.g. a Fisher diagonal, or input second
    moments broadcast over rows); it weighs the rounding (`wls`), the outlier choice and
    `weighted_error`. outlier_mode: `magnitude` keeps the largest |w|; `error` keeps the weights whose
    (importance-weighted) squared error is largest after a first quantization without outliers.
    rows: None, or sorted row indices (k,): quantize only these rows, exactly as they would be
    quantized in the whole matrix except for the metadata runs they share (and `hqq`'s early stop,
    decided per chunk of rows): a sample to estimate the whole matrix's error from; no outliers.
    codebooks: {(bits, dim): fp16 points}, the file's shared vq codebooks a `shared` vq config uses, and
    {(bits, 0): fp16 (4096, 1)} the trellis tables a trellis config uses (converter/shared_codebooks.py).
    """
    if config.scheme == "fp16" and rows is None:
        half = weight.to(torch.float16)
        flat = weight.reshape(len(weight), -1)  # (out, in), 1-D as (n, 1)
        row_error_sq = torch.empty(len(flat), dtype=torch.float64)
        row_weighted = torch.empty(len(flat), dtype=torch.float64) if importance is not None else row_error_sq
        step = max(1, CHUNK_WEIGHTS // max(flat.shape[1], 1))  # rows at a time: no whole-matrix temporaries
        for r in range(0, len(flat), step):
            diff_sq = (half.reshape(flat.shape)[r:r + step].to(torch.float32) - flat[r:r + step]) ** 2
            row_error_sq[r:r + step] = diff_sq.sum(1, dtype=torch.float64)
            if importance is not None:
                weighted = diff_sq * importance.reshape(flat.shape)[r:r + step]
                row_weighted[r:r + step] = weighted.sum(1, dtype=torch.float64)
        return Quantized({"data": half.numpy()} if pack else {}, sum64(row_error_sq),
                         sum64(row_weighted), row_weighted=row_weighted, row_error_sq=row_error_sq)
    if quantizer not in QUANTIZERS or quantizer == "gptq":  # gptq rounds whole layers: converter/gptq.py
        raise ValueError(f"unknown quantizer {quantizer!r}")
    if outlier_mode not in OUTLIER_MODES:
        raise ValueError(f"unknown outlier mode {outlier_mode!r}")
    if config.scheme == "lut":
        if rows is not None:
            raise ValueError("a row sample is quantized only to affine and vq configs without outliers")
        return _quantize_lut_with_outliers(weight, config, pack, importance, outlier_mode)
    if rows is not None and (config.scheme not in ("affine", "vq", "trellis") or config.outliers):
        raise ValueError("a row sample is quantized only to affine, vq and trellis configs without outliers")
    if config.scheme == "trellis":  # converter/trellis.py; its table is the file's (codebooks[(bits, 0)])
        blobs, row_sq, row_weighted, residual = quantize_trellis(
            weight, config, shared_points(codebooks, config), pack, importance, rows, _importance_floor(importance))
        return Quantized(blobs, sum64(row_sq), sum64(row_weighted), residual, row_weighted, row_sq)
    if config.scheme == "vq":
        return _quantize_vq_with_outliers(weight, config, pack, importance, outlier_mode, rows, codebooks)
    if rows is not None:
        floor = _importance_floor(importance)  # of the whole matrix, as when it is quantized whole
        importance = importance[rows] if importance is not None else None
        return _quantize(weight[rows], config, quantizer, pack, importance, None, floor=floor)
    if config.outliers and outlier_mode == "error":
        first = _quantize(weight, replace(config, outliers=0), quantizer, False,
                          importance, None, keep_residual=True)
        score = first.residual.pow(2) * (importance if importance is not None else 1.0)
        outliers = _top_mask(score, config.outliers)
    else:
        outliers = _top_mask(weight.abs(), config.outliers) if config.outliers else None
    return _quantize(weight, config, quantizer, pack, importance, outliers)


def _importance_floor(importance) -> float:
    """A tiny positive weight added to the importance, so no kept weight counts for nothing in `wls`."""
    return 1e-12 * float(importance.numpy().mean(dtype=np.float64)) if importance is not None else 0.0


def _top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest scores."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if count:
        mask[torch.topk(score.reshape(-1), count, sorted=False).indices] = True
    return mask.view(score.shape)


def _quantize(weight, config, quantizer, pack, importance, outliers, keep_residual=False, floor=None) -> Quantized:
    out_features, in_features = weight.shape
    bits, g = config.bits, config.group_size
    levels = (1 << bits) - 1
    groups, real = _groups(weight, g)  # (out, G, g), (1, G, g)
    n_groups = groups.shape[1]
    imp_groups = _groups(importance, g)[0] if importance is not None else None
    if outliers is None or not config.outliers:
        keep = np.zeros((0, 0, 0), np.bool_)  # the kernels' "every real position is kept"
    else:
        keep = (real & (_groups(outliers.to(torch.float32), g)[0] == 0)).numpy()  # (out, G, g)

    empty_f32 = np.zeros((0, 0, 0), np.float32)
    rows_per_chunk = max(1, CHUNK_WEIGHTS // (n_groups * g))
    scale = torch.empty(out_features, n_groups)
    zero = torch.empty(out_features, n_groups)
    if quantizer == "wls":
        floor = _importance_floor(importance) if floor is None else floor
        wls_scale_zero(groups.numpy(), keep, imp_groups.numpy() if imp_groups is not None else empty_f32,
                       in_features, floor, float(levels), scale.numpy(), zero.numpy())
    else:
        kept = torch.from_numpy(keep) if keep.size else real.expand_as(groups)
        for start in range(0, out_features, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            scale[rows], zero[rows] = _scale_zero(groups[rows], kept[rows], bits, quantizer)

    scale, zero = _bounded_zero(scale, zero)
    scale_codes, scale_meta, scale_hat = _decoded(scale, config.meta_bits)
    zero_codes, zero_meta, zero_hat = _decoded(zero, config.meta_bits)
    codes = np.empty((out_features, n_groups, g), np.uint8) if pack else np.zeros((0, 0, 0), np.uint8)
    residual = torch.empty(out_features, n_groups, g) if (config.outliers or keep_residual) else None
    row_sq, row_weighted = np.empty(out_features), np.empty(out_features)
    round_groups(groups.numpy(), keep, imp_groups.numpy() if imp_groups is not None else empty_f32,
                 in_features, scale_hat.numpy(), zero_hat.numpy(), levels, codes,
                 residual.numpy() if residual is not None else empty_f32, row_sq, row_weighted)
    error_sq, weighted = sum64(row_sq), sum64(row_weighted)
    row_weighted = torch.from_numpy(row_weighted)
    blobs = {}
    residual_2d = residual.view(out_features, n_groups * g)[:, :in_features] if residual is not None else None
    if config.outliers:
        rows_idx, cols_idx = torch.nonzero(outliers, as_tuple=True)
        exact = residual_2d[rows_idx, cols_idx]
        values = exact.to(torch.float16)
        leftover_sq = (values.to(torch.float32) - exact).to(torch.float64) ** 2
        error_sq += sum64(leftover_sq)
        if importance is not None:
            leftover_sq = leftover_sq * importance[rows_idx, cols_idx]
            weighted += sum64(leftover_sq)
        row_weighted.index_add_(0, rows_idx, leftover_sq)
        if pack:
            blobs.update(build_csr((out_features, in_features), rows_idx.numpy(), cols_idx.numpy(),
                                   values.numpy()))
    if pack:
        blobs.update({
            "qweight": pack_codes(codes.reshape(out_features, n_groups * g), bits),
            "scale_codes": scale_codes, "scale_meta": scale_meta,
            "zero_codes": zero_codes, "zero_meta": zero_meta,
        })
    return Quantized(blobs, error_sq, weighted if importance is not None else error_sq,
                     residual_2d if keep_residual else None, row_weighted, torch.from_numpy(row_sq))


def _store_outliers(blobs: dict, shape, outliers: torch.Tensor, residual: torch.Tensor, row_sq: np.ndarray,
                    row_weighted: np.ndarray, importance, pack: bool) -> None:
    """A codebook scheme's (lut, vq) outliers: their residuals (out, in) stored as fp16 CSR in `blobs` (when
    pack), their leftover fp16 rounding added to the row errors (in place)."""
    rows_idx, cols_idx = torch.nonzero(outliers, as_tuple=True)
    exact = residual[rows_idx, cols_idx]
    values = exact.to(torch.float16)
    leftover_sq = (values.to(torch.float32) - exact).to(torch.float64) ** 2
    np.add.at(row_sq, rows_idx.numpy(), leftover_sq.numpy())
    if importance is not None:
        leftover_sq = leftover_sq * importance[rows_idx, cols_idx]
    np.add.at(row_weighted, rows_idx.numpy(), leftover_sq.numpy())
    if pack:
        blobs.update(build_csr(tuple(shape), rows_idx.numpy(), cols_idx.numpy(), values.numpy()))


def _quantize_vq_with_outliers(weight, config, pack, importance, outlier_mode, rows, codebooks) -> Quantized:
    """The `vq` scheme (converter/vq.py), its outliers chosen as affine's and lut's are."""
    floor = _importance_floor(importance)  # of the whole matrix, also for a row sample
    outliers = None
    if config.outliers and outlier_mode == "error":
        residual = quantize_vq(weight, replace(config, outliers=0), False, importance, None, keep_residual=True,
                               floor=floor, codebooks=codebooks)[3]
        outliers = _top_mask(residual.pow(2) * (importance if importance is not None else 1.0), config.outliers)
    elif config.outliers:
        outliers = _top_mask(weight.abs(), config.outliers)
    blobs, row_sq, row_weighted, residual = quantize_vq(weight, config, pack, importance, outliers, rows,
                                                        keep_residual=outliers is not None, floor=floor,
                                                        codebooks=codebooks)
    if outliers is not None:
        _store_outliers(blobs, weight.shape, outliers, residual, row_sq, row_weighted, importance, pack)
    error_sq, weighted = sum64(row_sq), sum64(row_weighted)
    return Quantized(blobs, error_sq, weighted if importance is not None else error_sq, residual,
                     torch.from_numpy(row_weighted), torch.from_numpy(row_sq))


def _quantize_lut_with_outliers(weight, config, pack, importance, outlier_mode) -> Quantized:
    if config.outliers and outlier_mode == "error":
        first = _quantize_lut(weight, StorageConfig.lut(config.bits, config.codebook_rows), False, importance, None,
                              keep_residual=True)
        outliers = _top_mask(first.residual.pow(2) * (importance if importance is not None else 1.0), config.outliers)
    else:
        outliers = _top_mask(weight.abs(), config.outliers) if config.outliers else None
    return _quantize_lut(weight, config, pack, importance, outliers)


def _quantize_lut(weight, config, pack, importance, outliers, keep_residual=False) -> Quantized:
    """The `lut` scheme: weighted k-means codebooks (kernels.lut_kmeans) fitted on the weights that are
    not outliers, stored as fp16, then every weight coded to its nearest stored level (kernels.lut_round)."""
    out_features, in_features, n_packs = lut_dims(weight.shape)
    w = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    imp = np.ascontiguousarray(importance.numpy(), dtype=np.float32) if importance is not None else \
        np.zeros((0, 0), np.float32)
    keep = (~outliers).numpy() if outliers is not None and config.outliers else np.zeros((0, 0), np.bool_)
    n_codebooks = -(-out_features // config.codebook_rows)
    levels = np.empty((n_codebooks, 1 << config.bits), np.float32)
    lut_kmeans(w, keep, imp, in_features, config.codebook_rows, _importance_floor(importance), levels)
    codebook = np.sort(np.clip(levels, -65504.0, 65504.0).astype(np.float16), axis=1)  # (n_codebooks, K)
    codes = np.empty((out_features, n_packs * 32), np.uint8) if pack else np.zeros((0, 0), np.uint8)
    residual = np.empty((out_features, in_features), np.float32) if (config.outliers or keep_residual) else \
        np.zeros((0, 0), np.float32)
    row_sq, row_weighted = np.empty(out_features), np.empty(out_features)
    lut_round(w, keep, imp, in_features, config.codebook_rows, codebook.astype(np.float32), codes, residual,
              row_sq, row_weighted)
    blobs = {}
    if config.outliers:
        _store_outliers(blobs, weight.shape, outliers, torch.from_numpy(residual), row_sq, row_weighted, importance,
                        pack)
    if pack:
        blobs = {"qweight": pack_codes(codes, config.bits), "codebook": codebook, **blobs}
    error_sq, weighted = sum64(row_sq), sum64(row_weighted)
    return Quantized(blobs, error_sq, weighted if importance is not None else error_sq,
                     torch.from_numpy(residual) if keep_residual else None, torch.from_numpy(row_weighted),
                     torch.from_numpy(row_sq))
