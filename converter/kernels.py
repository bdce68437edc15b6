"""The quantizer's two hot loops as fused Numba kernels, one pass over each group with its data in cache.

wls_scale_zero: the `wls` scale search; per group, every candidate scale at once.

For each group of g weights (llama.cpp k-quants' search, importance-weighted):
    low, high = min/max of the kept weights;   d = w − low
    start:        s = (high − low)/L, m = low, q = round(d/s)                       (min-max)
    step k=0..24: inv = (L − 1 + 0.1·k)/(high − low);  q = clamp(round(inv·d), 0, L)
                  (s, m) = weighted least squares of w ≈ s·q + m   (closed form from Σv, Σvq, Σvq², Σvw, Σvqw)
                  err = Σ v·(s·q + m − w)²   (expanded, from the same sums and Σvw²)
    keep the (s, m) of the smallest err with s > 0;  zero = −m/s.
Weights v: the importance (calibration) plus a tiny floor, else rms(group) + |w| (data-free).
Everything per group is float64; groups are independent, so rows run in parallel (prange) and the
result does not depend on the thread count.

round_groups: codes = clamp(round(w/ŝ + ẑ)) with the decoded (stored) ŝ, ẑ, the per-row squared
error of what is stored (plain and importance-weighted), and optionally the codes and the residual.
Its float32 arithmetic is the dequantizer's, (q − ẑ)·ŝ, so the errors are those of the file's bytes.
"""
from __future__ import annotations

import numba
import numpy as np

WLS_STEPS, WLS_RMIN, WLS_RDELTA = 24, -1.0, 0.1


@numba.njit(parallel=True, cache=True, fastmath={"reassoc", "nsz", "contract"})
def wls_scale_zero(w, keep, importance, in_features, floor, levels, scale, zero):
    """w (rows, G, g) float32, zero-padded past in_features; keep (rows, G, g) bool marks the weights
    that count (empty (0, 0, 0): all real ones); importance (rows, G, g) float32 (empty: data-free);
    floor: added to importance; levels = 2^bits − 1. Writes scale, zero (rows, G) float32."""
    rows, n_groups, g = w.shape
    data_free, keep_all = importance.shape[0] == 0, keep.shape[0] == 0
    for r in numba.prange(rows):
        v = np.empty(g, np.float64)  # weights, zero where not kept
        x = np.empty(g, np.float64)
        d = np.empty(g, np.float64)
        kept = np.empty(g, np.bool_)
        for j in range(n_groups):
            low, high, count, sq = np.inf, -np.inf, 0, 0.0
            for t in range(g):
                x[t] = w[r, j, t]
                kept[t] = j * g + t < in_features and (keep_all or keep[r, j, t])
                if kept[t]:
                    low, high, count, sq = min(low, x[t]), max(high, x[t]), count + 1, sq + x[t] * x[t]
            if count == 0:
                low = high = 0.0
            span = high - low
            s0 = span / levels if span > 0 else 1.0
            if data_free:
                rms = np.sqrt(sq / max(count, 1))
                for t in range(g):
                    v[t] = rms + abs(x[t]) if kept[t] else 0.0
            else:
                for t in range(g):
                    v[t] = importance[r, j, t] + floor if kept[t] else 0.0
            sw = swx = swxx = 0.0
            for t in range(g):
                d[t] = x[t] - low
                sw += v[t]
                swx += v[t] * x[t]
                swxx += v[t] * x[t] * x[t]
            # min-max start: q = round(d / s0), (s, m) = (s0, low)
            swq = swqq = swqx = 0.0
            for t in range(g):
                q = min(max(np.rint(d[t] / s0), 0.0), levels)
                vq = v[t] * q
                swq += vq
                swqq += vq * q
                swqx += vq * x[t]
            best_s, best_m = s0, low
            best_err = _error(s0, low, sw, swx, swxx, swq, swqq, swqx)
            safe_span = span if span > 0 else 1.0
            for step in range(WLS_STEPS + 1):
                inv = (levels + WLS_RMIN + WLS_RDELTA * step) / safe_span
                swq = swqq = swqx = 0.0
                for t in range(g):
                    q = min(max(np.rint(inv * d[t]), 0.0), levels)
                    vq = v[t] * q
                    swq += vq
                    swqq += vq * q
                    swqx += vq * x[t]
                det = sw * swqq - swq * swq
                if not det > 1e-30 * sw * swqq:
                    continue
                s = (sw * swqx - swq * swx) / det
                m = (swqq * swx - swq * swqx) / det
                if not s > 0:
                    continue
                err = _error(s, m, sw, swx, swxx, swq, swqq, swqx)
                if err < best_err:
                    best_s, best_m, best_err = s, m, err
            scale[r, j] = best_s
            zero[r, j] = -best_m / best_s


@numba.njit(inline="always")
def _error(s, m, sw, swx, swxx, swq, swqq, swqx):
    """Σ v·(s·q + m − w)² expanded into the group's sums."""
    return swxx + s * s * swqq + m * m * sw + 2.0 * (s * m * swq - s * swqx - m * swx)


@numba.njit(parallel=True, cache=True)
def round_groups(w, keep, importance, in_features, scale, zero, levels, codes, residual, row_sq, row_weighted):
    """w, keep, importance, in_features as above; scale, zero (rows, G) float32 decoded metadata. Padding columns
    (≥ in_features) get code 0 and no error; weights not kept (outliers) get codes but no error.
    codes (rows, G, g) uint8 and residual (rows, G, g) float32 are written unless empty (0, 0, 0).
    Writes row_sq, row_weighted (rows,) float64."""
    rows, n_groups, g = w.shape
    weighted, keep_all = importance.shape[0] != 0, keep.shape[0] == 0
    pack, keep_residual = codes.shape[0] != 0, residual.shape[0] != 0
    top = np.float32(levels)
    for r in numba.prange(rows):
        total = total_weighted = 0.0
        for j in range(n_groups):
            s, z = scale[r, j], zero[r, j]
            for t in range(g):
                x = w[r, j, t]
                q = np.float32(0.0)
                if j * g + t < in_features and s != 0:
                    q = min(max(np.rint(x / s + z), np.float32(0.0)), top)
                diff = x - (q - z) * s
                if j * g + t >= in_features:
                    diff = np.float32(0.0)
                if pack:
                    codes[r, j, t] = np.uint8(q)
                if keep_residual:
                    residual[r, j, t] = diff
                if j * g + t < in_features and (keep_all or keep[r, j, t]):
                    sq = np.float64(diff) * np.float64(diff)
                    total += sq
                    if weighted:
                        total_weighted += sq * np.float64(importance[r, j, t])
        row_sq[r] = total
        row_weighted[r] = total_weighted if weighted else total
