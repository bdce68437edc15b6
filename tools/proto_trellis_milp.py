"""Trellis candidates inside the MILP, simulated before any format work: does a mixed file that may store
each row block as a bitshift trellis (tools/proto_trellis.py) beside the affine configs beat the default at
the same bytes?

For each K in --K, one table of 2^L levels is fitted (weighted Lloyd passes on --train-layers), every decoder
linear is coded row by row (Viterbi; a row's error does not depend on the other rows, so a row block's error
is the sum over its rows), and each row block of the file's error table gains one candidate per K with its
exact Fisher error and its bits:

    rows × (K·in + (L − K) + 16 + SCALE_BITS·in/GROUP)   (codes, the first window, the row's fp16 maximum,
                                                           a 6-bit scale per group), in whole bytes

The MILP is solved at each --bpw twice, over the file's own candidates and with the trellis ones added,
at the budget the converter uses; each solution's weights (affine blocks rounded by wls as the write stage
rounds them, trellis blocks decoded) are put into the file's `export-hf` copy and scored on WikiText-2's
first --chunks chunks of --ctx tokens with transformers. The two are paired: same text, same embedding
and norms, same rounding of the affine blocks; the ratio's 95% interval treats each chunk as one sample,
as `mxq eval --reference` does. Trellis blocks decode with the table rounded to fp16, as a file would
store it.

    python tools/proto_trellis_milp.py FILE.mxq [--bpw 4.25,5.0] [--K 2,3,4,5] [--L 12] [--chunks 16]
                                                [--work DIR] [--sample-every 8] [--code fitted|1mad]

--sample-every 8 estimates the trellis blocks' errors from 1 row in 8, as the converter's measurement samples
the affine configs: the cost a converter would pay to offer trellis candidates (the rows are coded
independently, so a sampled row's error is its error in the full coding); the blocks the MILP chooses are then
coded in full. --code 1mad replaces the fitted table by levels computed from the window (QTIP's 1MAD code),
which a decode kernel can compute with a few integer operations instead of a table load per weight.

FILE: a file converted from the fixture with --row-blocks (the default); its provenance gives the options.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from loss_by_module import converted_source  # noqa: E402
from proto_trellis import GROUP, SCALE_BITS, fit_table, trellis  # noqa: E402

from mxq.converter.allocate import allocate  # noqa: E402
from mxq.converter.candidates import parse_candidates  # noqa: E402
from mxq.converter.measure import (MIN_BLOCK_SAMPLE_ROWS, ErrorCache, default_cache_dir, estimate,  # noqa: E402
                                   group_spread, measure, sample_rows)
from mxq.converter.options import measured_with  # noqa: E402
from mxq.converter.pipeline import _importance_id  # noqa: E402
from mxq.converter.quantize import _quantize  # noqa: E402
from mxq.converter.row_blocks import RowSplit, row_order  # noqa: E402
from mxq.format_spec.layout import row_order_dtype  # noqa: E402
from mxq.runtime.perplexity import Z95, paired_difference  # noqa: E402

TEXT = fixtures.DATA_DIR / "wikitext2-test.txt"


def one_mad(L):
    """(2^L,) levels computed from each window (QTIP's 1MAD code: an LCG step, then the sum of its four bytes,
    which is near Gaussian; unit variance), what --code 1mad codes with: a decode kernel could compute a level
    with a few integer operations instead of a table load per weight."""
    v = (np.arange(1 << L, dtype=np.uint64) * np.uint64(34038481) + np.uint64(76625530)) & np.uint64(0xFFFFFFFF)
    return (sum((v >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)).astype(np.float64) - 510.0) / 147.800537


class Coded:
    """One K's codes of every linear, coded row by row on demand (rows are coded independently)."""

    def __init__(self, levels, matrices, L, K):
        self.levels, self.matrices, self.L, self.K = levels, matrices, L, K
        self.windows, self.scales, self.done = {}, {}, {}

    def load(self, n, windows, scales):
        self.windows[n], self.scales[n], self.done[n] = windows, scales, np.ones(len(windows), bool)

    def rows(self, n, rows):
        w, f = self.matrices(n)
        if n not in self.windows:
            self.windows[n] = np.zeros(w.shape, np.uint16)
            self.scales[n] = np.zeros((w.shape[0], -(-w.shape[1] // GROUP)), np.float32)
            self.done[n] = np.zeros(w.shape[0], bool)
        todo = rows[~self.done[n][rows]]
        if len(todo):
            windows, scales = trellis(w[todo], f[todo], self.levels, self.L, self.K)
            self.windows[n][todo], self.scales[n][todo] = windows, scales[:, ::GROUP]
            self.done[n][todo] = True
        return w[rows], f[rows]

    def decoded(self, n, rows):
        self.rows(n, rows)
        return np.repeat(self.scales[n][rows].astype(np.float64), GROUP, axis=1) * self.levels[self.windows[n][rows]]

    def row_errors(self, n, rows):
        w, f = self.rows(n, rows)
        return (f * (w - self.decoded(n, rows)) ** 2).sum(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--bpw", default="4.25,5.0")
    parser.add_argument("--K", default="2,3,4,5", help="trellis bits per weight offered as candidates")
    parser.add_argument("--L", type=int, default=12)
    parser.add_argument("--train-layers", default="14")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--work", default=None, help="directory keeping each K's codes between runs")
    parser.add_argument("--code", choices=("fitted", "1mad"), default="fitted",
                        help="the levels: a table fitted by weighted Lloyd passes, or computed from the window "
                             "(QTIP's 1MAD)")
    parser.add_argument("--sample-every", type=int, default=1,
                        help="the MILP's trellis errors estimated from 1 row in this many, as measure.py samples "
                             "affine configs (the chosen blocks are still decoded from every row's codes)")
    args = parser.parse_args()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    float_dir = fixtures.ensure(args.fixture)
    options, checkpoint, checkpoint_hash, calibration = converted_source(float_dir, args.file)
    candidates = parse_candidates(",".join(options.configs))
    cache_dir = default_cache_dir()
    table = measure(checkpoint, candidates, measured_with(options.quantizer),
                    ErrorCache(Path(cache_dir) / "errors", checkpoint_hash), None,
                    calibration.fisher.__getitem__, _importance_id(options, calibration), options.outlier_mode,
                    options.measure_every, row_blocks=options.row_blocks, codebooks={})
    names = list(dict.fromkeys(table.names))
    first_unit = {n: table.names.index(n) for n in names}
    weight = lambda n: torch.as_tensor(checkpoint.load(n))  # noqa: E731
    fisher = lambda n: torch.as_tensor(calibration.fisher[n])  # noqa: E731
    as64 = lambda n: (weight(n).numpy().astype(np.float64), fisher(n).numpy().astype(np.float64))  # noqa: E731
    splits = {}
    for n in names:
        counts = table.unit(first_unit[n])[1] or (weight(n).shape[0],)
        splits[n] = RowSplit(row_order(weight(n), fisher(n)), counts)

    layer = lambda n: int(n.split("layers.")[1].split(".")[0])  # noqa: E731
    train = [n for n in names if layer(n) in {int(x) for x in args.train_layers.split(",")}]
    Ks = [int(k) for k in args.K.split(",")]
    work = Path(args.work) if args.work else None
    codes = {}  # K -> Coded
    extra_err, extra_cost = [], []
    for K in Ks:
        saved = work / f"trellis-L{args.L}-K{K}-{args.code}.npz" if work else None
        if saved and saved.exists():
            data = np.load(saved)
            coded = Coded(data["table"], as64, args.L, K)
            for n in names:
                coded.load(n, data[f"w/{n}"], data[f"s/{n}"])
            print(f"K{K}: codes from {saved}", flush=True)
        else:
            if args.code == "fitted":
                print(f"K{K}: fitting the table on layers {args.train_layers}", flush=True)
                levels = fit_table(as64, train, args.L, K, args.passes)
            else:  # a level computed from the window: QTIP's 1MAD
                levels = one_mad(args.L)
            coded = Coded(levels, as64, args.L, K)
            if args.sample_every == 1:
                started = time.time()
                for n in names:
                    coded.rows(n, np.arange(weight(n).shape[0]))
                print(f"K{K}: coded every linear in {time.time() - started:.0f} s", flush=True)
                if saved:
                    work.mkdir(parents=True, exist_ok=True)
                    np.savez(saved, table=coded.levels, **{f"w/{n}": coded.windows[n] for n in names},
                             **{f"s/{n}": coded.scales[n] for n in names})
        coded.levels = coded.levels.astype(np.float16).astype(np.float64)  # as a file would store the table
        codes[K] = coded
        err, cost = np.zeros(len(table.names)), np.zeros(len(table.names), dtype=np.int64)
        started = time.time()
        for n in names:
            w, f = as64(n)
            split, i0 = splits[n], first_unit[n]
            out, cols = w.shape
            proxy = group_spread(torch.as_tensor(w), torch.as_tensor(f), GROUP)[0] if args.sample_every > 1 else None
            for b, count in enumerate(split.counts):
                rows = split.rows(b)
                subset = sample_rows(count, args.sample_every, MIN_BLOCK_SAMPLE_ROWS)
                if subset is None:
                    err[i0 + b] = coded.row_errors(n, rows).sum()
                else:  # the ratio estimate measure.py makes of a sampled affine config
                    row_err = coded.row_errors(n, rows[subset.numpy()])
                    err[i0 + b] = estimate(row_err, proxy[rows], subset.numpy())[0]
                bits = count * (K * cols + (args.L - K) + 16 + SCALE_BITS * cols // GROUP)
                cost[i0 + b] = (bits + 7) // 8 + (out * np.dtype(row_order_dtype(out)).itemsize
                                                 if b == 0 and len(split.counts) > 1 else 0)
        print(f"K{K}: errors in {time.time() - started:.0f} s", flush=True)
        extra_err.append(err)
        extra_cost.append(cost)
        bits = 8 * cost.sum() / table.numel.sum()
        affine_bits = 8 * table.costs.sum(0) / table.numel.sum()
        near = int(np.argmin(np.abs(affine_bits - bits)))  # the affine candidate nearest in bits, stored uniformly
        print(f"K{K}: Σ Fisher error {err.sum():.4g} at {bits:.3f} bits per weight; uniform {candidates[near].label}: "
              f"{table.weighted[:, near].sum():.4g} at {affine_bits[near]:.3f}", flush=True)

    costs = np.concatenate([table.costs, np.stack(extra_cost, 1)], 1)
    errors = np.concatenate([table.weighted, np.stack(extra_err, 1)], 1)
    labels = [c.label for c in candidates] + [f"trellis-K{K}" for K in Ks]
    model, chunks, params = hf_model(args, float_dir, names)

    def chunk_nll() -> np.ndarray:
        with torch.no_grad():
            return np.array([model(x, labels=x).loss.item() for x in chunks])

    def load(choice):
        for n in names:
            w = weight(n)
            f = fisher(n)
            split, i0 = splits[n], first_unit[n]
            out = torch.empty_like(w)
            for b in range(len(split.counts)):
                rows, c = split.rows(b), int(choice[i0 + b])
                if c < len(candidates):
                    config = candidates[c].storage((len(rows), w.shape[1]))
                    q = _quantize(w[rows], config, "wls", False, f[rows], None, keep_residual=True)
                    out[rows] = w[rows] - q.residual
                else:  # the chosen block's rows coded in full (as the write stage would code them)
                    out[rows] = torch.as_tensor(codes[Ks[c - len(candidates)]].decoded(n, rows), dtype=torch.float32)
            with torch.no_grad():
                params[n].copy_(out)

    for bpw in (float(x) for x in args.bpw.split(",")):
        budget = int(math.floor(bpw * int(table.numel.sum()) / 8 + 1e-9))
        rows = np.arange(len(table.names))
        results = []
        for what, c, e in (("affine (the file's candidates)", table.costs, table.weighted),
                           ("affine + trellis", costs, errors)):
            started = time.time()
            choice = allocate(c, e, budget)
            solve = time.time() - started
            load(choice)
            nll = chunk_nll()
            ppl = math.exp(nll.mean())
            used = np.bincount(choice, minlength=len(labels))
            mix = ", ".join(f"{labels[j]} {used[j]}" for j in np.argsort(-used) if used[j])
            print(f"{bpw} bpw, {what}: ppl {ppl:.4f}, {8 * c[rows, choice].sum() / table.numel.sum():.4f} bpw, "
                  f"Σ Fisher error {e[rows, choice].sum():.4g}, solve {solve:.1f} s; units: {mix}", flush=True)
            results.append(nll)
        counts = [args.ctx - 1] * len(chunks)  # paired by chunk, as mxq eval --reference pairs them
        diff, se = paired_difference({"chunk_nll": list(results[1]), "chunk_tokens": counts},
                                     {"chunk_nll": list(results[0]), "chunk_tokens": counts})
        print(f"{bpw} bpw: trellis / affine perplexity {math.exp(diff):.4f} "
              f"(95%: {math.exp(diff - Z95 * se):.4f}–{math.exp(diff + Z95 * se):.4f})", flush=True)


def hf_model(args, float_dir, names):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxq.runtime.export_hf import export_hf

    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.file, Path(tmp) / "hf")
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[0]
    chunks = [ids[i * args.ctx:(i + 1) * args.ctx][None] for i in range(args.chunks)]
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise SystemExit(f"the export has no parameter {missing[0]!r}")
    return model, chunks, params


if __name__ == "__main__":
    main()
