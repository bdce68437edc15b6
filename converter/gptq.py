"""Error-compensating rounding (GPTQ, Frantar et al. 2022) of the affine scheme, layer-sequential.

For one linear W (out, in) with calibration inputs X (tokens, in) and H = XᵀX, GPTQ rounds the columns
of W in order and, after each column j, pushes its rounding error onto the columns not yet rounded
through the inverse Hessian, so that the output error tr(ΔW H ΔWᵀ) = ‖X ΔWᵀ‖²_F stays small:

    U = chol(H⁻¹)ᵀ (upper)                                   H dampened: + DAMP × its mean diagonal
    for j in order:  q_j = round(w_j)  e_j = (w_j − q_j) / U_jj  w_k −= e_j U_jk  (k after j)

What is rounded is exactly what the file stores:
  * the grid: per-group scale and zero are fitted first (`wls`, importance-weighted as without gptq,
    on the original weights; GPTQ's "static groups") and double-quantized to the 8-bit metadata the
    file holds; the columns are then rounded to the *decoded* ŝ, ẑ, as kernels.round_groups does;
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
chunks are run through the quantized layer to give layer i+1's inputs. Resident: one layer's weights
and Hessians (one per distinct input: q/k/v share one, gate/up share one) and two activation sets.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from ..format_spec import StorageConfig, decode_meta, pack_codes
from ..format_spec.affine import build_csr, dequantize
from .calibrate import LayerStream, calibration_chunks, default_text
from .errors import ConversionError
from .quantize import quantize
from .row_blocks import RowSplit, quantize_rows, row_order

# Dampening: this share of H's mean diagonal is added to the diagonal. SmolLM2 at 3.0 bpw (WikiText-2,
# 16 chunks; calibrated on Botchan; wls alone 34.43): 0.01 → 35.03, 0.1 → 33.43, 1 → 32.76, 3 → 32.92.
# With 0.01 held-out *Botchan* text gains most (45.39 → 39.53): the Hessian's small directions fit the
# calibration text's style and do not carry over to another text.
DAMP = 1.0
BLOCK = 128  # columns updated lazily in blocks (GPTQ's batched updates)
ACT_ORDER = True  # round columns in decreasing H_jj
SCALES = "wls"  # the quantizer that fits the groups' scales and zeros (and measures errors for the MILP)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int, bits: int, outliers: torch.Tensor | None = None, act_order: bool = ACT_ORDER,
               damp: float = DAMP):
    """Round W (out, in) to the fixed grid scale/zero (out, G) with GPTQ's error compensation for
    Hessian H (in, in). outliers: None or an (out, in) bool mask of positions that also store an fp16
    residual. Returns (codes (out, in) uint8, stored (out, in) float32 = what the file decodes to,
    the outliers' residuals (out, in) float32, 0 elsewhere)."""
    group = torch.arange(weight.shape[1]) // group_size  # (in,) each column's group
    levels = torch.full((weight.shape[0],), float((1 << bits) - 1))
    return _round(weight, hessian, scale[:, group], zero[:, group], levels, outliers, act_order, damp)


def _round(weight, hessian, scale, zero, levels, outliers, act_order: bool, damp: float):
    """gptq_round with the grid given per weight: scale and zero (out, in), the top code per row
    levels (out,). Rows stored with different configs (a matrix's row blocks) round together: one
    factorization of H and one column loop."""
    out_features, in_features = weight.shape
    w = weight.to(torch.float32).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs never seen: nothing to compensate through them
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    w, scale, zero = w[:, order], scale[:, order], zero[:, order]
    keep = outliers[:, order] if outliers is not None else None
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    stored = torch.empty(out_features, in_features)
    residual = torch.zeros(out_features, in_features)  # the outliers' fp16 residuals (as float32)
    for b0 in range(0, in_features, BLOCK):
        b1 = min(b0 + BLOCK, in_features)
        errors = torch.empty(out_features, b1 - b0)
        for j in range(b0, b1):
            s, z = scale[:, j], zero[:, j]  # (out,)
            col = w[:, j]
            q = torch.where(s != 0, torch.minimum(torch.clamp(torch.round(col / s + z), min=0.0), levels), 0.0)
            value = (q - z) * s
            if keep is not None:  # an outlier stores the fp16 residual of the updated weight
                residual[:, j] = torch.where(keep[:, j], (col - value).to(torch.float16).to(torch.float32), 0.0)
                value = value + residual[:, j]
            codes[:, j], stored[:, j] = q.to(torch.uint8), value
            error = (col - value) / u[j, j]
            w[:, j + 1:b1] -= error[:, None] * u[j, j + 1:b1][None, :]
            errors[:, j - b0] = error
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    inverse = torch.argsort(order)
    return codes[:, inverse], stored[:, inverse], residual[:, inverse]


class _Grid:
    """wls's stored grid for W at an affine config (GPTQ's static groups): the blobs `quantize` gives
    (its codes are replaced), scale and zero per weight (out, in) as decoded, the top code, and the
    outlier positions (row-major) when the config keeps outliers."""

    def __init__(self, weight, config: StorageConfig, importance, outlier_mode: str):
        if config.scheme != "affine":
            raise ConversionError(f"--quantizer gptq rounds the affine scheme, not {config.scheme!r}")
        self.shape, self.config = tuple(weight.shape), config
        self.blobs = quantize(weight, config, SCALES, importance=importance, outlier_mode=outlier_mode).blobs
        out_features, in_features = weight.shape
        group = torch.arange(in_features) // config.group_size
        self.scale = torch.from_numpy(decode_meta(self.blobs["scale_codes"], self.blobs["scale_meta"]))[:, group]
        self.zero = torch.from_numpy(decode_meta(self.blobs["zero_codes"], self.blobs["zero_meta"]))[:, group]
        self.levels = torch.full((out_features,), float((1 << config.bits) - 1))
        self.outliers, self.rows, self.cols = torch.zeros(out_features, in_features, dtype=torch.bool), None, None
        if config.outliers:
            row_ptr = self.blobs["outlier_row_ptr"].astype(np.int64)
            self.rows = np.repeat(np.arange(out_features), np.diff(row_ptr))
            self.cols = self.blobs["outlier_cols"].astype(np.int64)
            self.outliers[self.rows, self.cols] = True

    def stored_blobs(self, codes: torch.Tensor, residual: torch.Tensor):
        """The blobs with GPTQ's codes (out, in) and outlier residuals, and what they decode to."""
        out_features, in_features = self.shape
        g = self.config.group_size
        padded = np.zeros((out_features, -(-in_features // g) * g), np.uint8)  # padding columns get code 0
        padded[:, :in_features] = codes.numpy()
        blobs = {**self.blobs, "qweight": pack_codes(padded, self.config.bits)}
        if self.rows is not None:  # rows, cols and residual[outliers] are all row-major
            blobs.update(build_csr(self.shape, self.rows, self.cols, residual[self.outliers].numpy()))
        return blobs, torch.from_numpy(dequantize(blobs, self.shape, self.config))


def compensated_blobs(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                      outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER, damp: float = DAMP):
    """The blobs of `config` for W with GPTQ rounding, and what they decode to (out, in) float32."""
    grid = _Grid(weight, config, importance, outlier_mode)
    outliers = grid.outliers if grid.rows is not None else None
    codes, _, residual = _round(weight, hessian, grid.scale, grid.zero, grid.levels, outliers, act_order, damp)
    return grid.stored_blobs(codes, residual)


def compensated_rows(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                     outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER, damp: float = DAMP):
    """compensated_blobs for a `rows` config (converter/row_blocks.py): GPTQ's rows are independent
    given the Hessian, so the rows of every affine block (each on its own config's grid) are rounded
    together, in one pass; fp16 blocks are stored as they are."""
    order = row_order(weight, importance)  # as measure() split it: the same weights and importance
    split = RowSplit(order, config.row_counts)
    grids = {}  # block -> (its rows of W, its grid)
    for b, (_, block_config) in enumerate(config.blocks):
        if block_config.scheme != "fp16":
            rows = torch.from_numpy(split.rows(b))
            grids[b] = rows, _Grid(weight[rows], block_config, importance[rows] if importance is not None else None,
                                   outlier_mode)
    stored = weight.to(torch.float16).to(torch.float32)  # fp16 blocks' rows stay so
    if grids:
        rows = torch.cat([r for r, _ in grids.values()])
        cat = [torch.cat([getattr(g, key) for _, g in grids.values()]) for key in ("scale", "zero", "levels", "outliers")]
        any_outliers = any(g.rows is not None for _, g in grids.values())
        codes, _, residual = _round(weight[rows], hessian, *cat[:3], cat[3] if any_outliers else None, act_order, damp)
    parts, start = {}, 0
    for b, (rows, grid) in grids.items():
        end = start + len(rows)
        parts[b], stored[rows] = grid.stored_blobs(codes[start:end], residual[start:end])
        start = end

    numbers = iter(range(len(config.blocks)))  # quantize_rows asks for the blocks in order

    def block(w, block_config, block_importance):
        b = next(numbers)
        return parts[b] if b in parts else {"data": w.to(torch.float16).numpy()}

    return quantize_rows(weight, config, importance, order, block), stored


class _Hessians:
    """on_linear callback: H = Σ xᵀx per linear over the chunks; linears that read the same input
    tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self):
        self.of: dict[str, torch.Tensor] = {}
        self.last_input, self.last_sum = None, None

    def __call__(self, name, x):
        if x is self.last_input:
            self.of.setdefault(name, self.last_sum)
            return
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        total = self.of.get(name)
        if total is None:
            total = self.of[name] = torch.zeros(flat.shape[1], flat.shape[1])
        total.addmm_(flat.T, flat)
        self.last_input, self.last_sum = x, total

    def clear(self):
        self.of.clear()
        self.last_input, self.last_sum = None, None


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def quantized_tensors(checkpoint, plans, quantizer_importance, outlier_mode: str, text: str | None, tokens: int,
                      act_order: bool = ACT_ORDER):
    """Yield (name, blobs) for every plan in order: decoder linears with layer-sequential GPTQ
    rounding over the calibration text (`tokens` tokens; None: the packaged text), everything else as
    `quantize` stores it. quantizer_importance(name) → (out, in) importance or None."""
    chunks = calibration_chunks(checkpoint, default_text() if text is None else text, tokens)  # (C, T)
    hessians = _Hessians()
    stream = LayerStream(checkpoint, hessians)
    with torch.no_grad():
        x = torch.stack([stream.model.embed(chunk.numpy()) for chunk in chunks])  # (C, T, hidden)
    done = -1  # the last layer whose linears are rounded
    stored_blobs: dict[str, dict] = {}
    for plan in plans:
        layer = _layer_of(plan.name)
        if plan.role == "linear" and layer is not None and layer > done:
            if layer != done + 1:
                raise ConversionError(f"gptq: layer {layer}'s tensors come before layer {done + 1}'s")
            x = _round_layer(stream, hessians, layer, x, plans, quantizer_importance, outlier_mode, act_order,
                             stored_blobs)
            done = layer
        if plan.role == "linear" and plan.config.scheme != "fp16":
            yield plan.name, stored_blobs.pop(plan.name)
        else:
            importance = quantizer_importance(plan.name)
            yield plan.name, quantize(checkpoint.load(plan.name), plan.config, SCALES, importance=importance,
                                      outlier_mode=outlier_mode).blobs


def _round_layer(stream, hessians, i, x, plans, quantizer_importance, outlier_mode, act_order, stored_blobs):
    """Round decoder layer i's linears against Hessians from inputs x (C, T, hidden) (outputs of the
    quantized layers below); returns the quantized layer's outputs."""
    configs = {plan.name: plan.config for plan in plans if plan.role == "linear" and _layer_of(plan.name) == i}
    linears = stream.load_layer(i, trainable=False)
    with torch.no_grad():
        stream.recording = True
        for c in range(x.shape[0]):
            stream.block(i, x[c])
        stream.recording = False
        for name, weight in linears.items():
            config = configs[name]
            if config.scheme == "fp16":
                weight.copy_(weight.to(torch.float16).to(torch.float32))
                continue
            if name not in hessians.of:
                raise ConversionError(f"gptq: the model never applied '{name}' as a linear")
            compensate = compensated_rows if config.scheme == "rows" else compensated_blobs
            blobs, stored = compensate(weight, hessians.of[name], config, quantizer_importance(name),
                                       outlier_mode, act_order)
            stored_blobs[name] = blobs
            weight.copy_(stored)
        hessians.clear()
        x = torch.stack([stream.block(i, x[c]) for c in range(x.shape[0])])
    stream.free_layer(i)
    return x
