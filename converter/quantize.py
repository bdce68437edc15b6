"""Group-wise affine quantization of one weight matrix to exactly what the file stores.

    W (out, in) ──pad to G·g──► groups (out, G, g)
        ├─ outliers (optional): the largest-|w| weights leave the groups (stored as fp16 CSR residuals)
        ├─ scale/zero per group: min-max (`rtn`), HQQ's half-quadratic proximal updates of the zero
        │  on an l_p<1 error (`hqq`, calibration-free), or an importance-weighted search over candidate
        │  scales with a weighted least-squares fit of scale and offset for each (`wls`, as llama.cpp's
        │  k-quants; weights from calibration when given, else |w|-based)
        ├─ double-quantize scale and zero to 8-bit codes (format_spec.encode_meta), decode them back
        └─ codes = clamp(round(w / ŝ + ẑ)) with the *decoded* ŝ, ẑ ─► error ‖W − Ŵ‖²_F of what is stored

Work runs in row chunks of ~256K weights so the many elementwise passes stay in cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..format_spec import StorageConfig, build_csr, decode_meta, encode_meta, pack_codes

QUANTIZERS = ("hqq", "rtn", "wls")
WLS_STEPS, WLS_RMIN, WLS_RDELTA = 24, -1.0, 0.1
CHUNK_WEIGHTS = 1 << 18
HQQ_ITERS, HQQ_LP, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


@dataclass
class Quantized:
    blobs: dict  # blob name -> numpy array, exactly as the writer stores them
    error_sq: float  # ‖W − Ŵ‖²_F of the stored tensor
    weighted_error: float  # Σ importance·(W − Ŵ)² (equals error_sq without importance)
    residual: torch.Tensor | None = None  # W − Ŵ (out, in) before outliers; only when asked for


def _groups(weight: torch.Tensor, group_size: int):
    """(out, in) → padded (out, G, g) weights and a mask of real positions."""
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group_size)
    padded = torch.zeros(out_features, n_groups * group_size, dtype=torch.float32)
    padded[:, :in_features] = weight
    mask = torch.zeros(n_groups * group_size, dtype=torch.bool)
    mask[:in_features] = True
    return padded.view(out_features, n_groups, group_size), mask.view(1, n_groups, group_size)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm, as in HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def _scale_zero(w: torch.Tensor, keep: torch.Tensor, bits: int, quantizer: str, importance=None):
    """Per-group (scale, zero) for one chunk; w (rows, G, g), keep marks weights that count,
    importance (rows, G, g) or None weighs them (wls only)."""
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
    elif quantizer == "wls":
        scale, zero = _wls_search(w, keep, low, span, scale, zero, levels, importance)
    return scale, zero


def _wls_search(w, keep, low, span, scale, zero, levels, importance):
    """Try WLS_STEPS inverse scales around the min-max one; for each, round, then fit scale and offset
    by weighted least squares (w ≈ s·q + m); keep the pair with the smallest weighted error."""
    if importance is None:  # data-free weights, as llama.cpp's k-quants: mean |w| plus |w|
        rms = (w.pow(2) * keep).sum(2, keepdim=True) / keep.sum(2, keepdim=True).clamp_min(1)
        weight = rms.sqrt() + w.abs()
    else:
        weight = importance + 1e-12 * importance.mean()
    weight = weight * keep
    sw, swx = weight.sum(2), (weight * w).sum(2)
    best_s, best_m = scale.clone(), -zero * scale
    q = torch.round((w - low.unsqueeze(2)) / best_s.unsqueeze(2)).clamp_(0, levels)
    best_err = (weight * (best_s.unsqueeze(2) * q + best_m.unsqueeze(2) - w).pow(2)).sum(2)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    for step in range(WLS_STEPS + 1):
        inv = (levels + WLS_RMIN + WLS_RDELTA * step) / safe_span  # (rows, G)
        q = torch.round(inv.unsqueeze(2) * (w - low.unsqueeze(2))).clamp_(0, levels)
        swq, swqq, swqx = (weight * q).sum(2), (weight * q * q).sum(2), (weight * q * w).sum(2)
        det = sw * swqq - swq * swq
        ok = det > 1e-30 * sw * swqq
        safe_det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * swqx - swq * swx) / safe_det
        m = (swqq * swx - swq * swqx) / safe_det
        ok &= s > 0
        err = (weight * (s.unsqueeze(2) * q + m.unsqueeze(2) - w).pow(2)).sum(2)
        better = ok & (err < best_err)
        best_s, best_m, best_err = torch.where(better, s, best_s), torch.where(better, m, best_m), \
            torch.where(better, err, best_err)
    return best_s, -best_m / best_s


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
        error = float((residual.abs() * keep_f).sum())
        if error >= best:
            break
        best = error
    return z.squeeze(2)


def _decoded(values: torch.Tensor):
    """Double-quantize like the file does; returns (codes, meta, decoded float32 torch values)."""
    codes, meta = encode_meta(values.numpy())
    return codes, meta, torch.from_numpy(decode_meta(codes, meta))


OUTLIER_MODES = ("magnitude", "error")


def quantize(weight: torch.Tensor, config: StorageConfig, quantizer: str = "hqq", pack: bool = True,
             importance: torch.Tensor | None = None, outlier_mode: str = "magnitude") -> Quantized:
    """Quantize a float32 (out, in) matrix to `config`. With pack=False only the errors are computed.

    importance: None or a non-negative (out, in) tensor (e.g. a Fisher diagonal, or input second
    moments broadcast over rows); it weighs the rounding (`wls`), the outlier choice and
    `weighted_error`. outlier_mode: `magnitude` keeps the largest |w|; `error` keeps the weights whose
    (importance-weighted) squared error is largest after a first quantization without outliers.
    """
    if config.scheme == "fp16":
        diff_sq = (weight.to(torch.float16).to(torch.float32) - weight) ** 2
        weighted = float((diff_sq * importance).sum()) if importance is not None else float(diff_sq.sum())
        return Quantized({"data": weight.to(torch.float16).numpy()} if pack else {}, float(diff_sq.sum()), weighted)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    if outlier_mode not in OUTLIER_MODES:
        raise ValueError(f"unknown outlier mode {outlier_mode!r}")
    if config.outliers and outlier_mode == "error":
        first = _quantize(weight, StorageConfig.affine(config.bits, config.group_size), quantizer, False,
                          importance, None, keep_residual=True)
        score = first.residual.pow(2) * (importance if importance is not None else 1.0)
        outliers = _top_mask(score, config.outliers)
    else:
        outliers = _top_mask(weight.abs(), config.outliers)
    return _quantize(weight, config, quantizer, pack, importance, outliers)


def _top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest scores."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if count:
        mask[torch.topk(score.reshape(-1), count, sorted=False).indices] = True
    return mask.view(score.shape)


def _quantize(weight, config, quantizer, pack, importance, outliers, keep_residual=False) -> Quantized:
    out_features, in_features = weight.shape
    bits, g = config.bits, config.group_size
    levels = (1 << bits) - 1
    groups, real = _groups(weight, g)  # (out, G, g), (1, G, g)
    n_groups = groups.shape[1]
    imp_groups = _groups(importance, g)[0] if importance is not None else None
    if outliers is None:
        outliers = torch.zeros_like(weight, dtype=torch.bool)
    outlier_groups, _ = _groups(outliers.to(torch.float32), g)
    keep = real & (outlier_groups == 0)  # (out, G, g)

    rows_per_chunk = max(1, CHUNK_WEIGHTS // (n_groups * g))
    scale = torch.empty(out_features, n_groups)
    zero = torch.empty(out_features, n_groups)
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        scale[rows], zero[rows] = _scale_zero(groups[rows], keep[rows], bits, quantizer,
                                              imp_groups[rows] if imp_groups is not None else None)

    scale_codes, scale_meta, scale_hat = _decoded(scale)
    zero_codes, zero_meta, zero_hat = _decoded(zero)
    codes = torch.empty(out_features, n_groups, g, dtype=torch.uint8) if pack else None
    residual = torch.empty(out_features, n_groups, g) if (config.outliers or keep_residual) else None
    error_sq = weighted = 0.0
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        w = groups[rows]
        s, z = scale_hat[rows].unsqueeze(2), zero_hat[rows].unsqueeze(2)
        safe_s = torch.where(s != 0, s, torch.ones_like(s))
        q = torch.where(s != 0, torch.round(w / safe_s + z), torch.zeros_like(w)).clamp_(0, levels)
        q = torch.where(real, q, torch.zeros_like(q))  # padding codes are 0 (SPEC §5.1)
        diff = w - (q - z) * s
        kept_sq = torch.where(keep[rows], diff, torch.zeros_like(w)).to(torch.float64) ** 2
        error_sq += float(kept_sq.sum())
        weighted += float((kept_sq * imp_groups[rows]).sum()) if imp_groups is not None else 0.0
        if residual is not None:
            residual[rows] = torch.where(real, diff, torch.zeros_like(w))
        if pack:
            codes[rows] = q.to(torch.uint8)
    blobs = {}
    residual_2d = residual.view(out_features, n_groups * g)[:, :in_features] if residual is not None else None
    if config.outliers:
        rows_idx, cols_idx = torch.nonzero(outliers, as_tuple=True)
        exact = residual_2d[rows_idx, cols_idx]
        values = exact.to(torch.float16)
        leftover_sq = (values.to(torch.float32) - exact).to(torch.float64) ** 2
        error_sq += float(leftover_sq.sum())
        if importance is not None:
            weighted += float((leftover_sq * importance[rows_idx, cols_idx]).sum())
        if pack:
            blobs.update(build_csr((out_features, in_features), rows_idx.numpy(), cols_idx.numpy(),
                                   values.numpy()))
    if pack:
        blobs.update({
            "qweight": pack_codes(codes.view(out_features, n_groups * g).numpy(), bits),
            "scale_codes": scale_codes, "scale_meta": scale_meta,
            "zero_codes": zero_codes, "zero_meta": zero_meta,
        })
    return Quantized(blobs, error_sq, weighted if importance is not None else error_sq,
                     residual_2d if keep_residual else None)
