"""The quality plot of README.md: perplexity against bits per weight for mxq's methods, its peers and the
targets, from docs/quality.csv (the measured points; README's "Quality" section states each of them).

    python tools/quality_plot.py [--csv docs/quality.csv] [-o docs/quality.png]

Series of kind `mxq` are drawn as lines through their points, `peer` points as markers (a horizontal bar
where the peer's bits per weight are a range, bpw … bpw_high) with their note, `target` as open markers,
`reference` (fp16) as a dotted line. The y axis is logarithmic: the low budgets span 21–68.
Needs matplotlib (pip install 'mxq[plot]').
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mxq.plot import PlotUnavailable, pyplot

REPO = Path(__file__).resolve().parent.parent

KINDS = ("mxq", "peer", "target", "reference")


def read_rows(path) -> list[dict]:
    """docs/quality.csv's data rows as written: dicts of strings by column. Lines starting with # are comments."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def read_points(path) -> list[dict]:
    """docs/quality.csv → one dict per point: series, kind, bpw, bpw_high (None), perplexity, note ('' or text).
    A bad row raises ValueError naming the file and the data row."""
    points = []
    for number, row in enumerate(read_rows(path), start=1):
        try:
            kind = row["kind"]
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
            points.append(dict(series=row["series"], kind=kind, bpw=float(row["bpw"]),
                               bpw_high=float(row["bpw_high"]) if row["bpw_high"] else None,
                               perplexity=float(row["perplexity"]), note=row["note"] or ""))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: data row {number}: {e}") from None
    return points


def draw(points, path) -> str:
    """The plot (module doc) of read_points' points to the PNG at path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.6))
    series = list(dict.fromkeys(p["series"] for p in points))
    mxq_colors = iter(plt.get_cmap("tab10").colors)
    peer_markers = iter("sD^v")
    for name in series:
        mine = sorted((p for p in points if p["series"] == name), key=lambda p: p["bpw"])
        kind = mine[0]["kind"]
        bpw, ppl = [p["bpw"] for p in mine], [p["perplexity"] for p in mine]
        if kind == "reference":
            ax.axhline(ppl[0], color="0.4", linestyle=":", label=f"{name} ({ppl[0]:.3f})")
        elif kind == "target":
            ax.plot(bpw, ppl, "_", color="black", markersize=18, markeredgewidth=2, label=name)
        elif kind == "mxq":
            ax.plot(bpw, ppl, "o-", color=next(mxq_colors), label=name, linewidth=1.6, markersize=4)
        else:
            color = "0.35"
            marker = next(peer_markers, "o")
            ax.plot(bpw, ppl, marker, color=color, label=name, markersize=6, linestyle="none")
            for i, p in enumerate(mine):  # (notes alternately below and above: neighbouring peers' apart)
                if p["bpw_high"] is not None:
                    ax.plot([p["bpw"], p["bpw_high"]], [p["perplexity"]] * 2, "-", color=color, linewidth=1)
                if p["note"]:
                    ax.annotate(p["note"], (p["bpw"], p["perplexity"]), textcoords="offset points",
                                xytext=(5, -10 if i % 2 == 0 else 4), fontsize=7, color=color)
    ax.set_yscale("log")
    ticks = [20, 22, 25, 28, 32, 40, 50, 60, 70]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_yticks([], minor=True)
    ax.set_ylim(20, 72)
    ax.set_xlim(2.3, 5.7)
    ax.set_xlabel("bits per weight (decoder linears)")
    ax.set_ylabel("perplexity (WikiText-2, ctx 2048, 16 chunks; log scale)")
    ax.set_title("SmolLM2-135M: quality against size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(REPO / "docs" / "quality.csv"))
    parser.add_argument("-o", "--output", default=str(REPO / "docs" / "quality.png"))
    args = parser.parse_args(argv)
    try:
        print("wrote", draw(read_points(args.csv), args.output))
    except (OSError, ValueError, PlotUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
