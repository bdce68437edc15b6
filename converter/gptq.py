"""Error-compensating rounding (GPTQ, Frantar et al. 2022) of affine, lut and vq blocks (GPTVQ), layer-sequential.

For one linear W (out, in) with calibration inputs X (tokens, in) and H = XᵀX, GPTQ rounds the columns
of W in order and, after each column j, pushes its rounding error onto the columns not yet rounded
through the inverse Hessian, so that the output error tr(ΔW H ΔWᵀ) = ‖X ΔWᵀ‖²_F stays small:

    U = chol(H⁻¹)ᵀ (upper)                                   H dampened: + DAMP × its mean diagonal
    for j in order:  q_j = round(w_j)  e_j = (w_j − q_j) / U_jj  w_k −= e_j U_jk  (k after j)

What is rounded is exactly what the file stores:
  * the grid: per-group scale and zero are fitted first (`wls`, importance-weighted as without gptq,
    on the original weights; GPTQ's "static groups") and double-quantized to the metadata codes (6- or
    8-bit) the file holds; the columns are then rounded to the *decoded* ŝ, ẑ, as kernels.round_groups does;
  * outliers (a config's +oP%): the positions `quantize` chose keep their code and store the fp16
    residual of the *updated* weight, so their error is fp16 rounding only;
  * act-order: columns in decreasing H_jj (the groups stay fixed by column index, so the metadata
    layout does not change).

Dampening is strong (DAMP = 1: the mean diagonal added to every diagonal entry, where GPTQ's paper
adds 1%). A few massive-activation directions hold most of tr(H) (SmolLM2: one holds 54–71% at the
q/k/v inputs), so this leaves them almost undamped and shrinks the compensation along the many small
directions, which the calibration text fits to its own style. The allocation is wls's: the MILP's
errors are measured with wls (MEASURED_WITH in options.py); compensation happens only at write time.

Layer-sequential (as GPTQ): the calibration chunks run through the runtime Model on TorchBackend
(calibrate.LayerStream), one decoder layer at a time; layer i's Hessians come from the outputs of the
already-quantized layers 0..i-1, its linears are rounded, replaced by what the file stores, and the
chunks are run through the quantized layer to give layer i+1's inputs.

Asymmetric target (GPTAQ / "GPTQv2", Li et al. 2025): the float model's stream runs alongside, and
each linear is rounded towards W + ASYMMETRY × D, where D best maps the quantized stream's input to
the float model's output shift (asymmetric_target): the layer undoes part of the error the layers
below left, instead of reproducing its float outputs from already-wrong inputs. Resident: one layer's
weights, its Hessians and cross terms (one each per distinct input: q/k/v share one, gate/up share
one) and three activation sets (the quantized stream, the float stream and the layer's outputs).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..format_spec import StorageConfig, codebook_of_rows, decode_meta, pack_codes
from ..format_spec.affine import build_csr, dequantize
from ..format_spec.layout import CODES_PER_PACK, lut_dims, vq_dims
from .calibrate import LayerStream, calibration_chunks, default_text
from .errors import ConversionError
from .kernels import vq_nearest
from .quantize import quantize
from .row_blocks import RowSplit, quantize_rows, row_order
from .vq import shared_points

# Dampening: this share of H's mean diagonal is added to the diagonal. SmolLM2 at 3.0 bpw (WikiText-2,
# 16 chunks; calibrated on Botchan; wls alone 34.43): 0.01 → 35.03, 0.1 → 33.43, 1 → 32.76, 3 → 32.92.
# With 0.01 held-out *Botchan* text gains most (45.39 → 39.53): the Hessian's small directions fit the
# calibration text's style and do not carry over to another text.
DAMP = 1.0
BLOCK = 128  # columns updated lazily in blocks (GPTQ's batched updates)
ACT_ORDER = True  # round columns in decreasing H_jj
# Asymmetric target (GPTAQ, Li et al. 2025): layer i's linears are rounded towards W + ASYMMETRY × D, D the
# ridge fit of the float model's output shift W(x_fp − x_q) from the quantized stream's x_q
# (asymmetric_target). SmolLM2 at 3.0 bpw (WikiText-2, 16 chunks; 32.664 without): 0.125 → 32.273,
# 0.25 → 31.554, 0.5 → 32.54, 1 → 228.05. The last layer's output error against the float model's on
# the calibration chunks (per token, relative to its RMS): 0.068 without, 0.048 at 0.25, 0.042 at 0.5,
# 0.18 at 1: above 0.25 the fit follows the calibration text more than the model, and at 1 it compounds.
ASYMMETRY = 0.25
SCALES = "wls"  # the quantizer that fits the groups' scales and zeros (and measures errors for the MILP)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int, bits: int, outliers: torch.Tensor | None = None, act_order: bool = ACT_ORDER,
               damp: float = DAMP):
    """Round W (out, in) to the fixed affine grid scale/zero (out, G) with GPTQ's error compensation
    for Hessian H (in, in). outliers: None or an (out, in) bool mask of positions that also store an
    fp16 residual. Returns (codes (out, in) uint8, stored (out, in) float32 = what the file decodes to,
    the outliers' residuals (out, in) float32, 0 elsewhere)."""
    top = torch.full((weight.shape[0],), float((1 << bits) - 1))
    levels = _Levels([(group_size, scale.T.contiguous(), zero.T.contiguous())], top, None, None)
    return _round(weight, hessian, levels, outliers, act_order, damp)[:3]


@dataclass
class _Levels:
    """What each row of W may store. Affine rows: per group size g their groups' scales and zeros
    (G, out) as decoded (0 in the rows of other group sizes and of lut rows: column c's scale is the
    sum of the tables' rows c // g) and the top code per row (out,); lut rows: their codebook
    (out, K) ascending, +inf past a row's own levels; `lut` (out,) bool marks the lut rows. A part no
    row uses is empty / None. vq rows: one _VqRows per run of rows with one codebook (their values in
    the affine tables are 0)."""
    groups: list[tuple[int, torch.Tensor, torch.Tensor]]
    top: torch.Tensor | None
    codebook: torch.Tensor | None
    lut: torch.Tensor | None
    vq: list = ()

    def grid(self, c: int):
        """Column c's scale and zero (out,), or (None, None) without affine rows."""
        if not self.groups:
            return None, None
        tables = [(scale[c // g], zero[c // g]) for g, scale, zero in self.groups]
        if len(tables) == 1:
            return tables[0]
        return sum(t[0] for t in tables), sum(t[1] for t in tables)


@dataclass
class _VqRows:
    """Rows start … end − 1 of the stacked rows, stored as one vq tensor: its decoded codebook points
    (K, dim), its decoded scales (G, rows) and group size."""
    start: int
    end: int
    points: torch.Tensor
    scale: torch.Tensor
    group_size: int

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @cached_property
    def planes(self) -> np.ndarray:
        """(dim, K) float32: the points' coordinates, one plane each (kernels.vq_nearest's layout)."""
        return np.ascontiguousarray(self.points.numpy().T)


def _nearest_vectors(x, a, s, planes):
    """GPTVQ's joint choice: indices (n,) of argmin_k Σ_i a_i (x_i − s·p_ki)² for vectors x (n, m) with
    weights a (n, m), or (1, m) shared by every vector, and scales s (n,), planes (≥ m, K) the points'
    coordinates (a vector cut short by the matrix edge uses its first m): kernels.vq_nearest, ~1.5 µs a
    vector for 4096 points (torch's threaded products cost ~100× as much when the cores are busy)."""
    index = np.empty(len(x), np.int64)
    vq_nearest(np.ascontiguousarray(x.numpy(), dtype=np.float32), np.ascontiguousarray(a.numpy(), dtype=np.float32),
               np.ascontiguousarray(s.numpy(), dtype=np.float32), planes[:x.shape[1]], index)
    return torch.from_numpy(index)


def _order(diag: torch.Tensor, act_order: bool, slab: int) -> torch.Tensor:
    """The columns' rounding order: decreasing H_jj (act-order) or index order; with vq rows, act-order
    sorts slabs of `slab` consecutive columns (a vector's columns stay together, in index order) by
    their summed H_jj; a short last slab stays last, so every slab starts at a multiple of `slab` (and of
    BLOCK: no slab straddles a block of lazy updates)."""
    n = len(diag)
    if not act_order:
        return torch.arange(n)
    if slab == 1:
        return torch.argsort(diag, descending=True)
    n_full = n // slab
    mass = diag[:n_full * slab].reshape(n_full, slab).sum(1)
    slabs = torch.argsort(mass, descending=True)
    columns = (slabs[:, None] * slab + torch.arange(slab)[None, :]).reshape(-1)
    return torch.cat([columns, torch.arange(n_full * slab, n)])


def _nearest(col, s, z, top, codebook, midpoints, lut):
    """(codes, values) (out,) of one column (out,): affine rows rounded on their grid (s, z: this column's
    scale and zero), lut rows to their nearest level (the first whose midpoint with the next is ≥ the
    weight, as kernels.lut_round)."""
    if s is not None:
        q = torch.where(s != 0, torch.minimum(torch.clamp(torch.round(col / s + z), min=0.0), top), 0.0)
        value = (q - z) * s
    if codebook is None:
        if s is None:  # vq rows only: their values are set by the caller
            return torch.zeros_like(col), torch.zeros_like(col)
        return q, value
    q_lut = (col[:, None] > midpoints).sum(1)  # (out,)
    value_lut = codebook.gather(1, q_lut[:, None])[:, 0]
    if s is None:
        return q_lut, value_lut
    return torch.where(lut, q_lut.to(q.dtype), q), torch.where(lut, value_lut, value)


def _round(weight, hessian, levels: _Levels, outliers, act_order: bool, damp: float):
    """gptq_round onto `levels`, row by row: rows stored with different configs (a matrix's row blocks,
    affine or lut) round together, in one factorization of H and one column loop. The loop runs on Wᵀ,
    so a column is a contiguous row."""
    out_features, in_features = weight.shape
    diag = torch.diag(hessian).to(torch.float64)
    diag[diag == 0] = 1.0  # inputs never seen (dead): nothing to compensate through them
    order = _order(diag, act_order, max((v.dim for v in levels.vq), default=1))
    u = _inverse_factor(hessian, diag, order.numpy(), damp)  # (in, in) upper, rows and columns in `order`
    wt = weight.T[order].to(torch.float32)  # (in, out): row k is column order[k] of W, updated in place
    codebook = levels.codebook
    midpoints = (codebook[:, :-1] + codebook[:, 1:]) * 0.5 if codebook is not None else None  # (out, K-1)
    keep = outliers.T[order] if outliers is not None else None
    codes = torch.empty(in_features, out_features, dtype=torch.uint8)  # (in, out) by W's column index
    stored = torch.empty(in_features, out_features)
    residual = torch.zeros(in_features, out_features)  # the outliers' fp16 residuals (as float32)
    vq_index = [torch.zeros(-(-in_features // v.dim), v.end - v.start, dtype=torch.int64) for v in levels.vq]
    vq_value = [None] * len(levels.vq)  # per vq run: (m, rows) values of its current vectors' columns
    for b0 in range(0, in_features, BLOCK):
        b1 = min(b0 + BLOCK, in_features)
        errors = torch.empty(b1 - b0, out_features)
        for j in range(b0, b1):
            col, c = wt[j], int(order[j])  # (out,); c: the column's index in W
            q, value = _nearest(col, *levels.grid(c), levels.top, codebook, midpoints, levels.lut)
            for k, run in enumerate(levels.vq):  # vq rows: a vector's columns are chosen together at its first
                if c % run.dim == 0:
                    m = min(run.dim, in_features - c)  # columns c … c+m−1 sit at j … j+m−1
                    x = wt[j:j + m, run.start:run.end].T  # (rows, m), updated by every column before
                    a = (1.0 / torch.diagonal(u[j:j + m, j:j + m]).pow(2))[None, :]  # (1, m)
                    if keep is not None:  # an outlier's error is only its fp16 rounding
                        a = a * (~keep[j:j + m, run.start:run.end].T)
                    scale = run.scale[c // run.group_size]  # (rows,)
                    index = _nearest_vectors(x, a, scale, run.planes)
                    vq_index[k][c // run.dim] = index
                    vq_value[k] = (scale[:, None] * run.points[index, :m]).T  # (m, rows), as the dequantizer
                value[run.start:run.end] = vq_value[k][c % run.dim]
            if keep is not None:  # an outlier stores the fp16 residual of the updated weight
                residual[c] = torch.where(keep[j], (col - value).to(torch.float16).to(torch.float32), 0.0)
                value = value + residual[c]
            codes[c], stored[c] = q.to(torch.uint8), value
            torch.div(col - value, u[j, j], out=errors[j - b0])
            wt[j + 1:b1].addr_(u[j, j + 1:b1], errors[j - b0], alpha=-1.0)  # onto the block's later columns
        wt[b1:].addmm_(u[b0:b1, b1:].T, errors, alpha=-1.0)  # the block's errors onto all later columns
    return codes.T, stored.T, residual.T, vq_index


def _factor_dtype(n: int, damp: float):
    """float32 while the damped H's condition number bound (n + damp) / damp stays under 1e5 (its
    eigenvalues sum to n × mean, each is ≥ damp × mean), else float64."""
    return np.float32 if (n + damp) / damp <= 1e5 else np.float64


def _cholesky(h: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor of the symmetric C-ordered h, in place (h.T is the same matrix in
    Fortran order): LAPACK potrf's result, in Fortran order."""
    from scipy.linalg import lapack

    potrf = lapack.spotrf if h.dtype == np.float32 else lapack.dpotrf
    factor, info = potrf(h.T, lower=1, overwrite_a=1, clean=1)
    if info != 0:
        raise ConversionError("gptq: the calibration Hessian is not positive definite (non-finite activations?)")
    return factor


def _inverse_factor(hessian, diag, order, damp: float) -> torch.Tensor:
    """U = chol(H⁻¹)ᵀ (upper, (in, in), rows and columns in `order`) of H dampened: dead inputs'
    diagonal set to 1 (diag: H's diagonal so fixed), + damp × the mean diagonal on every entry.

    With P the reversal and L = chol(P H P), H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is upper, so
    U = P L⁻¹ P: one Cholesky and one triangular inverse, both in place (LAPACK potrf, trtri), where
    inverting H first costs 5× the flops and four n² float64 copies (down_proj of an 8B model: n =
    14336, 822 MB per float32 copy). In _factor_dtype: float32 for DAMP = 1 up to n = 99,999."""
    from scipy.linalg import lapack

    n = len(order)
    reverse = order[::-1].copy()
    h = np.take(hessian.numpy(), reverse, axis=0).astype(_factor_dtype(n, damp), copy=False)  # (in, in) P H
    for r0 in range(0, n, 1024):  # P H P, its columns permuted 1024 rows at a time: no third n² array
        h[r0:r0 + 1024] = np.take(h[r0:r0 + 1024], reverse, axis=1)
    h[np.diag_indices(n)] = diag.numpy()[reverse] + damp * float(diag.mean())
    factor = _cholesky(h)
    trtri = lapack.strtri if h.dtype == np.float32 else lapack.dtrtri
    inverse, info = trtri(factor, lower=1, overwrite_c=1)  # in place too
    if info != 0:
        raise ConversionError("gptq: the calibration Hessian's Cholesky factor is singular")
    if not np.may_share_memory(inverse, h):  # a LAPACK wrapper that copied after all
        h.T[...] = inverse
    # P L⁻¹ P: the factor is h's memory in Fortran order (inverse = hᵀ); reversing h's memory in place
    # reverses both axes, so P L⁻¹ P = (reversed h)ᵀ, a transposed view (no second n² array)
    flat = h.reshape(-1)
    half, chunk = flat.size // 2, 1 << 22
    for i0 in range(0, half, chunk):
        i1 = min(i0 + chunk, half)
        front = flat[i0:i1].copy()
        flat[i0:i1] = flat[flat.size - i1:flat.size - i0][::-1]
        flat[flat.size - i1:flat.size - i0] = front[::-1]
    return torch.from_numpy(h.astype(np.float32, copy=False)).T


class _Grid:
    """wls's stored levels for W at an affine or lut config (GPTQ's static groups; a lut config's
    codebooks): the blobs `quantize` gives (its codes are replaced), the levels each row may store
    (_Levels, as decoded), and the outlier positions (row-major) when the config keeps outliers."""

    def __init__(self, weight, config: StorageConfig, importance, outlier_mode: str, codebooks: dict | None = None):
        if config.scheme not in ("affine", "lut", "vq"):
            raise ConversionError(f"--quantizer gptq rounds the affine, lut and vq schemes, not {config.scheme!r}")
        self.shape, self.config = tuple(weight.shape), config
        self.blobs = quantize(weight, config, SCALES, importance=importance, outlier_mode=outlier_mode,
                              codebooks=codebooks).blobs
        self.shared = shared_points(codebooks, config) if config.scheme == "vq" and config.shared else None
        out_features, in_features = weight.shape
        self.scale = self.zero = self.top = self.codebook = self.points = None
        if config.scheme == "vq":  # its codebook and scales stay; GPTQ picks the indices
            self.scale = torch.from_numpy(decode_meta(self.blobs["scale_codes"], self.blobs["scale_meta"]))
            points = self.shared if self.shared is not None else self.blobs["codebook"]  # (K, dim) fp16
            self.points = torch.from_numpy(points.astype(np.float32))
        elif config.scheme == "affine":  # per group (out, G)
            self.scale = torch.from_numpy(decode_meta(self.blobs["scale_codes"], self.blobs["scale_meta"]))
            self.zero = torch.from_numpy(decode_meta(self.blobs["zero_codes"], self.blobs["zero_meta"]))
            self.top = torch.full((out_features,), float((1 << config.bits) - 1))
        else:
            self.codebook = torch.from_numpy(codebook_of_rows(self.blobs["codebook"], np.arange(out_features),
                                                              config.codebook_rows))  # (out, 2^b)
        self.outliers, self.rows, self.cols = torch.zeros(out_features, in_features, dtype=torch.bool), None, None
        if config.outliers:
            row_ptr = self.blobs["outlier_row_ptr"].astype(np.int64)
            self.rows = np.repeat(np.arange(out_features), np.diff(row_ptr))
            self.cols = self.blobs["outlier_cols"].astype(np.int64)
            self.outliers[self.rows, self.cols] = True

    def stored_blobs(self, codes: torch.Tensor, residual: torch.Tensor, vq_index: torch.Tensor | None = None):
        """The blobs with GPTQ's codes (out, in) (vq: its indices (n_vectors, out)) and outlier residuals,
        and what they decode to."""
        out_features, in_features = self.shape
        if self.config.scheme == "vq":
            padded = np.zeros((out_features, vq_dims(self.shape, self.config)[2]), np.uint16)  # (out, index slots)
            padded[:, :vq_index.shape[0]] = vq_index.T.numpy()
            blobs = {**self.blobs, "qweight": pack_codes(padded, self.config.index_bits)}
        else:
            width = -(-in_features // self.config.group_size) * self.config.group_size \
                if self.config.scheme == "affine" else lut_dims(self.shape)[2] * CODES_PER_PACK
            padded = np.zeros((out_features, width), np.uint8)  # padding columns get code 0
            padded[:, :in_features] = codes.numpy()
            blobs = {**self.blobs, "qweight": pack_codes(padded, self.config.bits)}
        if self.rows is not None:  # rows, cols and residual[outliers] are all row-major
            blobs.update(build_csr(self.shape, self.rows, self.cols, residual[self.outliers].numpy()))
        readable = blobs if self.shared is None else {**blobs, "codebook": self.shared}  # as the reader gives them
        return blobs, torch.from_numpy(dequantize(readable, self.shape, self.config))


def _levels(grids: list[_Grid]) -> _Levels:
    """The _Levels of the grids' rows stacked in order."""
    out_total = sum(g.shape[0] for g in grids)
    starts = np.cumsum([0] + [g.shape[0] for g in grids])
    groups = {}  # group size -> (scale, zero) (G, out_total)
    top = torch.zeros(out_total)
    width = max((g.codebook.shape[1] for g in grids if g.codebook is not None), default=0)
    codebook = torch.full((out_total, width), math.inf) if width else None
    lut = torch.zeros(out_total, dtype=torch.bool)
    vq = []
    for grid, start, end in zip(grids, starts[:-1], starts[1:]):
        if grid.points is not None:
            vq.append(_VqRows(int(start), int(end), grid.points, grid.scale.T.contiguous(), grid.config.group_size))
            continue
        if grid.codebook is not None:
            codebook[start:end, :grid.codebook.shape[1]], lut[start:end] = grid.codebook, True
            continue
        g = grid.config.group_size
        scale, zero = groups.setdefault(g, (torch.zeros(grid.scale.shape[1], out_total),
                                            torch.zeros(grid.scale.shape[1], out_total)))
        scale[:, start:end], zero[:, start:end], top[start:end] = grid.scale.T, grid.zero.T, grid.top
    return _Levels([(g, scale, zero) for g, (scale, zero) in groups.items()], top if groups else None, codebook,
                   lut if width else None, vq)


def _rounded(weight, hessian, grids: list[_Grid], act_order: bool, damp: float):
    """GPTQ rounding of W's rows (the grids' rows, stacked in order) → each grid's (blobs, stored)."""
    outliers = torch.cat([g.outliers for g in grids]) if any(g.rows is not None for g in grids) else None
    codes, _, residual, vq_index = _round(weight, hessian, _levels(grids), outliers, act_order, damp)
    vq_index = iter(vq_index)  # one per vq grid, in order
    parts, start = [], 0
    for grid in grids:
        end = start + grid.shape[0]
        index = next(vq_index) if grid.points is not None else None
        parts.append(grid.stored_blobs(codes[start:end], residual[start:end], index))
        start = end
    return parts


def compensated_blobs(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                      outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER, damp: float = DAMP,
                      codebooks: dict | None = None):
    """The blobs of an affine, lut or vq `config` for W with GPTQ rounding, and what they decode to (out, in)
    float32 (a trellis config: its own walk, uncompensated: _walked). codebooks: the file's shared vq codebooks
    and trellis tables (quantize)."""
    if config.scheme == "trellis":
        return _walked(weight, config, importance, codebooks)
    return _rounded(weight, hessian, [_Grid(weight, config, importance, outlier_mode, codebooks)], act_order,
                    damp)[0]


def compensated_rows(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                     outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER, damp: float = DAMP,
                     order: np.ndarray | None = None, codebooks: dict | None = None):
    """compensated_blobs for a `rows` config (converter/row_blocks.py): GPTQ's rows are independent
    given the Hessian, so the rows of every quantized block (each on its own config's levels) are
    rounded together, in one pass; fp16 blocks are stored as they are, trellis blocks walked (_walked). `order`:
    the rows' split
    (None: row_order of weight and importance, as measure() split them)."""
    order = row_order(weight, importance) if order is None else order
    split = RowSplit(order, config.row_counts)
    blocks = {}  # block -> its rows of W and its grid
    walked = {}  # trellis blocks: their own walks (_walked), beside GPTQ's rows
    for b, (_, block_config) in enumerate(config.blocks):
        if block_config.scheme == "trellis":
            rows = torch.from_numpy(split.rows(b))
            walked[b] = rows, _walked(weight[rows], block_config, importance[rows] if importance is not None else None,
                                      codebooks)
        elif block_config.scheme != "fp16":
            rows = torch.from_numpy(split.rows(b))
            blocks[b] = rows, _Grid(weight[rows], block_config, importance[rows] if importance is not None else None,
                                    outlier_mode, codebooks)
    stored = weight.to(torch.float16).to(torch.float32)  # fp16 blocks' rows stay so
    parts = {}
    if blocks:
        rows = torch.cat([r for r, _ in blocks.values()])
        rounded = _rounded(weight[rows], hessian, [grid for _, grid in blocks.values()], act_order, damp)
        for (b, (block_rows, _)), (blobs, block_stored) in zip(blocks.items(), rounded):
            parts[b], stored[block_rows] = blobs, block_stored
    for b, (block_rows, (blobs, block_stored)) in walked.items():
        parts[b], stored[block_rows] = blobs, block_stored

    numbers = iter(range(len(config.blocks)))  # quantize_rows asks for the blocks in order

    def block(w, block_config, block_importance):
        b = next(numbers)
        return parts[b] if b in parts else {"data": w.to(torch.float16).numpy()}

    return quantize_rows(weight, config, importance, order, block), stored


def _walked(weight: torch.Tensor, config: StorageConfig, importance, codebooks: dict | None):
    """(blobs, what they decode to (out, in) float32) of a trellis config: a walk per row has no column-by-column
    rounding for GPTQ to compensate, so the rows are coded as `quantize` codes them (converter/trellis.py); the
    layer's later inputs still see the stored weights."""
    result = quantize(weight, config, SCALES, importance=importance, codebooks=codebooks)
    return result.blobs, weight.to(torch.float32) - result.residual


class _Hessians:
    """on_linear callback: H = Σ xᵀx per linear over the chunks; linears that read the same input
    tensor (q/k/v, gate/up) share one accumulator. While `capturing`, the inputs are only kept (the
    float model's, in `reference`); the next input of the same linear then also adds to
    cross = Σ xᵀ(x_ref − x)."""

    def __init__(self):
        self.of: dict[str, torch.Tensor] = {}  # name -> H (in, in)
        self.cross: dict[str, torch.Tensor] = {}  # name -> (in, in)
        self.reference: dict[str, torch.Tensor] = {}  # name -> the float model's input (T, in)
        self.capturing = False
        self.last_input, self.last_name = None, None

    def __call__(self, name, x):
        if self.capturing:
            self.reference[name] = x.detach()
            return
        if x is self.last_input:  # q/k/v, gate/up: one input, one sum
            self.of.setdefault(name, self.of[self.last_name])
            if self.last_name in self.cross:
                self.cross.setdefault(name, self.cross[self.last_name])
            return
        self.last_input, self.last_name = x, name
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (T, in)
        n = flat.shape[1]
        self.of.setdefault(name, torch.zeros(n, n)).addmm_(flat.T, flat)
        reference = self.reference.pop(name, None)
        if reference is not None:
            delta = reference.reshape(-1, n).to(torch.float32) - flat  # (T, in)
            self.cross.setdefault(name, torch.zeros(n, n)).addmm_(flat.T, delta)

    def clear(self):
        self.of.clear()
        self.cross.clear()
        self.reference.clear()
        self.last_input, self.last_name = None, None


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def quantized_tensors(checkpoint, plans, quantizer_importance, outlier_mode: str, text: str | None, tokens: int,
                      act_order: bool = ACT_ORDER, asymmetry: float = ASYMMETRY, codebooks: dict | None = None):
    """Yield (name, blobs) for every plan in order: decoder linears with layer-sequential GPTQ
    rounding over the calibration text (`tokens` tokens; None: the packaged text), everything else as
    `quantize` stores it. quantizer_importance(name) → (out, in) importance or None. codebooks: the
    file's shared vq codebooks and trellis tables (quantize)."""
    chunks = calibration_chunks(checkpoint, default_text() if text is None else text, tokens)  # (C, T)
    hessians = _Hessians()
    stream = LayerStream(checkpoint, hessians)
    with torch.no_grad():
        x = torch.stack([stream.model.embed(chunk.numpy()) for chunk in chunks])  # (C, T, hidden)
    x_fp = x.clone() if asymmetry else None  # the float model's stream
    done = -1  # the last layer whose linears are rounded
    stored_blobs: dict[str, dict] = {}
    for plan in plans:
        layer = _layer_of(plan.name)
        if plan.role == "linear" and layer is not None and layer > done:
            if layer != done + 1:
                raise ConversionError(f"gptq: layer {layer}'s tensors come before layer {done + 1}'s")
            x, x_fp = _round_layer(stream, hessians, layer, x, x_fp, plans, quantizer_importance, outlier_mode,
                                   act_order, asymmetry, stored_blobs, codebooks)
            done = layer
        if plan.role == "linear" and plan.config.scheme != "fp16":
            yield plan.name, stored_blobs.pop(plan.name)
        else:
            importance = quantizer_importance(plan.name)
            yield plan.name, quantize(checkpoint.load(plan.name), plan.config, SCALES, importance=importance,
                                      outlier_mode=outlier_mode, codebooks=codebooks).blobs


def ridge_factor(hessian: torch.Tensor, damp: float = DAMP) -> np.ndarray:
    """The lower Cholesky factor (Fortran order) of H dampened as _inverse_factor dampens it (dead
    inputs' diagonal set to 1, + λ = damp × the mean diagonal), in _factor_dtype: one n² copy."""
    n = hessian.shape[0]
    h = hessian.numpy().astype(_factor_dtype(n, damp), copy=True)  # (in, in)
    diag = np.diagonal(h).copy()
    diag[diag == 0] = 1.0  # inputs never seen (dead): an all-zero H still factors
    h[np.diag_indices(n)] = diag + damp * float(diag.mean())
    return _cholesky(h)


def asymmetric_target(weight: torch.Tensor, factor: np.ndarray, cross: torch.Tensor, asymmetry: float) -> torch.Tensor:
    """W + asymmetry × D (out, in), D the ridge fit of the float model's output shift from the quantized
    stream's inputs: D = argmin ‖X_q Dᵀ − (X_fp − X_q) Wᵀ‖² + λ‖D‖², i.e. Dᵀ = (H + λI)⁻¹ cross Wᵀ with
    H = X_qᵀX_q, cross = X_qᵀ(X_fp − X_q); factor: ridge_factor(H) (shared by the linears of one input)."""
    from scipy.linalg import lapack

    potrs = lapack.spotrs if factor.dtype == np.float32 else lapack.dpotrs
    rhs = np.asfortranarray((cross @ weight.T).numpy(), dtype=factor.dtype)  # (in, out)
    solved, info = potrs(factor, rhs, lower=1, overwrite_b=1)
    if info != 0:
        raise ConversionError("gptq: the asymmetric target's solve failed")
    return weight + asymmetry * torch.from_numpy(np.ascontiguousarray(solved.T, dtype=np.float32))


def _round_layer(stream, hessians, i, x, x_fp, plans, quantizer_importance, outlier_mode, act_order, asymmetry,
                 stored_blobs, codebooks=None):
    """Round decoder layer i's linears against Hessians from inputs x (C, T, hidden) (outputs of the
    quantized layers below) and, with x_fp (the float model's inputs), towards the float outputs;
    returns the quantized layer's outputs and the float layer's."""
    configs = {plan.name: plan.config for plan in plans if plan.role == "linear" and _layer_of(plan.name) == i}
    linears = stream.load_layer(i, trainable=False)
    with torch.no_grad():
        fp_out = []
        for c in range(x.shape[0]):
            if x_fp is not None:  # the float layer on the float stream: its linears' inputs kept
                stream.recording = hessians.capturing = True
                fp_out.append(stream.block(i, x_fp[c]))
                hessians.capturing = False
            stream.recording = True
            stream.block(i, x[c])
        stream.recording = False
        x_fp = torch.stack(fp_out) if x_fp is not None else None
        groups: dict[int, list] = {}  # id(H) -> the quantized linears that read that input, in order
        for name, weight in linears.items():
            if configs[name].scheme == "fp16":
                weight.copy_(weight.to(torch.float16).to(torch.float32))
            elif name not in hessians.of:
                raise ConversionError(f"gptq: the model never applied '{name}' as a linear")
            else:
                groups.setdefault(id(hessians.of[name]), []).append(name)
        for names in groups.values():
            hessian, cross = hessians.of[names[0]], hessians.cross.get(names[0])
            targets = {name: linears[name] for name in names}
            if cross is not None:  # one factor per input; it and the cross term are freed before rounding
                factor = ridge_factor(hessian)
                targets = {name: asymmetric_target(w, factor, cross, asymmetry) for name, w in targets.items()}
                for key in [key for key, value in hessians.cross.items() if value is cross]:
                    del hessians.cross[key]
                del factor, cross
            for name in names:
                weight, importance = linears[name], quantizer_importance(name)
                if configs[name].scheme == "rows":  # split as measure() split the checkpoint's weights
                    blobs, stored = compensated_rows(targets.pop(name), hessian, configs[name], importance,
                                                     outlier_mode, act_order, order=row_order(weight, importance),
                                                     codebooks=codebooks)
                else:
                    blobs, stored = compensated_blobs(targets.pop(name), hessian, configs[name], importance,
                                                      outlier_mode, act_order, codebooks=codebooks)
                stored_blobs[name] = blobs
                weight.copy_(stored)
        hessians.clear()
        x = torch.stack([stream.block(i, x[c]) for c in range(x.shape[0])])
    stream.free_layer(i)
    return x, x_fp
