"""Would tuning a quantized file's norm weights help? End-to-end "norm tweaking": the file's RMSNorm weights
(fp16, outside the byte budget, so free to change) are trained with Adam to minimise KL(fp ‖ quantized) of the
next-token distributions on the calibration chunks, every quantized matrix fixed. Then runtime.perplexity (what
`mxq eval --reference` runs) scores the evaluation text with the tuned model against the file as it is.

    python tools/norm_tweak_check.py FILE.mxq CHECKPOINT [--calib TEXT] [--calib-tokens 8192] [--epochs 3]
        [--lr 1e-3] [--text ../shared/data/wikitext2-test.txt] [--max-chunks 16]

CHECKPOINT is the HF directory FILE was converted from (the fp teacher). Prints the calibration KL per epoch
and the perplexity before / after with the ratio's 95% interval from the paired per-chunk differences (as
`mxq eval --reference` computes it). The forward pass is the runtime's own Model on the converter's
TorchBackend, with every matrix dequantized once (float32); "before" reproduces `mxq eval`'s number.
"""
import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mxq.converter.calibrate import calibration_chunks, default_text
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.errors import ConversionError
from mxq.converter.torch_backend import TorchBackend
from mxq.format_spec import MxqFile, dequantize
from mxq.runtime.config import ModelConfig
from mxq.runtime.model import Model, checked_tensors
from mxq.runtime.perplexity import perplexity
from mxq.runtime.tokenizer import Tokenizer


def file_model(f: MxqFile, path: str) -> Model:
    """The file's model on TorchBackend, every matrix dequantized to float32 (out, in)."""
    def make(name, entry):
        blobs = f.blobs(name)
        if len(entry.shape) == 1:
            return torch.from_numpy(blobs["data"].astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(dequantize(blobs, entry.shape, entry.config), np.float32))
    return Model(ModelConfig.from_json(f.model), TorchBackend(), checked_tensors(f.tensors, path, ConversionError, make))


def checkpoint_model(checkpoint) -> Model:
    return Model(checkpoint.config, TorchBackend(),
                 checked_tensors(checkpoint.tensors, checkpoint.path, ConversionError, lambda name, _: checkpoint.load(name)))


def norm_weights(model: Model) -> list:
    """Every RMSNorm weight the model holds: the per-layer norms its family's contract lists, and the final norm."""
    keys = [spec.key for spec in model.config.family.layer_tensors if spec.role == "norm"]
    weights = [getattr(layer, key) for layer in model.layers for key in keys if getattr(layer, key) is not None]
    return weights + [model.norm]


def hidden(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (T, hidden) of one sequence from position 0, differentiable."""
    return model.hidden_states(ids.numpy(), model.new_cache(len(ids)))


def kl(model: Model, h, teacher: Model, h_ref) -> torch.Tensor:
    """Mean KL(teacher ‖ model) per position of the next-token distributions."""
    lq = torch.log_softmax(model.head(h), -1)
    lp = torch.log_softmax(teacher.head(h_ref), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def evaluated(model: Model) -> SimpleNamespace:
    """What runtime.perplexity needs of a loaded model."""
    return SimpleNamespace(model=model, backend=model.backend, context_length=model.config.max_position_embeddings)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("checkpoint")
    parser.add_argument("--calib", help="calibration text file (default: the packaged Botchan excerpt)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4, help="calibration chunks per Adam step")
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/wikitext2-test.txt"))
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--max-chunks", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    checkpoint = read_checkpoint(args.checkpoint)
    teacher = checkpoint_model(checkpoint)
    with MxqFile.open(args.file) as f:  # the model to tune, the file as it is, its tokenizer (as `mxq eval` encodes)
        model, untouched = file_model(f, args.file), file_model(f, args.file)
        ids = Tokenizer.from_file(f, model.config).encode(Path(args.text).read_text(encoding="utf-8"))
    text = Path(args.calib).read_text(encoding="utf-8") if args.calib else default_text()
    chunks = calibration_chunks(checkpoint, text, args.calib_tokens)  # (C, 256)
    with torch.no_grad():
        reference = [hidden(teacher, chunk) for chunk in chunks]
    params = norm_weights(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    print(f"{len(params)} norm weights, {sum(p.numel() for p in params):,} values; {len(chunks)} calibration chunks "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for epoch in range(args.epochs):
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for b in range(0, len(chunks), args.batch):
            optimizer.zero_grad()
            batch = order[b:b + args.batch]
            for c in batch:
                loss = kl(model, hidden(model, chunks[c]), teacher, reference[c]) / len(batch)
                loss.backward()
                total += float(loss.detach()) * len(batch)
            optimizer.step()
        print(f"epoch {epoch + 1}: calibration KL {total / len(chunks):.5f} nats/token "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    moved = max(float((p.detach() - q).norm() / q.norm()) for p, q in zip(params, norm_weights(untouched)))
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        report = perplexity(evaluated(model), ids, ctx=args.ctx, max_chunks=args.max_chunks, progress=False,
                            reference=evaluated(untouched))
    low, high = report["ppl_ratio_95"] or (math.nan, math.nan)
    result = {"before": report["reference"]["ppl"], "after": report["ppl"], "ratio": report["ppl_ratio"],
              "ratio_95": (low, high)}
    print(f"largest relative change of a norm weight: {moved:.3f}")
    print(f"perplexity before {result['before']:.3f}, after {result['after']:.3f}; ratio {result['ratio']:.4f} "
          f"(95%: {low:.4f}–{high:.4f}); {report['chunks']} chunks of {args.ctx} ({time.perf_counter() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
