"""A trellis-coded quantizer prototype (QTIP's bitshift trellis, Tseng et al. 2024), measured against an
affine config (b4g64m6 by default) with wls rounding at the calibration's Fisher weights — not a scheme
of the format.

Each row is one walk through a trellis of 2^L states: every weight shifts K new bits into an L-bit
window, and the window indexes a table of 2^L levels (one table for the whole model, fitted by
weighted Lloyd passes on the training layers' matrices); the weight is decoded as scale × table[window].
Viterbi picks, per row, the bit stream of least Fisher-weighted error; a positive scale per group of
64 weights is refitted by weighted least squares and stored in 6 bits under a per-row maximum. Rate:
K + (L − K)/in (the first window) + 6/64 (+ 16/in for the row's maximum) bits per weight.

    python tools/proto_trellis.py FILE.mxq [--L 12] [--K 4] [--baseline b4g64m6] [--layers 2,14,26]
    python tools/proto_trellis.py FILE.mxq --ppl      # + perplexity with every decoder linear so stored

FILE is a file converted from the fixture (its provenance says how the converter transformed the
weights and which calibration it used: tools/loss_by_module.py). `--ppl` prints the perplexity of the
file, of every decoder linear at trellis, and of every decoder linear at the uniform --baseline (wls), on the
text loss_by_module.py reads (WikiText-2, 6 chunks of 1,024 from chunk 40).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from loss_by_module import TEXT, converted_weights  # noqa: E402
from mxq.converter.quantize import _quantize, quantize  # noqa: E402
from mxq.format_spec.layout import StorageConfig, tensor_nbytes  # noqa: E402

GROUP = 64  # weights per scale
SCALE_BITS = 6


@numba.njit(cache=False)
def _viterbi_row(w, f, s, table, L, K, out):
    """The window sequence (n,) of least Σ f·(w − s·table[window])² along one row."""
    n, states, heads = len(w), 1 << L, 1 << K
    tails = 1 << (L - K)  # a window's high L−K bits are its predecessor's low ones
    cost = np.empty(states)
    best_tail = np.empty(tails)
    back = np.empty((n, tails), np.int16)  # the predecessor's top K bits, per (step, tail)
    for state in range(states):
        d = w[0] - s[0] * table[state]
        cost[state] = f[0] * d * d
    for t in range(1, n):
        for tail in range(tails):
            best, best_head = np.inf, 0
            for head in range(heads):
                c = cost[tail | (head << (L - K))]
                if c < best:
                    best, best_head = c, head
            best_tail[tail] = best
            back[t, tail] = best_head
        for state in range(states):
            d = w[t] - s[t] * table[state]
            cost[state] = best_tail[state >> K] + f[t] * d * d
    state = np.argmin(cost)
    out[n - 1] = state
    for t in range(n - 1, 0, -1):
        tail = state >> K
        state = tail | (back[t, tail] << (L - K))
        out[t - 1] = state


@numba.njit(parallel=True, cache=False)
def _viterbi(W, F, S, table, L, K):
    out = np.empty(W.shape, np.int32)
    for r in numba.prange(W.shape[0]):
        _viterbi_row(W[r], F[r], S[r], table, L, K, out[r])
    return out


def _group_scales(w, f, levels):
    """Positive least-squares scales per (row, group) of w ≈ s·levels, 6-bit under each row's maximum."""
    rows, n = w.shape
    num = (f * w * levels).reshape(rows, -1, GROUP).sum(-1)
    den = (f * levels * levels).reshape(rows, -1, GROUP).sum(-1)
    s = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0).clip(min=0.0)
    top = s.max(1, keepdims=True)
    top = np.where(top > 0, top, 1.0).astype(np.float16).astype(np.float64)
    step = top / (2 ** SCALE_BITS - 1)
    return (np.clip(np.round(s / step), 1, 2 ** SCALE_BITS - 1) * step)  # (rows, n / GROUP)


def trellis(w, f, table, L, K):
    """(windows (rows, n), scales per position (rows, n)) for one matrix; two Viterbi passes."""
    w, f = w.astype(np.float64), np.maximum(f.astype(np.float64), 1e-30)
    rms = math.sqrt(float(np.mean(table ** 2)))
    groups = w.reshape(len(w), -1, GROUP)
    fg = f.reshape(groups.shape)
    s = np.sqrt((fg * groups ** 2).sum(-1) / fg.sum(-1)) / rms  # (rows, groups): the weighted rms
    for _ in range(2):
        per_weight = np.repeat(s, GROUP, axis=1)
        windows = _viterbi(w, f, per_weight, table, L, K)
        s = _group_scales(w, f, table[windows])
    return windows, np.repeat(s, GROUP, axis=1)


def fisher_error(w, f, windows, scales, table) -> float:
    return float((f.astype(np.float64) * (w - scales * table[windows]) ** 2).sum())


