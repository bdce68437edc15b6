"""Does the MILP lose anything when --quantizer gptq measures its errors with wls (the proxy) and
compensates only at write time? The allocation depends on how each matrix's error changes from one
config to the next; if GPTQ scales every (matrix, config) error by about the same factor, the MILP
chooses the same configs it would choose from exact GPTQ errors.

    python tools/gptq_proxy_check.py [--fixture smollm2] [--layers 0,10,20] [--configs b2g64,b3g64,b4g64,b3g32]

For the chosen layers' linears and each config it prints the output error tr(ΔW H ΔWᵀ) (H = XᵀX of the
layer's calibration inputs through the fp model) of wls and of gptq rounding onto the same stored grid,
their ratio, and the spread of log-ratios (a spread near 0 means the proxy orders the choices as the
exact errors would); and the Spearman rank correlation between the proxy and exact errors of the
per-matrix *increments* from each config to the next cheaper one (what the MILP trades).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from mxq.converter.calibrate import LayerStream, calibration_chunks, default_text  # noqa: E402
from mxq.converter.candidates import parse_candidates  # noqa: E402
from mxq.converter.checkpoint import read_checkpoint  # noqa: E402
from mxq.converter.gptq import _Hessians, compensated_blobs  # noqa: E402
from mxq.converter.quantize import quantize  # noqa: E402
from mxq.format_spec import dequantize  # noqa: E402


def output_error(weight, stored, hessian):
    delta = (weight - stored).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", delta, hessian.to(torch.float64), delta))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--layers", default="0,10,20")
    parser.add_argument("--configs", default="b2g64,b3g64,b4g64,b3g32")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    checkpoint = read_checkpoint(fixtures.ensure(args.fixture))
    candidates = parse_candidates(args.configs)
    layers = sorted(int(i) for i in args.layers.split(","))
    hessians = _Hessians()
    stream = LayerStream(checkpoint, hessians)
    chunks = calibration_chunks(checkpoint, default_text(), args.tokens)
    rows = []  # (matrix, config, wls error, gptq error)
    with torch.no_grad():
        x = torch.stack([stream.model.embed(chunk.numpy()) for chunk in chunks])
        for i in range(layers[-1] + 1):
            linears = stream.load_layer(i, trainable=False)
            stream.recording = i in layers
            x = torch.stack([stream.block(i, x[c]) for c in range(len(x))])
            stream.recording = False
            if i in layers:
                for name, weight in linears.items():
                    for candidate in candidates:
                        config = candidate.storage(weight.shape)
                        plain = quantize(weight, config, "wls").blobs
                        wls = output_error(weight, torch.from_numpy(dequantize(plain, weight.shape, config)),
                                           hessians.of[name])
                        _, stored = compensated_blobs(weight, hessians.of[name], config)
                        rows.append((name, candidate.label, wls, output_error(weight, stored, hessians.of[name])))
                        print(f"{name:45s} {candidate.label:8s} wls {wls:12.4g} gptq {rows[-1][3]:12.4g} "
                              f"ratio {rows[-1][3] / wls:.3f}", flush=True)
            hessians.clear()
            stream.free_layer(i)
    ratios = np.array([g / w for _, _, w, g in rows])
    print(f"\ngptq/wls output error: median {np.median(ratios):.3f}, range {ratios.min():.3f}–{ratios.max():.3f}, "
          f"sd of log-ratio {np.log(ratios).std():.3f}")
    for label in dict.fromkeys(r[1] for r in rows):
        r = np.array([g / w for _, c, w, g in rows if c == label])
        print(f"  {label:8s} median ratio {np.median(r):.3f}")
    increments = []  # per matrix: error saved by each step up in config (what the MILP weighs against bytes)
    names = list(dict.fromkeys(r[0] for r in rows))
    for name in names:
        errs = [(w, g) for n, _, w, g in rows if n == name]
        errs.sort(key=lambda e: -e[0])
        increments += [(a[0] - b[0], a[1] - b[1]) for a, b in zip(errs, errs[1:])]
    proxy, exact = np.array(increments).T
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(proxy), rank(exact))[0, 1]
    print(f"Spearman rank correlation of the MILP's increments, wls proxy vs gptq exact: {rho:.3f} "
          f"({len(increments)} increments)")


if __name__ == "__main__":
    main()
