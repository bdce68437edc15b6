"""Quality sweep: perplexity vs achieved bits per weight for allocation methods and uniform configs.

    python tools/quality_sweep.py [--fixture smollm2] [--methods paper,fisher-wls,...] \
        [--budgets 2.5,3.0,3.5,4.25,5.0,5.5,6.5,8.5] [--ctx 2048] [--chunks 16] [--out sweep]

Writes OUT.csv and OUT.png. Perplexity: WikiText-2 test (../shared/data/wikitext2-test.txt), the text
tokenized once, non-overlapping ctx-token chunks, NLL of positions 1..ctx-1 of each, first --chunks
chunks: exactly `mxq eval FILE --ctx CTX --max-chunks CHUNKS` (it calls the same runtime code, in
cached-dequantized mode for speed; its parity with transformers is tested in tests/test_runtime.py).
Each point is labelled with method, ctx and chunks; the CSV also has calibration and measurement
seconds (0 when cached).
"""
import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
import mxq  # noqa: E402
from mxq.converter import convert  # noqa: E402
from mxq.runtime.perplexity import perplexity as runtime_perplexity  # noqa: E402

# name -> conversion options; "uniform-*" methods ignore the budget (one config everywhere). "default" is
# `mxq convert`'s own defaults; every other method runs without input scaling unless it says so (BASE),
# as their README rows were measured.
BASE = dict(input_scaling=0.0)
METHODS = {
    "default": dict(),
    "paper": dict(configs="paper", quantizer="hqq", objective="frobenius"),
    "fisher-hqq": dict(configs="paper", quantizer="hqq", objective="fisher"),
    "fisher-wls": dict(configs="paper", quantizer="wls", objective="fisher"),
    "fisher-wls-all": dict(configs="all", quantizer="wls", objective="fisher"),
    # one config per matrix, or per row block of 4 / 8 (rows sorted by importance; --row-blocks)
    "fisher-wls-all-rows1": dict(configs="all", quantizer="wls", objective="fisher", row_blocks=1),
    "fisher-wls-all-rows4": dict(configs="all", quantizer="wls", objective="fisher", row_blocks=4),
    "fisher-wls-all-rows8": dict(configs="all", quantizer="wls", objective="fisher", row_blocks=8),
    "fisher-wls-all-o": dict(configs="all,b3g64+o0.25%,b3g64+o0.5%,b4g64+o0.25%,b4g64+o0.5%,b2g32+o0.5%,b3g32+o0.5%",
                             quantizer="wls", objective="fisher", outlier_mode="error"),
    "fisher-wls-all+lut": dict(configs="all+lut", quantizer="wls", objective="fisher"),
    "fisher-gptq-all": dict(configs="all", quantizer="gptq", objective="fisher"),
    "fisher-wls-all-rotate": dict(configs="all", quantizer="wls", objective="fisher", rotate=True),
    "fisher-gptq-all-rotate": dict(configs="all", quantizer="gptq", objective="fisher", rotate=True),
    "output-wls-all": dict(configs="all", quantizer="wls", objective="output"),
    "frob-wls-all": dict(configs="all", quantizer="wls", objective="frobenius"),
    "uniform-b4g32-hqq": dict(configs="b4g32", quantizer="hqq", objective="frobenius", uniform=True),
    "uniform-b4g64-hqq": dict(configs="b4g64", quantizer="hqq", objective="frobenius", uniform=True),
    "uniform-b3g32-hqq": dict(configs="b3g32", quantizer="hqq", objective="frobenius", uniform=True),
    "uniform-b4g32-wls": dict(configs="b4g32", quantizer="wls", objective="frobenius", uniform=True),
    "fp16": dict(configs="fp16", quantizer="hqq", objective="frobenius", uniform=True),
}


def wikitext() -> str:
    return (fixtures.DATA_DIR / "wikitext2-test.txt").read_text(encoding="utf-8")


def perplexity(mxq_path, text, ctx, chunks) -> float:
    with mxq.load(mxq_path, cache_dequantized=True) as model:
        return runtime_perplexity(model, model.tokenizer.encode(text), ctx=ctx, max_chunks=chunks,
                                  progress=False)["ppl"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--methods", default="paper,fisher-wls,fisher-wls-all,uniform-b4g32-hqq,uniform-b4g64-hqq")
    parser.add_argument("--budgets", default="3.5,4.25,5.5")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--out", default="quality_sweep")
    parser.add_argument("--cache-dir", default="default", help="mxq's error/calibration cache root")
    args = parser.parse_args()
    hf_dir = fixtures.ensure(args.fixture)
    text = wikitext()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            options = dict(METHODS[method]) if method == "default" else {**BASE, **METHODS[method]}
            uniform = options.pop("uniform", False)
            budgets = [16.0] if uniform else [float(b) for b in args.budgets.split(",")]
            for bpw in budgets:
                out = Path(tmp) / "m.mxq"
                started = time.perf_counter()
                report = convert(hf_dir, out, bpw=bpw, cache_dir=args.cache_dir, **options)
                convert_seconds = time.perf_counter() - started
                started = time.perf_counter()
                ppl = perplexity(out, text, args.ctx, args.chunks)
                row = {"method": method, "budget_bpw": "" if uniform else bpw, "achieved_bpw": round(report.achieved_bpw, 4),
                       "ppl": round(ppl, 4), "ctx": args.ctx, "chunks": args.chunks,
                       "calibrate_s": round(report.seconds.get("calibrate", 0.0), 1),
                       "measure_s": round(report.seconds["measure"], 1), "convert_s": round(convert_seconds, 1),
                       "eval_s": round(time.perf_counter() - started, 1), "configs": report.config_counts}
                rows.append(row)
                print(f"{method:<22} bpw {row['achieved_bpw']:6.3f}  ppl {ppl:8.3f}  (ctx {args.ctx}, "
                      f"{args.chunks} chunks; convert {convert_seconds:.0f}s, eval {row['eval_s']:.0f}s)", flush=True)
    out_csv = Path(args.out).with_suffix(".csv")
    with open(out_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, Path(args.out).with_suffix(".png"), args)
    print(f"wrote {out_csv} and {Path(args.out).with_suffix('.png')}")


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    fig, ax = plt.subplots(figsize=(9, 6))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["achieved_bpw"], r["ppl"]) for r in rows if r["method"] == method)
        if method == "fp16":  # the unquantized reference: a line, so the plot keeps its 2–9 bpw range
            ax.axhline(points[0][1], color="gray", linestyle="--", label=f"fp16 ({points[0][1]:.2f})")
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=method)
        for x, y in points:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("bits per weight over decoder linears (everything stored)")
    ax.set_ylabel(f"WikiText-2 perplexity (ctx {args.ctx}, first {args.chunks} chunks)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"{args.fixture}: perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
