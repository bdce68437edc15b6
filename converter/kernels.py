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
result does not depend on the thread count. No fastmath: with reassociation and FMA contraction
allowed, a kernel compiled in this process and the same kernel loaded from Numba's cache gave
different bits (2-bit scale searches flipped), so a cluster worker and the driver disagreed; strict
IEEE order costs ~1.6× on this kernel and makes the result a pure function of its inputs.

round_groups: codes = clamp(round(w/ŝ + ẑ)) with the decoded (stored) ŝ, ẑ, the per-row squared
error of what is stored (plain and importance-weighted), and optionally the codes and the residual.
Its float32 arithmetic is the dequantizer's, (q − ẑ)·ŝ, so the errors are those of the file's bytes.
"""
from __future__ import annotations

import numba
import numpy as np

WLS_STEPS, WLS_RMIN, WLS_RDELTA = 24, -1.0, 0.1


@numba.njit(parallel=True, cache=True)
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


# ---------------------------------------------------------------------------------------------------
# lut: weighted 1-D k-means codebooks (CMPQ / SqueezeLLM's non-uniform levels)
#
# lut_kmeans: for each codebook (the weights of `rows_per_codebook` consecutive rows), K = 2^b levels
# minimizing Σ v·(w − level(w))², v = importance + floor (data-free: 1). In 1-D the clusters of
# sorted levels are contiguous runs of the sorted weights, so after one sort every Lloyd step is
# K binary searches on the midpoints and K weighted means from prefix sums (O(K log n) per step).
# Start: the levels at the weighted quantiles (k + ½)/K. Deterministic; codebooks run in parallel.

LUT_ITERS = 64


@numba.njit(parallel=True, cache=True)
def lut_kmeans(w, keep, importance, in_features, rows_per_codebook, floor, levels_out):
    """w (out, in) float32; keep (out, in) bool (empty (0, 0): every weight counts); importance (out, in)
    float32 (empty: data-free, every weight weighs 1); floor added to importance. Writes levels_out
    (n_codebooks, K) float32, ascending."""
    out_features = w.shape[0]
    n_codebooks, K = levels_out.shape
    data_free, keep_all = importance.shape[0] == 0, keep.shape[0] == 0
    for k in numba.prange(n_codebooks):
        r0, r1 = k * rows_per_codebook, min((k + 1) * rows_per_codebook, out_features)
        n = 0
        values = np.empty((r1 - r0) * in_features, np.float64)
        weights = np.empty((r1 - r0) * in_features, np.float64)
        for r in range(r0, r1):
            for c in range(in_features):
                if keep_all or keep[r, c]:
                    values[n] = w[r, c]
                    weights[n] = 1.0 if data_free else importance[r, c] + floor
                    n += 1
        if n == 0:
            for j in range(K):
                levels_out[k, j] = 0.0
            continue
        order = np.argsort(values[:n])
        xs = values[:n][order]
        cum_w = np.zeros(n + 1)  # prefix sums over the sorted weights
        cum_wx = np.zeros(n + 1)
        for i in range(n):
            cum_w[i + 1] = cum_w[i] + weights[order[i]]
            cum_wx[i + 1] = cum_wx[i] + weights[order[i]] * xs[i]
        total = cum_w[n]
        level = np.empty(K)
        for j in range(K):  # weighted quantiles
            i = min(np.searchsorted(cum_w, total * (j + 0.5) / K, side="right") - 1, n - 1)
            level[j] = xs[max(i, 0)]
        bounds = np.empty(K + 1, np.int64)
        for _ in range(LUT_ITERS):
            level.sort()
            bounds[0], bounds[K] = 0, n
            for j in range(1, K):
                bounds[j] = np.searchsorted(xs, 0.5 * (level[j - 1] + level[j]), side="left")
            moved = False
            for j in range(K):
                mass = cum_w[bounds[j + 1]] - cum_w[bounds[j]]
                if bounds[j + 1] > bounds[j] and mass > 0:
                    new = (cum_wx[bounds[j + 1]] - cum_wx[bounds[j]]) / mass
                    if new != level[j]:
                        level[j], moved = new, True
            if not moved:
                break
        level.sort()
        for j in range(K):
            levels_out[k, j] = level[j]


@numba.njit(parallel=True, cache=True)
def lut_round(w, keep, importance, in_features, rows_per_codebook, levels, codes, residual, row_sq, row_weighted):
    """Codes = the nearest stored level (levels (n_codebooks, K) float32 ascending, the fp16 codebook
    decoded), the per-row squared error of what is stored (plain and importance-weighted; weights
    not kept — outliers — get codes but no error), optionally the codes (out, n_packs·32) uint8
    (padding columns 0) and the residual (out, in) float32 (unless empty (0, 0))."""
    out_features = w.shape[0]
    K = levels.shape[1]
    weighted, keep_all = importance.shape[0] != 0, keep.shape[0] == 0
    pack, keep_residual = codes.shape[0] != 0, residual.shape[0] != 0
    for r in numba.prange(out_features):
        lv = levels[r // rows_per_codebook]
        total = total_weighted = 0.0
        for c in range(in_features):
            x = w[r, c]
            lo, hi = 0, K - 1  # binary search: the first level whose midpoint with the next is >= x
            while lo < hi:
                mid = (lo + hi) // 2
                if x > np.float32(0.5) * (lv[mid] + lv[mid + 1]):
                    lo = mid + 1
                else:
                    hi = mid
            diff = x - lv[lo]
            if pack:
                codes[r, c] = np.uint8(lo)
            if keep_residual:
                residual[r, c] = diff
            if keep_all or keep[r, c]:
                sq = np.float64(diff) * np.float64(diff)
                total += sq
                if weighted:
                    total_weighted += sq * np.float64(importance[r, c])
        if pack:
            for c in range(in_features, codes.shape[1]):
                codes[r, c] = 0
        row_sq[r] = total
        row_weighted[r] = total_weighted if weighted else total


@numba.njit(cache=True, inline="always")
def nearest_point(alpha, beta, c, planes, dist):
    """argmin_k c + Σ_i planes[i, k]·(alpha[i]·planes[i, k] − beta[i]) over the K points of planes (d, K) float32
    (coordinate i of every point contiguous): with alpha_i = a_i·s², beta_i = 2·a_i·s·w_i and c = Σ a_i w_i² this
    is Σ_i a_i (w_i − s·p_ki)² ≥ 0. dist (K,) float32 scratch. float32, all points at once (the loop
    vectorizes without reassociation); the minimum is taken over the distances' bit patterns as int32 (for
    floats ≥ 0 they order alike, and an integer minimum vectorizes; a distance that rounding made negative
    counts as 0), then the first point holding it: a 4096-point codebook in ~1.7 µs, a pure function of the
    inputs. The errors callers report are recomputed in float64 for the chosen point."""
    d, K = planes.shape
    if d == 4:
        a0, a1, a2, a3 = np.float32(alpha[0]), np.float32(alpha[1]), np.float32(alpha[2]), np.float32(alpha[3])
        b0, b1, b2, b3 = np.float32(beta[0]), np.float32(beta[1]), np.float32(beta[2]), np.float32(beta[3])
        p0, p1, p2, p3 = planes[0], planes[1], planes[2], planes[3]
        for k in range(K):
            dist[k] = c + p0[k] * (a0 * p0[k] - b0) + p1[k] * (a1 * p1[k] - b1) + p2[k] * (a2 * p2[k] - b2) \
                + p3[k] * (a3 * p3[k] - b3)
    elif d == 2:
        a0, a1, b0, b1 = np.float32(alpha[0]), np.float32(alpha[1]), np.float32(beta[0]), np.float32(beta[1])
        p0, p1 = planes[0], planes[1]
        for k in range(K):
            dist[k] = c + p0[k] * (a0 * p0[k] - b0) + p1[k] * (a1 * p1[k] - b1)
    else:
        for k in range(K):
            dist[k] = c
        for i in range(d):
            al, be = np.float32(alpha[i]), np.float32(beta[i])
            for k in range(K):
                dist[k] += planes[i, k] * (al * planes[i, k] - be)
    bits = dist.view(np.int32)
    low = np.int32(2147483647)
    for k in range(K):
        b = bits[k]
        b = b if b > 0 else np.int32(0)  # negative floats (sign bit set) are negative int32: 0
        bits[k] = b
        low = b if b < low else low
    block = min(K, ARGMIN_BLOCK)
    for k0 in range(0, K, block):  # the first block holding the minimum (K is a power of 2) ...
        block_low = np.int32(2147483647)
        for i in range(block):
            b = bits[k0 + i]
            block_low = b if b < block_low else block_low
        if block_low == low:
            for k in range(k0, k0 + block):  # ... and its first point
                if bits[k] == low:
                    return k
    return 0  # unreachable: some point holds the minimum


ARGMIN_BLOCK = 64


@numba.njit(parallel=True, cache=True)
def vq_nearest(x, a, s, planes, index):
    """index[v] = the point nearest vector v: argmin_k Σ_i a[v, i]·(x[v, i] − s[v]·p_ki)², x (n, m) float32,
    a (n, m) float32 (or (1, m): shared by every vector), s (n,) float32, planes (m, K) float32."""
    n, m = x.shape
    K = planes.shape[1]
    shared = a.shape[0] == 1
    for v in numba.prange(n):
        alpha = np.empty(m, np.float32)
        beta = np.empty(m, np.float32)
        dist = np.empty(K, np.float32)
        c = np.float32(0.0)
        for i in range(m):
            ai = a[0, i] if shared else a[v, i]
            alpha[i] = ai * s[v] * s[v]
            beta[i] = np.float32(2.0) * ai * s[v] * x[v, i]
            c += ai * x[v, i] * x[v, i]
        index[v] = nearest_point(alpha, beta, c, planes, dist)


@numba.njit(parallel=True, cache=True)
def vq_kmeans(x, a, points, iters):
    """Weighted k-means (Lloyd) of vectors x (n, d) float32 with per-coordinate weights a (n, d) float32
    (Σ_i a_i (x_i − p_i)² the distance), starting from and writing points (K, d) float32. A point no
    vector picks keeps its place. Assignment runs in parallel, the means are summed serially in vector
    order: the result does not depend on the thread count."""
    n, d = x.shape
    K = points.shape[0]
    index = np.empty(n, np.int64)
    for _ in range(iters):
        planes = np.ascontiguousarray(points.T)  # (d, K)
        for v in numba.prange(n):
            alpha = np.empty(d, np.float32)
            beta = np.empty(d, np.float32)
            dist = np.empty(K, np.float32)
            c = np.float32(0.0)
            for i in range(d):
                alpha[i] = a[v, i]
                beta[i] = np.float32(2.0) * a[v, i] * x[v, i]
                c += a[v, i] * x[v, i] * x[v, i]
            index[v] = nearest_point(alpha, beta, c, planes, dist)
        num = np.zeros((K, d))
        den = np.zeros((K, d))
        for v in range(n):
            for i in range(d):
                num[index[v], i] += np.float64(a[v, i]) * np.float64(x[v, i])
                den[index[v], i] += np.float64(a[v, i])
        moved = False
        for k in range(K):
            for i in range(d):
                if den[k, i] > 0:
                    new = np.float32(num[k, i] / den[k, i])
                    if new != points[k, i]:
                        points[k, i], moved = new, True
        if not moved:
            break


@numba.njit(parallel=True, cache=True)
def vq_round(w, a, keep, in_features, scale, group_size, points, index, residual, row_sq, row_weighted):
    """Each vector of `dim` consecutive weights → the codebook point whose scaled copy is nearest:
    argmin_k Σ_i a_i (w_i − ŝ·p_ki)² over the vector's real positions (a: importance + floor, or 1 when
    `a` is empty (0, 0, 0); outliers — keep False — weigh 0), ŝ the decoded scale of the vector's group.
    w (out, V, d) float32, zero-padded past in_features; scale (out, G) float32; points (K, d) float32
    (the stored fp16 codebook, decoded). Writes index (out, V) (unless empty), the per-row squared error
    of what is stored (plain, and weighted by `a` — kept positions only) and optionally the residual
    w − ŝ·p (out, V, d) (unless empty). Its float32 product ŝ·p is the dequantizer's."""
    out_features, V, d = w.shape
    K = points.shape[0]
    weighted, keep_all = a.shape[0] != 0, keep.shape[0] == 0
    pack, keep_residual = index.shape[0] != 0, residual.shape[0] != 0
    planes = np.ascontiguousarray(points.T)  # (d, K)
    for r in numba.prange(out_features):
        alpha = np.empty(d, np.float32)
        beta = np.empty(d, np.float32)
        dist = np.empty(K, np.float32)
        total = total_weighted = 0.0
        for v in range(V):
            s = scale[r, (v * d) // group_size]
            c = np.float32(0.0)
            for i in range(d):
                counts = v * d + i < in_features and (keep_all or keep[r, v, i])
                ai = (a[r, v, i] if weighted else np.float32(1.0)) if counts else np.float32(0.0)
                alpha[i] = ai * s * s
                beta[i] = np.float32(2.0) * ai * s * w[r, v, i]
                c += ai * w[r, v, i] * w[r, v, i]
            best_k = nearest_point(alpha, beta, c, planes, dist)
            if pack:
                index[r, v] = best_k
            for i in range(d):
                diff = w[r, v, i] - s * points[best_k, i] if v * d + i < in_features else np.float32(0.0)
                if keep_residual:
                    residual[r, v, i] = diff
                if v * d + i < in_features and (keep_all or keep[r, v, i]):
                    sq = np.float64(diff) * np.float64(diff)
                    total += sq
                    total_weighted += sq * (np.float64(a[r, v, i]) if weighted else 1.0)
        if pack:
            for v in range(V, index.shape[1]):
                index[r, v] = 0
        row_sq[r] = total
        row_weighted[r] = total_weighted