def fit_table(matrices, train, L, K, passes):
    """(2^L,) levels of unit rms: QTIP's random Gaussian start, then `passes` weighted Lloyd passes over the
    matrices named in `train` (matrices(name) → (w, f) float64), each level the weighted mean of what it decodes."""
    table = np.random.default_rng(0).standard_normal(1 << L)
    for p in range(passes):
        started, num, den, error = time.time(), np.zeros_like(table), np.zeros_like(table), 0.0
        for w, f in (matrices(n) for n in train):
            windows, scales = trellis(w, f, table, L, K)
            error += fisher_error(w, f, windows, scales, table)
            np.add.at(num, windows.ravel(), (f * scales * w).ravel())
            np.add.at(den, windows.ravel(), (f * scales * scales).ravel())
        table = np.where(den > 0, num / np.where(den > 0, den, 1.0), table)
        table /= math.sqrt(float(np.mean(table ** 2)))
        print(f"  K{K} table pass {p}: training error {error:.4g} ({time.time() - started:.0f} s)", flush=True)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--L", type=int, default=12, help="window bits (2^L table levels)")
    parser.add_argument("--K", type=int, default=4, help="bits per weight")
    parser.add_argument("--train-layers", default="14", help="layers whose matrices fit the table")
    parser.add_argument("--passes", type=int, default=4, help="Lloyd passes fitting the table")
    parser.add_argument("--layers", default="2,14,26", help="layers whose matrices are compared")
    parser.add_argument("--baseline", default="b4g64m6", help="the affine config compared with (wls rounding)")
    parser.add_argument("--ppl", action="store_true", help="also: perplexity with every decoder linear at trellis")
    args = parser.parse_args()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    float_dir = fixtures.ensure(args.fixture)
    floats, fisher = converted_weights(float_dir, args.file)
    in_layers = lambda layers: [n for n in floats if int(n.split("layers.")[1].split(".")[0]) in layers]  # noqa: E731
    parse = lambda text: {int(x) for x in text.split(",")}  # noqa: E731
    matrices = {n: (floats[n].numpy().astype(np.float64), fisher[n].numpy().astype(np.float64)) for n in floats}

    table = fit_table(matrices.__getitem__, in_layers(parse(args.train_layers)), args.L, args.K, args.passes)

    baseline = StorageConfig.parse(args.baseline)
    totals = [0.0, 0.0, 0.0, 0.0]
    for n in in_layers(parse(args.layers)):
        w, f = matrices[n]
        windows, scales = trellis(w, f, table, args.L, args.K)
        ours = fisher_error(w, f, windows, scales, table)
        theirs = quantize(floats[n], baseline, "wls", pack=False, importance=fisher[n]).weighted_error
        rate = args.K + (args.L - args.K + 16) / w.shape[1] + SCALE_BITS / GROUP
        totals[0], totals[1], totals[2] = totals[0] + ours, totals[1] + theirs, totals[2] + rate * w.size
        totals[3] += 8 * tensor_nbytes(w.shape, baseline)
        print(f"  {n:40s} trellis/{args.baseline} {ours / theirs:.3f} at {rate:.3f} bits", flush=True)
    weights = sum(matrices[n][0].size for n in in_layers(parse(args.layers)))
    print(f"L{args.L} K{args.K}: Fisher error {totals[0] / totals[1]:.3f} of {args.baseline}'s "
          f"at {totals[2] / weights:.3f} bits per weight (against {totals[3] / weights:.4f})")
    if args.ppl:
        perplexities(args, float_dir, floats, fisher, matrices, table)


def perplexities(args, float_dir, floats, fisher, matrices, table):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxq.runtime.export_hf import export_hf

    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.file, Path(tmp) / "hf")
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    ids = tokenizer(Path(TEXT).read_text(), return_tensors="pt").input_ids[0]
    chunks = [ids[(40 + i) * 1024:(41 + i) * 1024][None] for i in range(6)]
    params = dict(model.named_parameters())

    def perplexity() -> float:
        with torch.no_grad():
            return math.exp(sum(model(x, labels=x).loss.item() for x in chunks) / len(chunks))

    print(f"{Path(args.file).name}: ppl {perplexity():.3f}", flush=True)
    baseline, started = StorageConfig.parse(args.baseline), time.time()
    with torch.no_grad():
        for n in floats:
            q = _quantize(floats[n], baseline, "wls", False, fisher[n], None, keep_residual=True)
            params[n].copy_(floats[n] - q.residual)
    print(f"every decoder linear {args.baseline} (wls): ppl {perplexity():.3f} ({time.time() - started:.0f} s)", flush=True)
    started = time.time()
    with torch.no_grad():
        for n in floats:
            w, f = matrices[n]
            windows, scales = trellis(w, f, table, args.L, args.K)
            params[n].copy_(torch.as_tensor(scales * table[windows], dtype=torch.float32))
    print(f"every decoder linear trellis L{args.L} K{args.K}: ppl {perplexity():.3f} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
