"""Error-compensating rounding (GPTQ, Frantar et al. 2022) of the affine scheme, layer-sequential.

For one linear W (out, in) with calibration inputs X (tokens, in) and H = XᵀX, GPTQ rounds the columns
of W in order and, after each column j, pushes its rounding error onto the columns not yet rounded
through the inverse Hessian, so that the output error tr(ΔW H ΔWᵀ) = ‖X ΔWᵀ‖²_F stays small:

    U = chol(H⁻¹)ᵀ (upper)                                   H dampened: + 1% of its mean diagonal
    for j in order:  q_j = round(w_j)  e_j = (w_j − q_j) / U_jj  w_k −= e_j U_jk  (k after j)

What is rounded is exactly what the file stores:
  * the grid: per-group scale and zero are fitted first (`wls`, importance-weighted as without gptq,
    on the original weights; GPTQ's "static groups") and double-quantized to the 8-bit metadata the
    file holds; the columns are then rounded to the *decoded* ŝ, ẑ, as kernels.round_groups does;
  * outliers (a config's +oP%): the positions `quantize` chose keep their code and store the fp16
    residual of the *updated* weight, so their error is fp16 rounding only;
  * act-order: columns in decreasing H_jj (the groups stay fixed by column index, so the metadata
    layout does not change).

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
from .row_blocks import quantize_rows, row_order

DAMP = 0.01  # dampening: this share of H's mean diagonal is added to the diagonal
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
    out_features, in_features = weight.shape
    levels = float((1 << bits) - 1)
    w = weight.to(torch.float32).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs never seen: nothing to compensate through them
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    w = w[:, order]
    group = order // group_size  # (in,) the group of each column, in rounding order
    keep = outliers[:, order] if outliers is not None else None
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    stored = torch.empty(out_features, in_features)
    residual = torch.zeros(out_features, in_features)  # the outliers' fp16 residuals (as float32)
    for b0 in range(0, in_features, BLOCK):
        b1 = min(b0 + BLOCK, in_features)
        errors = torch.empty(out_features, b1 - b0)
        for j in range(b0, b1):
            s, z = scale[:, group[j]], zero[:, group[j]]  # (out,)
            col = w[:, j]
            q = torch.where(s != 0, torch.clamp(torch.round(col / s + z), 0.0, levels), 0.0)
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


def compensated_blobs(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                      outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER):
    """The blobs of `config` for W with GPTQ rounding, and what they decode to (out, in) float32."""
    if config.scheme != "affine":
        raise ConversionError(f"--quantizer gptq rounds the affine scheme, not {config.scheme!r}")
    blobs = quantize(weight, config, SCALES, importance=importance, outlier_mode=outlier_mode).blobs
    out_features, in_features = weight.shape
    g = config.group_size
    scale = torch.from_numpy(decode_meta(blobs["scale_codes"], blobs["scale_meta"]))  # (out, G) as stored
    zero = torch.from_numpy(decode_meta(blobs["zero_codes"], blobs["zero_meta"]))
    outliers = None
    if config.outliers:
        row_ptr = blobs["outlier_row_ptr"].astype(np.int64)
        rows = np.repeat(np.arange(out_features), np.diff(row_ptr))
        cols = blobs["outlier_cols"].astype(np.int64)
        outliers = torch.zeros(out_features, in_features, dtype=torch.bool)
        outliers[rows, cols] = True
    codes, _, residual = gptq_round(weight, hessian, scale, zero, g, config.bits, outliers, act_order)
    padded = np.zeros((out_features, scale.shape[1] * g), np.uint8)  # padding columns get code 0
    padded[:, :in_features] = codes.numpy()
    blobs["qweight"] = pack_codes(padded, config.bits)
    if outliers is not None:  # rows, cols and residual[outliers] are all row-major
        blobs.update(build_csr(weight.shape, rows, cols, residual[outliers].numpy()))
    return blobs, torch.from_numpy(dequantize(blobs, weight.shape, config))


def compensated_rows(weight: torch.Tensor, hessian: torch.Tensor, config: StorageConfig, importance=None,
                     outlier_mode: str = "magnitude", act_order: bool = ACT_ORDER):
    """compensated_blobs for a `rows` config (converter/row_blocks.py): GPTQ's rows are independent
    given the Hessian, so each row block is rounded with the same H and its own config."""
    order = row_order(weight, importance)  # as measure() split it: the same weights and importance
    decoded = []

    def block(w, block_config, block_importance):
        if block_config.scheme == "fp16":
            decoded.append(w.to(torch.float16).to(torch.float32))
            return {"data": w.to(torch.float16).numpy()}
        blobs, stored = compensated_blobs(w, hessian, block_config, block_importance, outlier_mode, act_order)
        decoded.append(stored)
        return blobs

    blobs = quantize_rows(weight, config, importance, order, block)
    stored = torch.empty_like(weight)
    stored[torch.from_numpy(order)] = torch.cat(decoded)
    return blobs, stored


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


def held_out_gain(weight, fit_hessian, held_hessian, config, importance=None, outlier_mode="magnitude") -> float:
    """GPTQ's output error over wls's for W at `config`: GPTQ compensates with `fit_hessian`, both
    errors tr(ΔW H ΔWᵀ) are measured with `held_hessian` (the inputs of other text)."""
    plain = quantize(weight, config, SCALES, importance=importance, outlier_mode=outlier_mode).blobs
    _, stored = compensated_blobs(weight, fit_hessian, config, importance, outlier_mode)
    h = held_hessian.to(torch.float64)
    errors = [float(torch.einsum("oi,ij,oj->", d, h, d)) for d in (
        (weight - torch.from_numpy(dequantize(plain, weight.shape, config))).to(torch.float64),
        (weight - stored).to(torch.float64))]
    return errors[1] / errors[0] if errors[0] > 0 else 1.0


def compensation_gains(checkpoint, names, candidate, importance, outlier_mode: str, text: str | None, tokens: int,
                       progress=None) -> np.ndarray:
    """Per decoder linear in `names`: the ratio of GPTQ's output error tr(ΔW H ΔWᵀ) to wls's at one
    `candidate` config, *held out*: GPTQ compensates with the Hessian of the first half of the
    calibration chunks and both errors are measured with the Hessian of the second half (inputs through
    the fp model, one layer-streamed forward).

    The MILP's error table is measured with wls (cheap, row-sampled, cached); GPTQ lowers each
    matrix's error by a factor that differs a lot between matrices but little between configs of one
    matrix, so the table's rows are scaled by these gains and the MILP trades what GPTQ will actually
    store. Measured on the chunks GPTQ compensated with, the gain flatters it (GPTQ fits the sample
    Hessian's small directions): on SmolLM2 at b3g64 layer 3's down_proj keeps 0.62 of wls's error
    in-sample but 1.01 on the next 8192 tokens of Botchan."""
    chunks = calibration_chunks(checkpoint, default_text() if text is None else text, tokens)
    half = max(1, len(chunks) // 2)
    wanted = set(names)
    gains = {}
    fit, held = _Hessians(), _Hessians()
    stream = LayerStream(checkpoint)
    n_layers = checkpoint.config.num_hidden_layers
    bar = progress(total=n_layers, desc="gptq gains", unit="layer") if progress else None
    with torch.no_grad():
        x = torch.stack([stream.model.embed(chunk.numpy()) for chunk in chunks])  # (C, T, hidden)
        for i in range(n_layers):
            linears = stream.load_layer(i, trainable=False)
            stream.recording = True
            outputs = []
            for c in range(x.shape[0]):
                stream.on_linear = fit if c < half else held
                outputs.append(stream.block(i, x[c]))
            x = torch.stack(outputs)
            stream.recording = False
            for name, weight in linears.items():
                if name not in wanted:
                    continue
                held_out = held.of[name] if name in held.of else fit.of[name]  # one chunk: nothing held out
                gains[name] = held_out_gain(weight, fit.of[name], held_out, candidate.storage(weight.shape),
                                            importance(name), outlier_mode)
            fit.clear()
            held.clear()
            stream.free_layer(i)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    missing = [name for name in names if name not in gains]
    if missing:
        raise ConversionError(f"gptq: the model never applied '{missing[0]}' as a linear")
    return np.array([gains[name] for name in names])
