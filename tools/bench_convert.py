"""Conversion benchmark: seconds per stage, peak RSS, and the ratio to one single-config pass.

    python tools/bench_convert.py [--fixture smollm2] [--bpw 4.25] [--method default|paper] [--skip-synthetic]

Prints, for the fixture (fresh error cache, so measurement really runs):
  * seconds per stage (read, measure, solve, write), total, peak RSS of the conversion process;
  * re-conversion at another budget with the cached error matrix (seconds, peak RSS);
  * one single-config quantization pass (b4g64, same quantizer) over the same tensors, measured in the
    same run, and the ratio total conversion / single pass (the cost of measuring every candidate);
and peak RSS for two synthetic checkpoints whose largest tensor is the same but whose total size
differs 4×: peak memory must track the largest tensor, not the model.
Every process runs separately so its peak RSS is its own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402


def run_child(code: str) -> dict:
    """Run python code in a fresh process; it prints one JSON line; add its peak RSS (MiB)."""
    wrapper = code + textwrap.dedent("""
        import resource, json as _json
        RESULT["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(_json.dumps(RESULT))
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def conversion(hf_dir, out, cache, **options) -> dict:
    return run_child(textwrap.dedent(f"""
        from mxq.converter import convert
        report = convert({str(hf_dir)!r}, {str(out)!r}, cache_dir={str(cache)!r}, **{options!r})
        RESULT = {{"seconds": report.seconds, "file_bytes": report.file_bytes, "bpw": report.achieved_bpw}}
    """))


METHODS = {"default": {}, "paper": dict(configs="paper", quantizer="hqq", objective="frobenius")}


def single_pass(hf_dir, quantizer) -> dict:
    return run_child(textwrap.dedent(f"""
        import time
        from mxq.converter.checkpoint import read_checkpoint
        from mxq.converter.quantize import quantize
        from mxq.format_spec import StorageConfig
        checkpoint = read_checkpoint({str(hf_dir)!r})
        started = time.perf_counter()
        for info in checkpoint.linears:
            quantize(checkpoint.load(info.name), StorageConfig.affine(4, 64), {quantizer!r}, pack=False)
        RESULT = {{"seconds": time.perf_counter() - started}}
    """))


def synthetic_checkpoint(directory: Path, layers: int, hidden=1024, intermediate=2816, vocab=32000):
    """A random Llama checkpoint (float32); the embedding (vocab × hidden) is the largest tensor."""
    import numpy as np
    from safetensors.numpy import save_file
    from mxq.converter.checkpoint import expected_tensors
    from mxq.runtime.config import ModelConfig

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
              "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    tensors = {}  # the tensors the model contract lists for this config
    for name, (shape, role) in expected_tensors(ModelConfig.from_hf(config)).items():
        tensors[name] = (np.ones(shape, np.float32) if role == "norm"
                         else rng.standard_normal(shape, dtype=np.float32) * 0.02)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.model").write_bytes((fixtures.DATA_DIR / "llama2-tokenizer.model").read_bytes())
    return sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="smollm2")
    parser.add_argument("--bpw", type=float, default=4.25)
    parser.add_argument("--rebpw", type=float, default=3.5)
    parser.add_argument("--method", choices=list(METHODS), default="default",
                        help="default: mxq's defaults (calibrated Fisher, wls, all bit widths); paper: data-free MXQ")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    hf_dir = fixtures.ensure(args.fixture)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        method = METHODS[args.method]
        quantizer = method.get("quantizer", "wls")
        first = conversion(hf_dir, tmp / "a.mxq", tmp / "cache", bpw=args.bpw, **method)
        again = conversion(hf_dir, tmp / "b.mxq", tmp / "cache", bpw=args.rebpw, **method)
        base = single_pass(hf_dir, quantizer)
        print(f"fixture {args.fixture}: full conversion at --bpw {args.bpw}, method {args.method} (fresh cache)")
        for stage, seconds in first["seconds"].items():
            print(f"  {stage:<8} {seconds:8.2f} s")
        print(f"  peak RSS {first['peak_rss_mib']:8.0f} MiB   file {first['file_bytes'] / 2**20:.1f} MiB")
        print(f"re-conversion at --bpw {args.rebpw} with cached errors: {again['seconds']['total']:.2f} s, "
              f"peak RSS {again['peak_rss_mib']:.0f} MiB")
        print(f"single-config pass (b4g64 {quantizer} over the same {args.fixture} linears): {base['seconds']:.2f} s")
        print(f"ratio full conversion / single pass: {first['seconds']['total'] / base['seconds']:.2f}x")
        if args.skip_synthetic:
            return
        print("synthetic checkpoints (same largest tensor, 4x the layers): peak RSS of conversion")
        for layers in (4, 16):
            directory = tmp / f"synthetic{layers}"
            total, largest = synthetic_checkpoint(directory, layers)
            result = conversion(directory, tmp / f"s{layers}.mxq", tmp / "cache", bpw=4.0, configs="b4g64,b3g64")
            print(f"  {layers:2d} layers: checkpoint {total / 2**20:7.0f} MiB, largest tensor "
                  f"{largest / 2**20:5.0f} MiB, peak RSS {result['peak_rss_mib']:6.0f} MiB")
            (directory / "model.safetensors").unlink()


if __name__ == "__main__":
    main()
