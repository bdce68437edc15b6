"""Scaling benchmark: real-size shapes, N decoder layers, seconds per stage and peak RSS against N.

    python tools/bench_scale.py [--shape llama3-8b|qwen2.5-7b] [--layers 1,2,4,8] [--full]
                                [--calib-tokens 2048] [--configs b4g64,b5g64] [--bpw 4.25] [--quantizer gptq]
                                [--workdir DIR]
                                [--tokenizer tokenizer.model]

For each N it builds (once, kept in --workdir) a synthetic bf16 checkpoint with the real model's shapes
(Llama-3-8B: hidden 4096, FFN 14336, 32/8 heads, vocab 128256; Qwen2.5-7B: hidden 3584, FFN 18944,
28/4 heads, vocab 152064, q/k/v biases) sharded with a model.safetensors.index.json (one shard per
decoder layer, one for the embedding, one for the lm_head), random N(0, 0.02) weights, and the
llama2 sentencepiece tokenizer (ids beyond its 32k simply never occur). Each is converted with the
default method (fresh cache: calibration and measurement really run) in a child process whose peak
RSS is its own. Prints the table, the least-squares per-layer slope of every column and the
extrapolation to the full depth. --full converts the whole-depth checkpoint instead.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True),
}
STAGES = ("read", "calibrate", "measure", "solve", "write", "total")


def layer_tensors(config: dict, i: int) -> dict:
    """name -> shape of decoder layer i's tensors."""
    H, I = config["hidden_size"], config["intermediate_size"]
    hd = H // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
              p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
              p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)}
    if config["attention_bias"]:
        shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def build_checkpoint(directory: Path, shape: str, layers: int, tokenizer: Path) -> Path:
    """A synthetic sharded bf16 checkpoint (written once; a finished one has its index file)."""
    import torch
    from safetensors.torch import save_file

    if (directory / "model.safetensors.index.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = {**SHAPES[shape], "num_hidden_layers": layers, "max_position_embeddings": 8192,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    H, V = config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(0)

    def random(shape, std=0.02):
        return (torch.randn(shape, generator=generator, dtype=torch.bfloat16) * std) if len(shape) == 2 else \
            (1 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)

    shards = [("embed", {"model.embed_tokens.weight": (V, H)})]
    shards += [(f"layer{i:03d}", layer_tensors(config, i)) for i in range(layers)]
    shards += [("head", {"model.norm.weight": (H,), "lm_head.weight": (V, H)})]
    weight_map, total = {}, 0
    for k, (label, shapes) in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random(s) for name, s in shapes.items()}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                                 "eos_token": "</s>"}))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))  # last: marks it complete
    return directory


def convert_child(hf_dir: Path, out: Path, cache: Path, options: dict) -> dict:
    """Convert in a fresh process; its seconds per stage, its own peak RSS (MiB: VmHWM, the high-water
    mark of its process image — ru_maxrss would start at the forking parent's peak), and the peak so far
    when each progress bar opens (a stage's bar opens when the previous stages are done)."""
    code = textwrap.dedent(f"""
        import json
        from mxq.converter import convert

        def high_water_mib():
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) / 1024 for l in status if l.startswith("VmHWM"))

        peaks = {{}}

        class Bar:
            def __init__(self, desc="", **_):
                peaks.setdefault(desc, high_water_mib())
            def update(self, n=1):
                pass
            def close(self):
                pass

        report = convert({str(hf_dir)!r}, {str(out)!r}, cache_dir={str(cache)!r}, progress=Bar, **{options!r})
        print(json.dumps({{"seconds": report.seconds, "bpw": report.achieved_bpw, "peaks": peaks,
                           "peak_rss_mib": high_water_mib()}}))
    """)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        returncode = subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=stderr, text=True).returncode
        stdout.seek(0), stderr.seek(0)
        if returncode:
            raise SystemExit(f"conversion of {hf_dir} failed:\n{stderr.read()[-3000:]}")
        return json.loads(stdout.read().strip().splitlines()[-1])


