"""The `trellis` scheme's quantizer (SPEC.md §13): each row one walk through a trellis, and the file's tables.

    W (out, in), importance F (+ a tiny floor; none: 1) ──groups of g──► initial scales s₀ = weighted rms / table rms
        ├─ PASSES × { windows = Viterbi: the walk (one window per weight, each shifting K new bits into the
        │                       12-bit window) of least Σ F·(w − s·table[window])² along the row (viterbi)
        │             scales  = weighted least squares Σ F·w·t / Σ F·t² per group (t = table[window]),
        │                       double-quantized to the config's metadata codes and decoded }
        └─ errors ‖W − Ŵ‖² of what is stored (float32, as the dequantizer computes s·table[window])

Rows are coded independently, so quantizing a sample of rows gives exactly those rows of the whole matrix's
quantization (but for the metadata runs they share, as affine and vq): measure.py estimates a trellis config's
error from a row sample as it does the others'.

The table for K (4096 fp16 levels of unit rms, one per file and K, SPEC.md §13) is fitted before measurement
(fit_table; converter/shared_codebooks.py caches it and stores it as the file's codebook tensor): from a Gaussian
start (QTIP's), TABLE_PASSES weighted Lloyd passes over TABLE_FIT_WEIGHTS weights in whole rows evenly spread over
every decoder linear, each level the importance-weighted mean of what it decodes (w / s over the weights whose
window is that level). Deterministic: a function of the weights and importance (sums in a fixed order).

Cost: the Viterbi visits 2^12 states per weight (~2 µs a weight per pass on one core, 2.2–2.7× the textbook
scan in window order: `python tools/bench_viterbi.py`), so a trellis candidate takes ~40× an affine one's time to
measure; measure.py samples rows (1 in 8) as for affine.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..format_spec import StorageConfig, decode_meta, encode_meta
from ..format_spec.layout import META_GROUP_SIZE, TRELLIS_WINDOW_BITS
from ..format_spec.trellis import pack_windows, per_weight

PASSES = 2  # rounds of (Viterbi, least-squares scales) per matrix
CHUNK_WEIGHTS = 1 << 20  # rows coded at a time (rounded to whole metadata runs)
VERSION = 1  # of the quantizer: part of its errors' cache key (measure.py)
TABLE_FIT_WEIGHTS = 1 << 21  # weights the tables are fitted on, in whole rows spread over the linears
TABLE_PASSES = 4  # Lloyd passes of a table fit
TABLE_SEED = 0  # the Gaussian start


@numba.njit(cache=True)
def _add_by_run(levels, cost, spread, w, s, f):
    """cost[low, q] = spread[low, j] + f·(w − s·levels[low, q])² with rows ordered q = hi·runs + j."""
    heads, runs = spread.shape
    for low in range(heads):
        lv, cr, sp = levels[low], cost[low], spread[low]
        for hi in range(heads):
            lvh, crh = lv[hi * runs:(hi + 1) * runs], cr[hi * runs:(hi + 1) * runs]
            for j in range(runs):
                d = w - s * lvh[j]
                crh[j] = sp[j] + f * d * d


@numba.njit(cache=True)
def _add_by_head(levels, cost, spread, w, s, f):
    """The same with rows ordered q = j·heads + hi (the longer inner loop when runs < heads)."""
    heads, runs = spread.shape
    for low in range(heads):
        lv, cr, sp = levels[low], cost[low], spread[low]
        for j in range(runs):
            sj = sp[j]
            lvj, crj = lv[j * heads:(j + 1) * heads], cr[j * heads:(j + 1) * heads]
            for hi in range(heads):
                d = w - s * lvj[hi]
                crj[hi] = sj + f * d * d


@numba.njit(cache=True)
def _viterbi_row(w, f, s, table, bits, out):
    """out (n,) int32: the windows of least Σ f·(w − s·table[window])² along one row (w, f, s (n,) float64).

    Window v = m << K | low (m: its high L−K bits, its "tail" as a predecessor; low: its low K bits) follows the
    walks ending in the 2^K windows whose tail is v's low L−K bits: v's cost is the least of theirs (best, over
    their low bits) plus its own error. Costs are kept as cost[low, pos[m]], so both steps run over contiguous
    rows and vectorize: the least over low is elementwise across rows, and the windows sharing a predecessor
    tail, j = m mod runs, are runs of equal spread[low, j] (rows ordered so the inner loop is the longer of
    heads and runs). Ties go to the lowest low bits and the lowest window, as a scan in window order would."""
    n, heads = len(w), 1 << bits
    tails = 1 << (TRELLIS_WINDOW_BITS - bits)
    runs = tails // heads  # m = hi·runs + j, j the predecessor tail's high bits
    by_run = runs > heads
    pos = np.empty(tails, np.int64)  # pos[m]: where tail m sits in a row
    for m in range(tails):
        pos[m] = m if by_run else (m % runs) * heads + m // runs
    levels = np.empty((heads, tails))  # levels[low, pos[m]] = table[m << K | low]
    for m in range(tails):
        for low in range(heads):
            levels[low, pos[m]] = table[(m << bits) | low]
    cost = np.empty((heads, tails))  # least Σ error of a walk ending in window m << K | low, at [low, pos[m]]
    best = np.empty(tails)  # best[pos[m]]: the least cost over low, best_low[pos[m]] the first such low
    best_low = np.empty(tails, np.int8)
    spread = np.empty((heads, runs))  # spread[low, j] = best[pos[j << K | low]]
    back = np.empty((n, tails), np.int8)  # best_low per step: the walks' back-pointers (< 32)
    for low in range(heads):
        lv, cr = levels[low], cost[low]
        for q in range(tails):
            d = w[0] - s[0] * lv[q]
            cr[q] = f[0] * d * d
    for t in range(1, n):
        best[:] = cost[0]
        best_low[:] = 0
        for low in range(1, heads):
            cr = cost[low]
            for q in range(tails):
                c = cr[q]
                better = c < best[q]
                best[q] = c if better else best[q]
                best_low[q] = low if better else best_low[q]
        back[t] = best_low
        for low in range(heads):
            sp = spread[low]
            for j in range(runs):
                sp[j] = best[pos[(j << bits) | low]]
        if by_run:
            _add_by_run(levels, cost, spread, w[t], s[t], f[t])
        else:
            _add_by_head(levels, cost, spread, w[t], s[t], f[t])
    state, least = 0, np.inf
    for v in range(1 << TRELLIS_WINDOW_BITS):
        c = cost[v & (heads - 1), pos[v >> bits]]
        if c < least:
            state, least = v, c
    out[n - 1] = state
    for t in range(n - 1, 0, -1):
        tail = state & (tails - 1)
        state = (tail << bits) | back[t, pos[tail]]
        out[t - 1] = state


@numba.njit(parallel=True, cache=True)
def viterbi(w, f, s, table, bits):
    """(rows, n) int32 windows of each row's best walk; w, f, s (rows, n) float64 (s: each weight's scale)."""
    out = np.empty(w.shape, np.int32)
    for r in numba.prange(w.shape[0]):
        _viterbi_row(w[r], f[r], s[r], table, bits, out[r])
    return out


def _group_sums(values: np.ndarray, group_size: int) -> np.ndarray:
    """(rows, n) → (rows, G): sums over groups of group_size columns (the last one may be short)."""
    return np.add.reduceat(values, np.arange(0, values.shape[1], group_size), axis=1)


def _fitted_scales(w, f, levels, group_size: int, meta_bits: int):
    """(codes uint8 (rows, G), meta fp16, decoded float32 (rows, G)): weighted least-squares scales of
    w ≈ s·levels per group, ≥ 0, double-quantized (format_spec.encode_meta)."""
    num, den = _group_sums(f * w * levels, group_size), _group_sums(f * levels * levels, group_size)
    scales = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).clip(min=0.0)
    codes, meta = encode_meta(scales.astype(np.float32), meta_bits)
    return codes, meta, decode_meta(codes, meta)


def walk(w: np.ndarray, f: np.ndarray, table: np.ndarray, config: StorageConfig):
    """(windows int32 (rows, n), scale codes, scale meta, decoded scales float32 (rows, G)) of rows w (rows, n)
    float64 with positive weights f, table (4096,) float64 (the stored fp16 values): the module doc's passes."""
    g = config.group_size
    rms = math.sqrt(float(np.mean(table ** 2))) or 1.0
    scales = np.sqrt(_group_sums(f * w * w, g) / _group_sums(f, g)) / rms  # (rows, G)
    for _ in range(PASSES):
        windows = viterbi(w, f, per_weight(scales, g, w.shape[1]).astype(np.float64), table, config.bits)
        codes, meta, scales = _fitted_scales(w, f, table[windows], g, config.meta_bits)
    return windows, codes, meta, scales


