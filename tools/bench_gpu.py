"""GPU benchmark: mxq's fused dequant+GEMV vs cuBLAS fp16 GEMV, same shapes, same run; and end-to-end
decode of an .mxq file against the roofline bound.

    python tools/bench_gpu.py                          # b4 g128 on the default shapes
    python tools/bench_gpu.py --bits 2 3 4 8 --group 64
    python tools/bench_gpu.py --shapes 4096x4096 576x1536 --iters 500 --json
    python tools/bench_gpu.py --f16 --shapes 49152x576 # also mxq's gemv_f16 (fp16 matrices) per shape
    python tools/bench_gpu.py --model smol.mxq         # GEMV table, then decode tok/s vs roofline
    python tools/bench_gpu.py --model smol.mxq --no-gemv --decode-steps 256 --prompt-tokens 512

For each shape (out × in) it reports the mxq kernel's time, the bytes it must read (packed codes,
8-bit scale/zero codes and their fp16 run metadata, x, y) and the achieved GB/s against the device's
peak DRAM bandwidth (2 × memory clock × bus width, or --peak-gbps), then cuBLAS's fp16 GEMV
(CuPy matmul of an fp16 (out, in) matrix by an fp16 vector) on the same shape and its GB/s, and the
speed-up (cuBLAS time / mxq time). With --f16, mxq's gemv_f16 (the kernel fp16 matrices such as a
tied fp16 lm_head use at decode) on an fp16 matrix of the same shape, against the same cuBLAS time.
Design targets: ≥ 70% of peak for 4-bit at 4096×4096 and ≥ 2×
cuBLAS fp16 there. Default shapes: 4096×4096, 4096×11008, 11008×4096 (Llama-7B-like), and 576×576,
1536×576, 576×1536 (SmolLM2-135M's). Times are medians over --iters launches timed with CUDA events,
after --warmup launches; each launch reads a different copy of the weights when they fit in L2 less
than 4 times (so L2 residency does not flatter small shapes).

Decode (--model PATH): loads the file with mxq.load(PATH, device="cuda"), prefills --prompt-tokens
seeded random tokens, runs --warmup decode steps, then times --decode-steps steps of
model.forward([token], cache) between backend.synchronize() calls (the same token fed each step:
the GPU pipeline alone), and as many greedy steps with the logits copied to the host and argmax'd
each step (what `mxq generate` does). Bytes per token = the stored bytes of every matrix the decode
GEMVs read (q k v o gate up down of each layer and the lm_head, a tied embedding counted once:
packed codes, scale/zero codes and metadata, outliers; fp16 matrices at 2 bytes per weight) + the KV
cache bytes read at that step's length (mean over the timed steps). The roofline bound is bandwidth ÷
bytes per token, for the nominal peak (above, or --peak-gbps) and for a measured device-to-device copy
(read + write bytes ÷ time); the ratio is achieved tok/s ÷ bound. Target: ≥ 60% of the roofline.

Exit status: 0 after benchmarking; 3 (with a one-line message on stderr) when no CUDA GPU / CuPy is
available — e.g. on the CPU-only build machines; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package

DEFAULT_SHAPES = ("4096x4096", "4096x11008", "11008x4096", "576x576", "1536x576", "576x1536")
NO_GPU_STATUS = 3


def no_gpu_reason() -> str | None:
    try:
        import cupy
    except Exception as exc:  # ImportError or a broken CUDA install
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA driver/device ({type(exc).__name__}: {exc})"
    return None if n > 0 else "no CUDA device found"


def peak_gbps(cupy) -> float:
    """2 × memory clock (kHz) × bus width (bits) / 8, from the device attributes."""
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device().id
    clock_khz = rt.deviceGetAttribute(rt.cudaDevAttrMemoryClockRate, dev)
    bus_bits = rt.deviceGetAttribute(rt.cudaDevAttrGlobalMemoryBusWidth, dev)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def random_affine(rng, shape, bits, group_size):
    from mxq.format_spec import encode_meta, pack_codes
    out_features, in_features = shape
    n_groups = -(-in_features // group_size)
    codes = rng.integers(0, 1 << bits, size=(out_features, n_groups * group_size), dtype=np.uint8)
    codes[:, in_features:] = 0
    scale_codes, scale_meta = encode_meta(rng.uniform(0.001, 0.05, (out_features, n_groups)).astype(np.float32))
    zero_codes, zero_meta = encode_meta(rng.uniform(0, (1 << bits) - 1, (out_features, n_groups)).astype(np.float32))
    return {"qweight": pack_codes(codes, bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
            "zero_codes": zero_codes, "zero_meta": zero_meta}


def time_launches(cupy, fn, copies: int, iters: int, warmup: int) -> float:
    """Median seconds of one call of fn(i) (i = which weight copy), timed with CUDA events."""
    for i in range(warmup):
        fn(i % copies)
    times = []
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for i in range(iters):
        start.record()
        fn(i % copies)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3)
    return statistics.median(times)


def measured_gbps(cupy, max_bytes: int = 512 << 20, iters: int = 20) -> float:
    """Device-to-device copy bandwidth: (read + write bytes) ÷ time, median of `iters` copies of a buffer
    of up to max_bytes (at most a quarter of the free memory), timed with CUDA events."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    n = max(1 << 20, min(max_bytes, free // 4)) // 256 * 256
    a = cupy.zeros(n, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    t = time_launches(cupy, lambda i: b.__setitem__(Ellipsis, a), 1, iters, 3)
    del a, b
    return 2 * n / t / 1e9


def bench_shape(cupy, module, shape, bits, group_size, iters, warmup, l2_bytes, f16=False):
    from mxq.kernels.registry import gemv_launch, gemv_name
    rng = np.random.default_rng(0)
    out_features, in_features = shape
    host = random_affine(rng, shape, bits, group_size)
    weight_bytes = sum(a.nbytes for a in host.values())
    copies = max(1, min(8, -(-4 * l2_bytes // max(weight_bytes, 1))))  # cycle through > 4× L2 when small
    dev = [{k: cupy.asarray(v) for k, v in host.items()} for _ in range(copies)]
    x = cupy.asarray(rng.standard_normal(in_features).astype(np.float32))
    y = cupy.empty(out_features, np.float32)
    kernel = module.get_function(gemv_name(bits, group_size))
    grid, block = gemv_launch(out_features)
    null = np.uint64(0)

    def run(i):
        b = dev[i]
        kernel(grid, block, (b["qweight"], b["scale_codes"], b["scale_meta"], b["zero_codes"], b["zero_meta"],
                             null, null, null, x, null, y, np.int32(out_features), np.int32(in_features)))

    t_mxq = time_launches(cupy, run, copies, iters, warmup)
    bytes_mxq = weight_bytes + x.nbytes + y.nbytes

    w16 = [cupy.asarray(rng.standard_normal(shape).astype(np.float16)) for _ in range(
        max(1, min(8, -(-4 * l2_bytes // (2 * out_features * in_features)))))]
    x16 = cupy.asarray(rng.standard_normal(in_features).astype(np.float16))
    y16 = cupy.empty(out_features, np.float16)

    def run_cublas(i):
        cupy.matmul(w16[i], x16, out=y16)

    t_cublas = time_launches(cupy, run_cublas, len(w16), iters, warmup)
    bytes_cublas = 2 * out_features * in_features + x16.nbytes + y16.nbytes
    row = {"shape": f"{out_features}x{in_features}", "bits": bits, "group_size": group_size,
           "mxq_us": t_mxq * 1e6, "mxq_bytes": bytes_mxq, "mxq_gbps": bytes_mxq / t_mxq / 1e9,
           "cublas_fp16_us": t_cublas * 1e6, "cublas_gbps": bytes_cublas / t_cublas / 1e9,
           "speedup_vs_cublas": t_cublas / t_mxq}
    if f16:  # mxq's gemv_f16 on the same fp16 copies cuBLAS read (fp32 x and y, as the backend calls it)
        from mxq.kernels.registry import GEMV_F16
        kernel16 = module.get_function(GEMV_F16)

        def run_f16(i):
            kernel16(grid, block, (w16[i], x, null, y, np.int32(out_features), np.int32(in_features)))

        t_f16 = time_launches(cupy, run_f16, len(w16), iters, warmup)
        bytes_f16 = 2 * out_features * in_features + x.nbytes + y.nbytes
        row.update({"f16_us": t_f16 * 1e6, "f16_gbps": bytes_f16 / t_f16 / 1e9,
                    "f16_speedup_vs_cublas": t_cublas / t_f16})
    return row


# ---- end-to-end decode --------------------------------------------------------------------------------

def decode_matrices(model) -> list:
    """The weight handles the decode GEMVs read once per token (each object once: a tied lm_head is
    the embedding, whose gather reads only one row)."""
    seen, out = set(), []
    for layer in model.layers:
        for w in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            if id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    if id(model.lm_head) not in seen:
        out.append(model.lm_head)
    return out


def decode_weight_bytes(model) -> int:
    """Stored bytes of every matrix a decode step's GEMVs read (AffineHandle: all its blobs, outliers
    included; DenseHandle: the fp16 data)."""
    return sum(int(w.nbytes) for w in decode_matrices(model))


def kv_bytes_per_token(model, kv_itemsize: int, kv_len: float) -> float:
    """KV cache bytes attention reads at one decode step with kv_len cached positions (all layers, k and v)."""
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * kv_itemsize * kv_len


def bench_decode(path, steps: int, warmup: int, prompt_tokens: int, bandwidths: dict, device: str = "cuda") -> dict:
    """Decode tok/s of an .mxq file and the roofline bound for each bandwidth in `bandwidths`
    ({label: GB/s}). Timing: backend.synchronize() before starting and after the last step."""
    import mxq

    with mxq.load(path, device=device) as lm:
        model, backend = lm.model, lm.backend
        c = model.config
        total = prompt_tokens + warmup + 2 * steps
        if total > c.max_position_embeddings:
            raise SystemExit(f"bench_gpu: --prompt-tokens + --warmup + 2·--decode-steps = {total} exceeds the "
                             f"model's context of {c.max_position_embeddings}")
        prompt = np.random.default_rng(1234).integers(3, c.vocab_size, size=prompt_tokens).tolist()
        cache = model.new_cache(total)
        t0 = time.perf_counter()
        token = int(np.argmax(backend.to_host(model.forward(prompt, cache, last_only=True))[-1]))
        prefill_s = time.perf_counter() - t0
        for _ in range(warmup):
            model.forward([token], cache)
        backend.synchronize()

        def timed(loop) -> tuple[float, float]:
            """(seconds per step, mean KV length read per step) of `steps` calls of loop()."""
            first = cache.length + 1  # the step's own key is read too
            backend.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                loop()
            backend.synchronize()
            return (time.perf_counter() - t0) / steps, first + (steps - 1) / 2

        t_device, kv_len_device = timed(lambda: model.forward([token], cache))
        state = {"token": token}

        def greedy_step():
            logits = backend.to_host(model.forward([state["token"]], cache))[-1]
            state["token"] = int(np.argmax(logits))

        t_greedy, kv_len_greedy = timed(greedy_step)

        itemsize = np.dtype(getattr(backend, "kv_dtype", np.float32)).itemsize
        weights = decode_weight_bytes(model)
        kinds = {}
        for w in decode_matrices(model):
            kind = "fp16" if not hasattr(w, "bits") else "affine"
            kinds[kind] = kinds.get(kind, 0) + int(w.nbytes)
        result = {"model": str(path), "prompt_tokens": prompt_tokens, "steps": steps,
                  "kv_cache": getattr(backend, "kv_cache", "f32"), "prefill_tok_s": prompt_tokens / prefill_s,
                  "weight_bytes_per_token": weights, "weight_bytes_by_scheme": kinds, "modes": {}}
        for mode, t, kv_len in (("device", t_device, kv_len_device), ("greedy", t_greedy, kv_len_greedy)):
            kv = kv_bytes_per_token(model, itemsize, kv_len)
            per_token = weights + kv
            row = {"tok_s": 1.0 / t, "ms_per_token": 1e3 * t, "mean_kv_len": kv_len, "kv_bytes_per_token": kv,
                   "bytes_per_token": per_token, "achieved_gbps": per_token / t / 1e9, "roofline": {}}
            for label, gbps in bandwidths.items():
                bound = gbps * 1e9 / per_token
                row["roofline"][label] = {"gbps": gbps, "bound_tok_s": bound, "ratio": (1.0 / t) / bound}
            result["modes"][mode] = row
        return result


def print_decode(d: dict) -> None:
    mib = 2 ** 20
    kinds = ", ".join(f"{k} {v / mib:.1f}" for k, v in sorted(d["weight_bytes_by_scheme"].items()))
    print(f"\ndecode: {d['model']} — {d['steps']} steps after a {d['prompt_tokens']}-token prompt "
          f"(prefill {d['prefill_tok_s']:.0f} tok/s), {d['kv_cache']} KV cache")
    print(f"  weights read per token by the GEMVs: {d['weight_bytes_per_token'] / mib:.1f} MiB ({kinds})")
    labels = list(next(iter(d["modes"].values()))["roofline"])
    print(f"  {'mode':<7} {'tok/s':>8} {'ms/tok':>7} {'KV MiB':>7} {'MiB/tok':>8} {'GB/s':>7} | "
          + " | ".join(f"{'tok/s bound @ ' + label:>26} {'ratio':>6}" for label in labels))
    for mode, r in d["modes"].items():
        cells = " | ".join(f"{r['roofline'][label]['bound_tok_s']:>13.1f} ({r['roofline'][label]['gbps']:5.0f} GB/s)"
                           f" {100 * r['roofline'][label]['ratio']:5.1f}%" for label in labels)
        print(f"  {mode:<7} {r['tok_s']:8.1f} {r['ms_per_token']:7.2f} {r['kv_bytes_per_token'] / mib:7.2f}"
              f" {r['bytes_per_token'] / mib:8.1f} {r['achieved_gbps']:7.1f} | {cells}")
    print("  device: the same token fed each step (GPU pipeline); greedy: logits to the host + argmax each step."
          " Target: ≥ 60% of the roofline bound.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="OUTxIN (default: %(default)s)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--peak-gbps", type=float, help="override the device's peak DRAM bandwidth")
    ap.add_argument("--f16", action="store_true", help="also time mxq's gemv_f16 on an fp16 matrix per shape")
    ap.add_argument("--model", type=Path, help="an .mxq file: also benchmark decode against the roofline bound")
    ap.add_argument("--decode-steps", type=int, default=128, help="timed decode steps (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length before decoding (default: %(default)s)")
    ap.add_argument("--no-gemv", action="store_true", help="skip the GEMV table (with --model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        assert all(len(s) == 2 for s in shapes)
    except (ValueError, AssertionError):
        ap.error("shapes are OUTxIN, e.g. 4096x11008")
    if args.model is not None and not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")
    if args.no_gemv and args.model is None:
        ap.error("--no-gemv needs --model")
    if args.decode_steps < 1 or args.prompt_tokens < 1 or args.warmup < 0:
        ap.error("--decode-steps and --prompt-tokens must be ≥ 1, --warmup ≥ 0")
    reason = no_gpu_reason()
    if reason:
        print(f"bench_gpu: no CUDA GPU available, nothing to benchmark: {reason}", file=sys.stderr)
        return NO_GPU_STATUS

    import cupy

    from mxq.kernels import nvrtc
    module = nvrtc.load_module()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    peak = args.peak_gbps or peak_gbps(cupy)
    l2 = int(props.get("l2CacheSize", 4 << 20))
    rows = [] if args.no_gemv else [bench_shape(cupy, module, s, b, args.group, args.iters, args.warmup, l2, args.f16)
                                    for b in args.bits for s in shapes]
    for r in rows:
        r["mxq_pct_peak"] = 100 * r["mxq_gbps"] / peak
        if "f16_gbps" in r:
            r["f16_pct_peak"] = 100 * r["f16_gbps"] / peak
    decode = None
    if args.model is not None:
        measured = measured_gbps(cupy)
        decode = bench_decode(args.model, args.decode_steps, args.warmup, args.prompt_tokens,
                              {"peak": peak, "measured copy": measured})
    if args.json:
        out = {"device": name, "sm": nvrtc.device_arch(), "peak_gbps": peak, "results": rows}
        if decode is not None:
            out["decode"] = decode
        print(json.dumps(out, indent=1))
        return 0
    print(f"{name} (sm_{nvrtc.device_arch()}), peak DRAM bandwidth {peak:.0f} GB/s, L2 {l2 >> 20} MiB")
    if rows:
        f16 = "  | gemv_f16 µs    GB/s % peak speed-up" if args.f16 else ""
        print(f"{'shape':>11} {'cfg':>7} | {'mxq µs':>8} {'GB/s':>7} {'% peak':>6} | {'cuBLAS fp16 µs':>14} {'GB/s':>7} |"
              f" {'speed-up':>8}{f16}")
    for r in rows:
        line = (f"{r['shape']:>11} {'b%dg%d' % (r['bits'], r['group_size']):>7} | {r['mxq_us']:8.1f}"
                f" {r['mxq_gbps']:7.1f} {r['mxq_pct_peak']:6.1f} | {r['cublas_fp16_us']:14.1f} {r['cublas_gbps']:7.1f} |"
                f" {r['speedup_vs_cublas']:7.2f}×")
        if "f16_us" in r:
            line += (f"  | {r['f16_us']:11.1f} {r['f16_gbps']:7.1f} {r['f16_pct_peak']:6.1f}"
                     f" {r['f16_speedup_vs_cublas']:7.2f}×")
        print(line)
    if decode is not None:
        print_decode(decode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