def slope(ns, values):
    """Least-squares line through (N, value): (per-layer slope, intercept); one point: (nan, value)."""
    if len(set(ns)) < 2:
        return float("nan"), float(values[0])
    a, b = np.polyfit(np.asarray(ns, float), np.asarray(values, float), 1)
    return float(a), float(b)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", default="1,2,4,8", help="comma-separated decoder layer counts")
    parser.add_argument("--full", action="store_true", help="convert the whole-depth checkpoint only")
    parser.add_argument("--calib-tokens", type=int, default=None, help="passed to the converter")
    parser.add_argument("--configs", default=None, help="passed to the converter (default: its default)")
    parser.add_argument("--quantizer", default=None, help="passed to the converter (default: its default)")
    parser.add_argument("--bpw", type=float, default=4.25)
    parser.add_argument("--tokenizer", type=Path, default=fixtures.DATA_DIR / "llama2-tokenizer.model",
                        help="a sentencepiece tokenizer.model for the synthetic checkpoints")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mxq-bench-scale"),
                        help="where checkpoints are built and kept between runs")
    args = parser.parse_args()
    full_depth = SHAPES[args.shape]["num_hidden_layers"]
    counts = [full_depth] if args.full else [int(n) for n in args.layers.split(",")]
    options = {"bpw": args.bpw}
    if args.calib_tokens is not None:
        options["calib_tokens"] = args.calib_tokens
    if args.configs is not None:
        options["configs"] = args.configs
    if args.quantizer is not None:
        options["quantizer"] = args.quantizer
    workdir = Path(args.workdir)
    if not args.tokenizer.is_file():
        raise SystemExit(f"{args.tokenizer}: tokenizer not found (give --tokenizer)")
    print(f"{args.shape}, default method, options {options}")
    print(f"{'N':>3} " + " ".join(f"{s:>10}" for s in STAGES) + f" {'peak MiB':>9} {'calib MiB':>9} {'meas. MiB':>9}"
          "   (seconds per stage; peak RSS of the whole conversion, up to the end of calibration and of"
          " measurement)", flush=True)
    rows = []
    for n in counts:
        hf_dir, started = workdir / f"{args.shape}-{n}", time.perf_counter()
        fresh = not (hf_dir / "model.safetensors.index.json").exists()
        build_checkpoint(hf_dir, args.shape, n, args.tokenizer)
        built = time.perf_counter() - started
        scratch = workdir / "run"
        shutil.rmtree(scratch, ignore_errors=True)
        result = convert_child(hf_dir, scratch / "out.mxq", scratch / "cache", options)
        shutil.rmtree(scratch, ignore_errors=True)
        seconds = [result["seconds"].get(s, 0.0) for s in STAGES]
        calibration_peak = result["peaks"].get("measure", result["peaks"].get("write", float("nan")))
        measure_peak = result["peaks"].get("write", float("nan"))
        rows.append((n, seconds, result["peak_rss_mib"], calibration_peak, measure_peak))
        print(f"{n:3d} " + " ".join(f"{s:10.1f}" for s in seconds)
              + f" {result['peak_rss_mib']:9.0f} {calibration_peak:9.0f} {measure_peak:9.0f}"
              + (f"   (checkpoint built in {built:.0f} s)" if fresh else ""), flush=True)
    ns = [row[0] for row in rows]
    print(f"per-layer slope, and extrapolation to {full_depth} layers:")
    for k, stage in enumerate(STAGES):
        a, b = slope(ns, [r[1][k] for r in rows])
        print(f"  {stage:<10} {a:9.2f} s/layer   -> {a * full_depth + b:9.0f} s")
    for label, column in (("peak RSS", 2), ("calib RSS", 3), ("meas. RSS", 4)):
        a, b = slope(ns, [r[column] for r in rows])
        print(f"  {label:<10} {a:9.1f} MiB/layer -> {a * full_depth + b:9.0f} MiB")


if __name__ == "__main__":
    main()
