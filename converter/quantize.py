"""Group-wise affine quantization of one weight matrix to exactly what the file stores.

    W (out, in) ──pad to G·g──► groups (out, G, g)
        ├─ outliers (optional): the largest-|w| weights leave the groups (stored as fp16 CSR residuals)
        ├─ scale/zero per group: min-max (`rtn`) or HQQ's half-quadratic proximal updates of the zero
        │  on an l_p<1 error (`hqq`, calibration-free)
        ├─ double-quantize scale and zero to 8-bit codes (format_spec.encode_meta), decode them back
        └─ codes = clamp(round(w / ŝ + ẑ)) with the *decoded* ŝ, ẑ ─► error ‖W − Ŵ‖²_F of what is stored

Work runs in row chunks of ~256K weights so the many elementwise passes stay in cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..format_spec import StorageConfig, build_csr, encode_meta, pack_codes

QUANTIZERS = ("hqq", "rtn")
CHUNK_WEIGHTS = 1 << 18
HQQ_ITERS, HQQ_LP, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


@dataclass
class Quantized:
    blobs: dict  # blob name -> numpy array, exactly as the writer stores them
    error_sq: float  # ‖W − Ŵ‖²_F of the stored tensor


def _groups(weight: torch.Tensor, group_size: int):
    """(out, in) → padded (out, G, g) weights and a mask of real positions."""
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group_size)
    padded = torch.zeros(out_features, n_groups * group_size, dtype=torch.float32)
    padded[:, :in_features] = weight
    mask = torch.zeros(n_groups * group_size, dtype=torch.bool)
    mask[:in_features] = True
    return padded.view(out_features, n_groups, group_size), mask.view(1, n_groups, group_size)


def _outlier_mask(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest-magnitude weights (ties broken by position, deterministic)."""
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    if count:
        flat = weight.abs().reshape(-1)
        mask[torch.topk(flat, count, sorted=False).indices] = True
    return mask.view(weight.shape)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm, as in HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def _scale_zero(w: torch.Tensor, keep: torch.Tensor, bits: int, quantizer: str):
    """Per-group (scale, zero) for one chunk; w (rows, G, g), keep marks weights that count."""
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
    from ..format_spec import decode_meta

    codes, meta = encode_meta(values.numpy())
    return codes, meta, torch.from_numpy(decode_meta(codes, meta))


def quantize(weight: torch.Tensor, config: StorageConfig, quantizer: str = "hqq", pack: bool = True) -> Quantized:
    """Quantize a float32 (out, in) matrix to `config`. With pack=False only the error is computed."""
    if config.scheme == "fp16":
        half = weight.to(torch.float16)
        error_sq = float(((half.to(torch.float32) - weight) ** 2).sum())
        return Quantized({"data": half.numpy()} if pack else {}, error_sq)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    out_features, in_features = weight.shape
    bits, g = config.bits, config.group_size
    levels = (1 << bits) - 1
    groups, real = _groups(weight, g)  # (out, G, g), (1, G, g)
    n_groups = groups.shape[1]
    outliers = _outlier_mask(weight, config.outliers)
    outlier_groups, _ = _groups(outliers.to(torch.float32), g)
    keep = real & (outlier_groups == 0)  # (out, G, g)

    rows_per_chunk = max(1, CHUNK_WEIGHTS // (n_groups * g))
    scale = torch.empty(out_features, n_groups)
    zero = torch.empty(out_features, n_groups)
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        scale[rows], zero[rows] = _scale_zero(groups[rows], keep[rows], bits, quantizer)

    scale_codes, scale_meta, scale_hat = _decoded(scale)
    zero_codes, zero_meta, zero_hat = _decoded(zero)
    codes = torch.empty(out_features, n_groups, g, dtype=torch.uint8) if pack else None
    error_sq = 0.0
    residual_values = []
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        w = groups[rows]
        s, z = scale_hat[rows].unsqueeze(2), zero_hat[rows].unsqueeze(2)
        safe_s = torch.where(s != 0, s, torch.ones_like(s))
        q = torch.where(s != 0, torch.round(w / safe_s + z), torch.zeros_like(w)).clamp_(0, levels)
        q = torch.where(real, q, torch.zeros_like(q))  # padding codes are 0 (SPEC §5.1)
        diff = torch.where(keep[rows], w - (q - z) * s, torch.zeros_like(w))
        error_sq += float((diff.to(torch.float64) ** 2).sum())
        if config.outliers:
            residual_values.append(((w - (q - z) * s) * outlier_groups[rows]))
        if pack:
            codes[rows] = q.to(torch.uint8)
    blobs = {}
    if config.outliers:
        residual = torch.cat(residual_values).view(out_features, n_groups * g)[:, :in_features]
        rows_idx, cols_idx = torch.nonzero(outliers, as_tuple=True)
        values = residual[rows_idx, cols_idx].to(torch.float16)
        exact = weight[rows_idx, cols_idx]
        stored = (exact - residual[rows_idx, cols_idx]) + values.to(torch.float32)
        error_sq += float(((stored - exact).to(torch.float64) ** 2).sum())
        if pack:
            blobs.update(build_csr((out_features, in_features), rows_idx.numpy(), cols_idx.numpy(),
                                   values.numpy()))
    if pack:
        blobs.update({
            "qweight": pack_codes(codes.view(out_features, n_groups * g).numpy(), bits),
            "scale_codes": scale_codes, "scale_meta": scale_meta,
            "zero_codes": zero_codes, "zero_meta": zero_meta,
        })
    return Quantized(blobs, error_sq)


def quantize_fp16(tensor: torch.Tensor) -> dict:
    return {"data": tensor.to(torch.float16).numpy()}


def rel_error(weight: torch.Tensor, error_sq: float) -> float:
    return math.sqrt(error_sq) / max(float(weight.norm()), 1e-30)


__all__ = ["QUANTIZERS", "Quantized", "quantize", "quantize_fp16", "rel_error", "np"]
