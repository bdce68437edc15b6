"""What storing matrices as `rows` (SPEC.md §8) costs the runtime: decode speed of a file against the same
file with every decoder matrix split into K row blocks, measured in one run.

    python tools/bench_rows.py MODEL.mxq [--blocks 4] [--tokens 64] [--threads 1] [--rounds 3]

The rows copy keeps each matrix's affine config for every block (RTN re-quantization of its dequantized
rows, in a random row order), so the two files read about the same bytes per token and the difference is
the per-product overhead (each block's own stack entry: its setup, its partial last tile, its output-row map). Each round decodes
`--tokens` tokens from both files (alternating, the machine may be shared); the report gives the median
ms/token of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rows_copy(path: Path, out: Path, n_blocks: int) -> Path:
    """`path` with every affine decoder matrix stored as n_blocks row blocks of its own config."""
    from test_runtime_files import rtn_affine

    from mxq.format_spec import MxqFile, MxqWriter, StorageConfig, TensorPlan, dequantize, join_blocks

    rng = np.random.default_rng(0)
    with MxqFile.open(path) as f:
        plans = []
        for name, entry in f.tensors.items():
            config = entry.config
            if entry.role == "linear" and config.scheme == "affine":
                out_features = entry.shape[0]
                counts = [len(part) for part in np.array_split(np.arange(out_features), n_blocks)]
                block = StorageConfig.affine(config.bits, config.group_size, 0, config.meta_bits)
                config = StorageConfig.rows([(count, block) for count in counts])
            plans.append(TensorPlan(name, entry.shape, config, entry.role))
        tokenizer = {key: value for key, value in f.tokenizer.items() if key != "blob"}
        with MxqWriter(out, model=f.model, tokenizer=tokenizer, tokenizer_data=f.tokenizer_data(), tensors=plans,
                       provenance=f.provenance) as writer:
            for plan in plans:
                blobs = f.blobs(plan.name)
                if plan.config.scheme == "rows":
                    entry = f.tensors[plan.name]
                    order = rng.permutation(entry.shape[0])
                    stored = dequantize(blobs, entry.shape, entry.config)[order]  # (out, in) in stored order
                    starts = np.cumsum([0, *plan.config.row_counts])
                    bits, group = entry.config.bits, entry.config.group_size
                    blobs = join_blocks(order, [rtn_affine(stored[a:b], bits, group) for a, b in zip(starts, starts[1:])])
                writer.write(plan.name, blobs)
    return out


def decode_ms(path: Path, tokens: int, threads: int) -> float:
    """ms per decoded token (greedy, after a 16-token prompt) of a fresh load."""
    from mxq.runtime.backends.numpy_backend import NumpyBackend
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.model import Model
    from mxq.format_spec import MxqFile

    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        backend = NumpyBackend(threads=threads)
        model = Model.from_file(f, config, backend)
        cache = model.new_cache(16 + tokens + 1)
        logits = backend.to_host(model.forward(list(range(1, 17)), cache, last_only=True))
        token = int(logits[-1].argmax())
        model.forward([token], cache)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = int(backend.to_host(model.forward([token], cache))[-1].argmax())
        seconds = time.perf_counter() - t0
        backend.close()
    return 1000 * seconds / tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mxq-bench-rows-") as tmp:
        rows = rows_copy(args.model, Path(tmp) / "rows.mxq", args.blocks)
        times = {"plain": [], "rows": []}
        for _ in range(args.rounds):
            for kind, path in (("plain", args.model), ("rows", rows)):
                times[kind].append(decode_ms(path, args.tokens, args.threads))
        plain, split = statistics.median(times["plain"]), statistics.median(times["rows"])
        print(f"{args.model.name}: plain {plain:.2f} ms/token, every decoder matrix as rows×{args.blocks} "
              f"{split:.2f} ms/token: ratio {split / plain:.3f} (+{split - plain:.2f} ms/token); "
              f"{args.rounds} rounds of {args.tokens} tokens, {args.threads} thread(s); file sizes "
              f"{args.model.stat().st_size:,} and {rows.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
