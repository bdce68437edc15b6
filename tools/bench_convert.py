"""Conversion benchmark: seconds per stage and peak RSS, as ratios to one single-config pass.

    python tools/bench_convert.py [--fixture smollm2] [--bpw 4.25] [--rebpw 3.5] [--method default|paper]
                                  [--row-blocks K] [--jobs N] [--skip-synthetic] [--check-sample]
                                  [--check-fisher-dtype]

In one run, each in its own process (so its peak RSS is its own), after compiling the Numba kernels once:
  * baseline: one single-config quantization pass (b4g64, the method's quantizer, data-free weights, errors
    only) over the fixture's decoder linears;
  * the conversion at --bpw with cold caches (calibration and errors): seconds per stage (read,
    calibrate, measure, solve, write), total, peak RSS, each as a ratio to the baseline;
  * the re-conversion at --rebpw with warm caches, the same;
  * (unless --skip-synthetic) peak RSS for two synthetic checkpoints whose largest tensor is the same but
    whose total size differs 4×: peak memory must track the largest tensor, not the model.
--check-sample measures the fixture's error matrix on every row and on row samples (1 in 4, 8, 16) and
prints, at 3.5/4.25/5.5 bpw, how much the allocation chosen from sampled errors loses against the one
chosen from exact errors (both scored with the exact errors), and the stated error bars (with
--row-blocks K: of the row blocks' estimates).
--check-fisher-dtype compares the allocations made with the Fisher diagonal in float32 and in bfloat16
(what the statistics store keeps) at 3.5/4.25/5.5 bpw.
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
    """Run python code in a fresh process; it prints one JSON line; add its peak RSS (MiB: VmHWM, its own
    process image's high-water mark; ru_maxrss after fork+exec can start at the parent's peak)."""
    wrapper = code + textwrap.dedent("""
        import json as _json, re as _re
        with open("/proc/self/status") as _status:
            RESULT["peak_rss_mib"] = int(_re.search(r"VmHWM:\\s+(\\d+)", _status.read()).group(1)) / 1024
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


def single_pass(hf_dir, quantizer, jobs) -> dict:
    return run_child(textwrap.dedent(f"""
        import time
        from mxq.converter.checkpoint import read_checkpoint
        from mxq.converter.pipeline import _use_cores
        from mxq.converter.quantize import quantize
        from mxq.format_spec import StorageConfig
        _use_cores({jobs!r})
        checkpoint = read_checkpoint({str(hf_dir)!r})
        started = time.perf_counter()
        for info in checkpoint.linears:
            quantize(checkpoint.load(info.name), StorageConfig.affine(4, 64), {quantizer!r}, pack=False)
        RESULT = {{"seconds": time.perf_counter() - started}}
    """))


def compile_kernels() -> None:
    """Numba compiles the kernels on first use and caches them on disk (like .pyc): do it outside the timings."""
    run_child(textwrap.dedent("""
        import torch
        from mxq.converter.quantize import quantize
        from mxq.format_spec import StorageConfig
        for importance in (None, torch.ones(4, 64)):
            quantize(torch.randn(4, 64), StorageConfig.affine(4, 32), "wls", importance=importance)
        RESULT = {}
    """))


def sample_check(hf_dir, cache_dir: Path, everies=(4, 8, 16), budgets=(3.5, 4.25, 5.5), row_blocks=1) -> None:
    """Allocation quality with sampled errors, scored with exact errors (see the module docstring)."""
    import math
    import time

    import numpy as np
    from mxq.converter.allocate import allocate
    from mxq.converter.checkpoint import read_checkpoint
    from mxq.converter.measure import ErrorCache, measure
    from mxq.converter.pipeline import ConvertOptions, _calibration, _candidates

    checkpoint = read_checkpoint(hf_dir)
    checkpoint_hash = checkpoint.content_hash()
    options = ConvertOptions(bpw=4.25, cache_dir=str(cache_dir))
    fisher = _calibration(checkpoint, checkpoint_hash, options, str(cache_dir), None).fisher
    tables, seconds = {}, {}
    for every in (1, *everies):
        started = time.perf_counter()
        cache = ErrorCache(cache_dir / "errors" if every == 1 else None, checkpoint_hash)  # exact ones kept
        tables[every] = measure(checkpoint, _candidates(options), "wls", cache,
                                importance=fisher.__getitem__, importance_id="check", sample_every=every,
                                row_blocks=row_blocks)
        seconds[every] = time.perf_counter() - started
    exact = tables[1]
    rows = np.arange(len(exact.names))
    print(f"row-sampled measurement vs exact (fisher objective, --row-blocks {row_blocks}, allocation scored with "
          "exact errors):")
    print(f"  {'rows':>7} {'seconds':>8} {'bpw':>5} {'changed':>8} {'loss vs exact optimum':>22} "
          f"{'estimate/exact':>15} {'stated ±1 s.e.':>15}")
    for every in (1, *everies):
        for bpw in budgets:
            budget = int(math.floor(bpw * float(exact.numel.sum()) / 8 + 1e-9))
            best = allocate(exact.costs, exact.weighted, budget)
            table = tables[every]
            choice = allocate(table.costs, table.weighted, budget)
            optimum, scored = exact.weighted[rows, best].sum(), exact.weighted[rows, choice].sum()
            estimated = table.weighted[rows, choice].sum()
            stated = math.sqrt(float((table.weighted_se[rows, choice] ** 2).sum())) / estimated
            print(f"  1 in {every:<2} {seconds[every]:8.1f} {bpw:5.2f} {int((choice != best).sum()):5d}/{len(rows)} "
                  f"{100 * (scored / optimum - 1):+21.3f}% {estimated / scored:15.4f} {100 * stated:14.2f}%")