def quantize_trellis(weight: torch.Tensor, config: StorageConfig, table: np.ndarray, pack: bool = True,
                     importance: torch.Tensor | None = None, rows: torch.Tensor | None = None, floor: float = 0.0):
    """(blobs, row_sq, row_weighted, residual (out, in)) of W (out, in) float32 at a trellis `config` with the
    file's table for its bits (fp16 (4096, 1)): the module doc's passes. rows: only these rows (a sample).
    floor: added to the importance. blobs (pack): qweight and the scale codes (in memory form) — the table is
    the file's codebook tensor, not a blob of the tensor. Rows are coded CHUNK_WEIGHTS at a time, each chunk whole
    metadata runs of 128 scales, so the bytes are those of the whole matrix coded at once and memory stays ~100
    bytes a weight of one chunk beyond the residual."""
    picked = rows.numpy() if rows is not None else slice(None)  # a sample's rows only: no whole-matrix copies
    source = weight.numpy()[picked]  # (R, in)
    weights = importance.numpy()[picked] if importance is not None else None
    levels = np.asarray(table, dtype=np.float32).reshape(-1)  # (4096,) as the dequantizer widens it
    n_rows, n = source.shape
    run_rows = META_GROUP_SIZE // math.gcd(math.ceil(n / config.group_size), META_GROUP_SIZE)  # rows per whole runs
    step = max(1, CHUNK_WEIGHTS // (n * run_rows)) * run_rows
    residual = np.empty(source.shape, np.float32)
    row_sq, row_weighted, parts = np.empty(n_rows), np.empty(n_rows), []
    for r0 in range(0, n_rows, step):
        w = source[r0:r0 + step].astype(np.float64)
        f = weights[r0:r0 + step].astype(np.float64) + floor if weights is not None else np.ones_like(w)
        f = np.maximum(f, 1e-30)  # every weight counts a little: a walk needs a defined cost everywhere
        windows, codes, meta, scales = walk(w, f, levels.astype(np.float64), config)
        stored = per_weight(scales, config.group_size, n) * levels[windows]  # float32, as dequantized
        part = residual[r0:r0 + step]
        np.subtract(w.astype(np.float32), stored, out=part)
        row_sq[r0:r0 + step] = np.square(part, dtype=np.float64).sum(1)
        row_weighted[r0:r0 + step] = (f * np.square(part, dtype=np.float64)).sum(1)
        parts.append((pack_windows(windows, config.bits), codes, meta) if pack else None)
    blobs = {}
    if pack:
        blobs = {"qweight": np.concatenate([p[0] for p in parts]), "scale_codes": np.concatenate([p[1] for p in parts]),
                 "scale_meta": np.concatenate([p[2] for p in parts])}
    row_sq = torch.from_numpy(row_sq)
    return blobs, row_sq, torch.from_numpy(row_weighted) if weights is not None else row_sq, torch.from_numpy(residual)


def table_rows(weight: np.ndarray, importance: np.ndarray | None, count: int):
    """(w, f) float64 (k, in): `count` rows evenly spread over W (at least 1, at most all), with their importance
    (none: 1) — a table fit's sample of one matrix."""
    picks = np.unique(np.linspace(0, len(weight) - 1, max(1, min(count, len(weight)))).round().astype(np.int64))
    w = weight[picks].astype(np.float64)
    f = importance[picks].astype(np.float64) if importance is not None else np.ones_like(w)
    return w, np.maximum(f, 1e-30)


def fit_table(samples: list, bits: int, progress=None) -> np.ndarray:
    """The fp16 table (4096, 1) for `bits` bits per weight, fitted to samples [(w, f) (k, in)] (module doc)."""
    config = StorageConfig.trellis(bits, 64)  # scales per 64 weights while fitting (the presets' group size)
    table = np.random.default_rng(TABLE_SEED).standard_normal(1 << TRELLIS_WINDOW_BITS)
    for _ in range(TABLE_PASSES):
        num, den = np.zeros_like(table), np.zeros_like(table)
        for w, f in samples:
            windows, _, _, scales = walk(w, f, table.astype(np.float16).astype(np.float64), config)
            s = per_weight(scales, config.group_size, w.shape[1]).astype(np.float64)
            np.add.at(num, windows.ravel(), (f * s * w).ravel())
            np.add.at(den, windows.ravel(), (f * s * s).ravel())
        table = np.where(den > 0, num / np.where(den > 0, den, 1.0), table)
        table /= math.sqrt(float(np.mean(table ** 2))) or 1.0
        if progress:
            progress(1)
    return table.astype(np.float16).reshape(-1, 1)
