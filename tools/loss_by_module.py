"""Where does a quantized file lose its perplexity? Each group of decoder linears (one module type in
every layer; three consecutive layers) is restored to the float checkpoint's weights in turn, and the
share it recovers of the log-perplexity gap between the file and the file with every decoder linear
restored is printed (embeddings and norms stay as the file stores them).

    python tools/loss_by_module.py FILE.mxq [--fixture smollm2] [--chunks 6] [--ctx 1024] [--skip 40]

The file is exported with `mxq export-hf` and run with transformers (a dev dependency). A file
converted with --rotate or --input-scaling (the default) computes with transformed weights and norms,
so a restored linear is the float weight as the converter transformed it: the checkpoint is read and
transformed by the converter's own code with the options the file's provenance records (the
calibration statistics come from the cache, or are computed again). The text is WikiText-2's
test split from chunk `--skip` on (the README's quality table reads the first 16 chunks of 2,048).
Shares of single groups add up to about 100% when the groups' errors act independently.

    python tools/loss_by_module.py FILE.mxq --salient 0.0001,0.001,0.01

instead restores the weights of largest Fisher-weighted error F·(w − ŵ)² (the calibration's Fisher, over
all decoder linears together), the given fractions of them, as a sparse set of float outliers would
(SqueezeLLM's dense-and-sparse split).
"""
import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from mxq.runtime.export_hf import export_hf  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = fixtures.DATA_DIR / "wikitext2-test.txt"


def converted_source(float_dir, path):
    """(options, checkpoint, checkpoint hash, calibration) as the converter had them when it wrote the file at
    `path`: its provenance's options (`configs` the list of candidate labels), the checkpoint rotated and
    input-scaled as they say (converter/pipeline.py), and its calibration (from the cache, or computed again)."""
    from dataclasses import fields

    from mxq.converter.measure import default_cache_dir
    from mxq.converter.options import ConvertOptions
    from mxq.converter.pipeline import _calibrated, read_source
    from mxq.format_spec.reader import MxqFile

    with MxqFile.open(path) as f:
        recorded = f.document["provenance"]["options"]
    options = ConvertOptions(**{k.name: recorded[k.name] for k in fields(ConvertOptions) if k.name in recorded})
    checkpoint = read_source(float_dir, options)[0]
    cache_dir = default_cache_dir()
    checkpoint, checkpoint_hash, calibration, _ = _calibrated(
        checkpoint, checkpoint.content_hash(cache_dir), options, cache_dir, None)
    return options, checkpoint, checkpoint_hash, calibration


def converted_weights(float_dir, path) -> tuple[dict, dict]:
    """name -> the float weight (out, in) of every decoder linear as the converter quantized it: the
    checkpoint rotated and input-scaled as the file's provenance says (converter/pipeline.py); and
    name -> the calibration's Fisher (out, in) of that weight, transformed alike."""
    _, checkpoint, _, calibration = converted_source(float_dir, path)
    names = [name for name in checkpoint.tensors if checkpoint.tensors[name].role == "linear"]
    return ({name: torch.as_tensor(checkpoint.load(name)) for name in names},
            {name: torch.as_tensor(calibration.fisher[name]) for name in names})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--skip", type=int, default=40, help="chunks of --ctx tokens skipped at the text's start")
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--salient", help="comma-separated fractions of all decoder-linear weights: restore those "
                                          "of largest F·(w − ŵ)² instead of whole groups")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    float_dir = fixtures.ensure(args.fixture)
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.file, Path(tmp) / "hf")
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    chunks = [ids[(args.skip + i) * args.ctx:(args.skip + i + 1) * args.ctx][None] for i in range(args.chunks)]

    def perplexity() -> float:
        with torch.no_grad():
            return math.exp(sum(model(x, labels=x).loss.item() for x in chunks) / len(chunks))

    floats, fisher = converted_weights(float_dir, args.file)
    params = dict(model.named_parameters())
    stored = {name: params[name].detach().clone() for name in floats}

    def restored_perplexity(names) -> float:  # the file's perplexity with these linears' float weights
        with torch.no_grad():
            for n in names:
                params[n].copy_(floats[n])
            try:
                return perplexity()
            finally:
                for n in names:
                    params[n].copy_(stored[n])

    float_ppl, quantized_ppl = restored_perplexity(list(floats)), perplexity()
    gap = math.log(quantized_ppl) - math.log(float_ppl)
    print(f"{Path(args.file).name}: ppl {quantized_ppl:.3f}, all linears restored {float_ppl:.3f} "
          f"({args.chunks} chunks of {args.ctx} from chunk {args.skip})")
    if args.salient:
        salient(args, floats, fisher, params, perplexity, quantized_ppl, gap)
        return
    n_layers = model.config.num_hidden_layers
    groups = [(m, lambda n, m=m: f".{m}." in n) for m in MODULES]
    groups += [(f"layers {a}-{min(a + 2, n_layers - 1)}",
                lambda n, a=a: a <= int(re.search(r"layers\.(\d+)\.", n).group(1)) < a + 3)
               for a in range(0, n_layers, 3)]
    for label, member in groups:
        ppl = restored_perplexity([n for n in floats if member(n)])
        share = 100 * (math.log(quantized_ppl) - math.log(ppl)) / gap if gap else 0.0
        print(f"  {label:14s} restored: ppl {ppl:8.3f}  recovers {share:5.1f}% of the gap", flush=True)


def salient(args, floats, fisher, params, perplexity, quantized_ppl, gap):
    """Restore the top fractions of weights by F·(w − ŵ)², ranked over all decoder linears together."""
    scores = {n: fisher[n] * (floats[n] - params[n].detach()) ** 2 for n in floats}  # (out, in) each
    everything = torch.cat([s.flatten() for s in scores.values()])
    for fraction in (float(f) for f in args.salient.split(",")):
        k = max(1, round(fraction * everything.numel()))
        threshold = torch.topk(everything, k).values[-1]
        masks = {n: s >= threshold for n, s in scores.items()}
        stored = {n: params[n].detach().clone() for n in floats}
        with torch.no_grad():
            for n, mask in masks.items():
                params[n][mask] = floats[n][mask]
            try:
                ppl = perplexity()
            finally:
                for n in floats:
                    params[n].copy_(stored[n])
        share = 100 * (math.log(quantized_ppl) - math.log(ppl)) / gap if gap else 0.0
        top = sorted(masks, key=lambda n: -int(masks[n].sum()))[:3]
        print(f"  top {100 * fraction:g}% ({k:,} weights) restored: ppl {ppl:8.3f}  recovers {share:5.1f}% of the gap"
              f"  (most in {', '.join(top)})", flush=True)


if __name__ == "__main__":
    main()