def fisher_dtype_check(hf_dir, cache_dir: Path, budgets=(3.5, 4.25, 5.5)) -> None:
    """Does storing the Fisher diagonal in bfloat16 change the MILP's choices? One float32 calibration;
    its bfloat16 rounding is exactly what the statistics store keeps. Errors measured with each, the
    allocations at each budget compared (matrices whose config differs, and the bf16 choice's error
    scored with the float32 errors against the float32 choice's)."""
    import math

    import numpy as np
    import torch
    from mxq.converter.allocate import allocate
    from mxq.converter.calibrate import calibrate
    from mxq.converter.checkpoint import read_checkpoint
    from mxq.converter.measure import ErrorCache, measure
    from mxq.converter.pipeline import ConvertOptions, _candidates

    checkpoint = read_checkpoint(hf_dir)
    checkpoint_hash = checkpoint.content_hash()
    exact = calibrate(checkpoint, cache_dir / "fp32-stats", fisher_dtype=torch.float32).fisher
    importances = {"float32": exact.__getitem__,
                   "bfloat16": lambda name: exact[name].to(torch.bfloat16).to(torch.float32)}
    candidates = _candidates(ConvertOptions(bpw=4.25))
    tables = {kind: measure(checkpoint, candidates, "wls", ErrorCache(None, checkpoint_hash),
                            importance=importance, importance_id=kind)
              for kind, importance in importances.items()}
    reference, rounded = tables["float32"], tables["bfloat16"]
    rows = np.arange(len(reference.names))
    print("Fisher stored as bfloat16 vs float32 (same calibration; allocations at each budget):")
    for bpw in budgets:
        budget = int(math.floor(bpw * float(reference.numel.sum()) / 8 + 1e-9))
        choice32 = allocate(reference.costs, reference.weighted, budget)
        choice16 = allocate(rounded.costs, rounded.weighted, budget)
        loss = reference.weighted[rows, choice16].sum() / reference.weighted[rows, choice32].sum() - 1
        print(f"  {bpw:5.2f} bpw: {int((choice16 != choice32).sum())}/{len(rows)} matrices choose another config; "
              f"objective of the bf16 choice {100 * loss:+.4f}% vs the float32 choice (float32 errors)")


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
    parser.add_argument("--row-blocks", type=int, default=None, help="--row-blocks K (default: mxq's)")
    parser.add_argument("--jobs", type=int, default=None, help="threads (default: every core)")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--check-sample", action="store_true", help="only the row-sampling check")
    parser.add_argument("--check-cache", type=Path, help="--check-sample: keep calibration and exact errors here")
    parser.add_argument("--check-fisher-dtype", action="store_true",
                        help="only: do the MILP's choices change with the Fisher stored in bfloat16 vs float32?")
    args = parser.parse_args()
    hf_dir = fixtures.ensure(args.fixture)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.check_sample:
            sample_check(hf_dir, args.check_cache or tmp / "cache", row_blocks=args.row_blocks or 1)
            return
        if args.check_fisher_dtype:
            fisher_dtype_check(hf_dir, tmp)
            return
        method = {**METHODS[args.method], "jobs": args.jobs}
        if args.row_blocks is not None:
            method["row_blocks"] = args.row_blocks
        quantizer = method.get("quantizer", "wls")
        compile_kernels()
        base = single_pass(hf_dir, quantizer, args.jobs)
        first = conversion(hf_dir, tmp / "a.mxq", tmp / "cache", bpw=args.bpw, **method)
        again = conversion(hf_dir, tmp / "b.mxq", tmp / "cache", bpw=args.rebpw, **method)
        unit = base["seconds"]
        print(f"baseline: one single-config pass (b4g64 {quantizer}, errors only) over the {args.fixture} "
              f"decoder linears: {unit:.2f} s, peak RSS {base['peak_rss_mib']:.0f} MiB")
        for title, result in ((f"conversion at --bpw {args.bpw}, method {args.method}, cold caches", first),
                              (f"re-conversion at --bpw {args.rebpw}, warm caches", again)):
            print(f"{title}:")
            for stage, seconds in result["seconds"].items():
                print(f"  {stage:<10} {seconds:8.2f} s {seconds / unit:7.2f}x")
            mine = result["seconds"]["total"] - result["seconds"].get("calibrate", 0.0)
            print(f"  {'total w/o calibrate':<10} {mine:8.2f} s {mine / unit:7.2f}x")
            print(f"  peak RSS {result['peak_rss_mib']:.0f} MiB, file {result['file_bytes'] / 2**20:.1f} MiB")
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
