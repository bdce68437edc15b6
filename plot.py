"""Plots of mxq's allocations and sweeps (PNG, matplotlib), shared by `mxq sweep` and `mxq inspect --plot`.

matplotlib is an optional extra (`pip install 'mxq[plot]'`) and is imported only when a plot is drawn.

    allocation_grid(entries)  (name, label, bpw) of every decoder linear → layer × module grids
    heatmap(entries, path)    the allocation heatmap: layers along x, modules along y, colour = bits per weight
    frontier(rows, path)      a sweep's predicted and measured loss increase and perplexity against bpw
    pyplot()                  matplotlib.pyplot, file-only (also tools/quality_plot.py's)
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = "matplotlib is not installed; install the plot extra: pip install 'mxq[plot]'"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PlotUnavailable(RuntimeError):
    """matplotlib is missing (the message says how to install it)."""


def require() -> None:
    """Raise PlotUnavailable (one line: how to install) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None


def check_png_path(path) -> Path:
    """The path a PNG may be written to (format_spec.writer.check_output_path's rules), named *.png."""
    from .format_spec.writer import OutputPathError, check_output_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputPathError(f"{path}: a plot is written as PNG; name it *.png")
    return check_output_path(path)


def _save(fig, path) -> None:
    """Write the figure as PNG next to `path`, then rename it into place: never a half-written plot."""
    plt = pyplot()
    path = check_png_path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        temporary = Path(tmp.name)
    try:
        fig.savefig(temporary, dpi=130, format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name ('model.layers.3.mlp.up_proj.weight' → 3), or None."""
    match = _LAYER.search(name)
    return int(match[1]) if match else None


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (PlotUnavailable when matplotlib is missing)."""
    require()
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Grid:
    layers: list  # layer indices (columns)
    modules: list  # module names in first-seen order (rows), e.g. q_proj … down_proj
    bpw: np.ndarray  # (modules, layers) float: bits per weight stored, NaN where a layer lacks the module
    labels: list  # [module][layer] storage label, e.g. "b4g64", "" where missing


def allocation_grid(entries) -> Grid:
    """entries: (tensor name, storage label, bits per weight) of decoder linears, names like
    'model.layers.3.mlp.down_proj.weight' (module = the part before '.weight')."""
    cells, layers, modules = {}, set(), []
    for name, label, bpw in entries:
        layer = layer_of(name)
        if layer is None:
            continue
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        if module not in modules:
            modules.append(module)
        layers.add(layer)
        cells[layer, module] = (label, float(bpw))
    if not cells:
        raise ValueError("no per-layer decoder linears to plot")
    layers = sorted(layers)
    bpw = np.full((len(modules), len(layers)), np.nan)
    labels = [["" for _ in layers] for _ in modules]
    for r, module in enumerate(modules):
        for c, layer in enumerate(layers):
            if (layer, module) in cells:
                labels[r][c], bpw[r, c] = cells[layer, module]
    return Grid(layers, modules, bpw, labels)


def _short(label: str) -> str:
    """b4g64 → '4', b3g32+o0.5% → '3+', fp16 → '16': the bit width, readable in a small cell."""
    match = re.match(r"b(\d+)g\d+(\+)?", label)
    if match:
        return match[1] + ("+" if match[2] else "")
    return "16" if label == "fp16" else label[:3]


def heatmap(entries, path, title: str = "") -> str:
    """Write the allocation heatmap of `entries` (see allocation_grid) to `path` (PNG); returns path."""
    plt = pyplot()
    grid = allocation_grid(entries)
    n_mod, n_lay = grid.bpw.shape
    width = min(max(6.0, 0.32 * n_lay + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(width, 0.42 * n_mod + 1.9))
    finite = grid.bpw[np.isfinite(grid.bpw)]
    lo, hi = math.floor(finite.min()), math.ceil(finite.max())
    image = ax.imshow(np.ma.masked_invalid(grid.bpw), aspect="auto", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1),
                      interpolation="nearest")
    if n_lay <= 64:  # bit widths written in the cells while they stay legible
        for r in range(n_mod):
            for c in range(n_lay):
                if grid.labels[r][c]:
                    shade = (grid.bpw[r, c] - lo) / max(hi - lo, 1)
                    ax.text(c, r, _short(grid.labels[r][c]), ha="center", va="center", fontsize=7,
                            color="black" if shade > 0.6 else "white")
    step = max(1, n_lay // 32)
    ax.set_xticks(range(0, n_lay, step), [str(grid.layers[c]) for c in range(0, n_lay, step)], fontsize=8)
    ax.set_yticks(range(n_mod), grid.modules, fontsize=9)
    ax.set_xlabel("decoder layer")
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label("bits per weight (stored)")
    numel_note = "cells: bit width of the codes ('+': with fp16 outliers); colour: stored bits per weight"
    ax.set_title("\n".join(textwrap.wrap(title or "allocation", int(width * 11))), fontsize=9, loc="left")
    fig.text(0.01, 0.01, numel_note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)
    return str(path)


def frontier(rows, path, title: str = "") -> str:
    """A sweep's frontier: rows are dicts with 'bpw', 'predicted_pct', 'calibrated_pct' (or None),
    'measured_pct' (None where not measured), 'predicted_ppl', 'measured_ppl'; fp_ppl in rows[0]['fp_ppl'].
    Left: loss increase (% of the fp model's loss, log scale); right: perplexity."""
    plt = pyplot()
    bpw = np.array([r["bpw"] for r in rows], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    calibrated = any(r.get("calibrated_pct") is not None for r in rows)
    left.plot(bpw, [r["predicted_pct"] for r in rows], "-", color="tab:blue", label="predicted (Fisher)")
    if calibrated:
        left.plot(bpw, [r["calibrated_pct"] for r in rows], "--", color="tab:orange",
                  label="predicted, calibrated to the measured points")
    measured = [r for r in rows if r.get("measured_pct") is not None]
    above = [r for r in measured if r["measured_pct"] > 0]  # a log axis: a file measured at or below fp is omitted
    if above:
        left.plot([r["bpw"] for r in above], [r["measured_pct"] for r in above], "o", color="tab:red",
                  label="measured (runtime)")
    if len(above) < len(measured):
        left.plot([], [], " ", label=f"{len(measured) - len(above)} measured at or below the fp loss (not shown)")
    left.set_yscale("log")
    left.set_xlabel("bits per weight (decoder linears)")
    left.set_ylabel("loss increase, % of the fp model's loss")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fp_ppl = rows[0].get("fp_ppl")
    right.plot(bpw, [r["predicted_ppl"] for r in rows], "--" if calibrated else "-",
               color="tab:orange" if calibrated else "tab:blue",
               label="predicted, calibrated" if calibrated else "predicted (Fisher)")
    if measured:
        right.plot([r["bpw"] for r in measured], [r["measured_ppl"] for r in measured], "o", color="tab:red",
                   label="measured (runtime)")
        for r in measured:
            right.annotate(f"{r['measured_ppl']:.2f}", (r["bpw"], r["measured_ppl"]), textcoords="offset points",
                           xytext=(4, 6), fontsize=7)
    if fp_ppl:
        right.axhline(fp_ppl, color="0.4", linestyle=":", label=f"fp16 model ({fp_ppl:.2f})")
    right.set_xlabel("bits per weight (decoder linears)")
    right.set_ylabel("perplexity")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return str(path)
