"""Does GPTQ's compensation carry over to text it was not fitted to, and how does that depend on the
number of calibration tokens and on the dampening? (converter/gptq.py's DAMP was chosen with this.)

    python tools/gptq_held_out.py [--fixture smollm2] [--layers 3,15,25] [--configs b2g32,b3g64]
                                  [--fit-tokens 4096,8192,16384,32768] [--damps 0.01,0.1,1] [--held-tokens 12288]

The checkpoint and importances are the default conversion's (input scaling applied, Fisher importance
from the cached calibration, computed if absent). The calibration text (botchan.txt from ../shared/data,
or --text) runs through the fp model layer by layer; for each chosen layer's linears and configs it
prints GPTQ's output error tr(ΔW H ΔWᵀ) over wls's on the same stored grid, where GPTQ compensates with
the Hessian of the text's first N tokens (for each N in --fit-tokens) at each dampening and H is the
Hessian of the text's last --held-tokens tokens. Below 1: compensation helps on unseen text of the same
kind. (Across kinds of text, measure perplexity: `mxq eval --text`.)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from gptq_proxy_check import output_error  # noqa: E402  tr(ΔW H ΔWᵀ)
from mxq.converter import pipeline  # noqa: E402
from mxq.converter.calibrate import CHUNK_TOKENS, LayerStream, text_chunks  # noqa: E402
from mxq.converter.candidates import parse_candidates  # noqa: E402
from mxq.converter.checkpoint import read_checkpoint  # noqa: E402
from mxq.converter.gptq import compensated_blobs  # noqa: E402
from mxq.converter.measure import default_cache_dir  # noqa: E402
from mxq.converter.options import ConvertOptions  # noqa: E402
from mxq.converter.quantize import quantize  # noqa: E402
from mxq.format_spec import dequantize  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "botchan.txt"


class ChunkHessians:
    """on_linear callback: Σ xᵀx per linear input, kept per chunk label (`current`)."""

    def __init__(self):
        self.current, self.of = None, {}

    def __call__(self, name, x):
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        per = self.of.setdefault(name, {})
        if self.current not in per:
            per[self.current] = torch.zeros(flat.shape[1], flat.shape[1])
        per[self.current].addmm_(flat.T, flat)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--text", default=str(DATA))
    parser.add_argument("--layers", default="3,15,25")
    parser.add_argument("--configs", default="b2g32,b3g64")
    parser.add_argument("--fit-tokens", default="4096,8192,16384,32768")
    parser.add_argument("--damps", default="0.01,0.1,1")
    parser.add_argument("--held-tokens", type=int, default=12288)
    args = parser.parse_args()
    fits = sorted(int(n) // CHUNK_TOKENS for n in args.fit_tokens.split(","))
    damps = [float(d) for d in args.damps.split(",")]
    layers = sorted(int(i) for i in args.layers.split(","))
    candidates = parse_candidates(args.configs)

    checkpoint = read_checkpoint(fixtures.ensure(args.fixture))
    cache = str(default_cache_dir())
    options = ConvertOptions(bpw=4.25)  # the default method's calibration, input scaling and objective
    checkpoint, _, calibration, _ = pipeline._calibrated(checkpoint, checkpoint.content_hash(cache), options, cache, None)
    chunks = text_chunks(checkpoint, Path(args.text).read_text(encoding="utf-8"))
    held = args.held_tokens // CHUNK_TOKENS
    if fits[-1] + held > len(chunks):
        sys.exit(f"{args.text}: {len(chunks)} chunks of {CHUNK_TOKENS} tokens, {fits[-1] + held} needed")
    picked = list(range(fits[-1])) + list(range(len(chunks) - held, len(chunks)))

    hessians = ChunkHessians()
    stream = LayerStream(checkpoint, hessians)
    print(f"gptq / wls output error on the last {held * CHUNK_TOKENS} tokens; columns: fit tokens / dampening")
    with torch.no_grad():
        x = torch.stack([stream.model.embed(chunks[c].numpy()) for c in picked])  # (C, T, hidden)
        for i in range(layers[-1] + 1):
            linears = stream.load_layer(i, trainable=False)
            stream.recording = i in layers
            outputs = []
            for n, c in enumerate(picked):
                hessians.current = n if n < fits[-1] else "held"
                outputs.append(stream.block(i, x[n]))
            x = torch.stack(outputs)
            stream.recording = False
            for name, weight in linears.items() if i in layers else ():
                per = hessians.of[name]
                fitted, total = {}, torch.zeros_like(per["held"])
                for n in range(fits[-1]):
                    total += per[n]
                    if n + 1 in fits:
                        fitted[n + 1] = total.clone()
                importance = calibration.fisher[name]  # (out, in), read once per matrix
                for candidate in candidates:
                    config = candidate.storage(weight.shape)
                    plain = quantize(weight, config, "wls", importance=importance).blobs
                    wls = output_error(weight, torch.from_numpy(dequantize(plain, weight.shape, config)), per["held"])
                    cells = []
                    for n in fits:
                        for damp in damps:
                            _, stored = compensated_blobs(weight, fitted[n], config, importance, damp=damp)
                            cells.append(f"{n * CHUNK_TOKENS // 1024}k/{damp:g} {output_error(weight, stored, per['held']) / wls:.3f}")
                    print(f"{name:40s} {candidate.label:7s} " + "  ".join(cells), flush=True)
            hessians.of.clear()
            stream.free_layer(i)


if __name__ == "__main__":
    main()
