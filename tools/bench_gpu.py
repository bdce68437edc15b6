"""GEMV benchmark on a real GPU: mxq's fused dequant+GEMV vs cuBLAS fp16 GEMV, same shapes, same run.

    python tools/bench_gpu.py                          # b4 g128 on the default shapes
    python tools/bench_gpu.py --bits 2 3 4 8 --group 64
    python tools/bench_gpu.py --shapes 4096x4096 576x1536 --iters 500 --json

For each shape (out × in) it reports the mxq kernel's time, the bytes it must read (packed codes,
8-bit scale/zero codes and their fp16 run metadata, x, y) and the achieved GB/s against the device's
peak DRAM bandwidth (2 × memory clock × bus width, or --peak-gbps), then cuBLAS's fp16 GEMV
(CuPy matmul of an fp16 (out, in) matrix by an fp16 vector) on the same shape and its GB/s, and the
speed-up (cuBLAS time / mxq time). Design targets: ≥ 70% of peak for 4-bit at 4096×4096 and ≥ 2×
cuBLAS fp16 there. Default shapes: 4096×4096, 4096×11008, 11008×4096 (Llama-7B-like), and 576×576,
1536×576, 576×1536 (SmolLM2-135M's). Times are medians over --iters launches timed with CUDA events,
after --warmup launches; each launch reads a different copy of the weights when they fit in L2 less
than 4 times (so L2 residency does not flatter small shapes).

Exit status: 0 after benchmarking; 3 (with a one-line message on stderr) when no CUDA GPU / CuPy is
available — e.g. on the CPU-only build machines; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
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


def bench_shape(cupy, module, shape, bits, group_size, iters, warmup, l2_bytes):
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
    return {"shape": f"{out_features}x{in_features}", "bits": bits, "group_size": group_size,
            "mxq_us": t_mxq * 1e6, "mxq_bytes": bytes_mxq, "mxq_gbps": bytes_mxq / t_mxq / 1e9,
            "cublas_fp16_us": t_cublas * 1e6, "cublas_gbps": bytes_cublas / t_cublas / 1e9,
            "speedup_vs_cublas": t_cublas / t_mxq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="OUTxIN (default: %(default)s)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--peak-gbps", type=float, help="override the device's peak DRAM bandwidth")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        assert all(len(s) == 2 for s in shapes)
    except (ValueError, AssertionError):
        ap.error("shapes are OUTxIN, e.g. 4096x11008")
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
    rows = [bench_shape(cupy, module, s, b, args.group, args.iters, args.warmup, l2) for b in args.bits for s in shapes]
    for r in rows:
        r["mxq_pct_peak"] = 100 * r["mxq_gbps"] / peak
    if args.json:
        print(json.dumps({"device": name, "sm": nvrtc.device_arch(), "peak_gbps": peak, "results": rows}, indent=1))
        return 0
    print(f"{name} (sm_{nvrtc.device_arch()}), peak DRAM bandwidth {peak:.0f} GB/s, L2 {l2 >> 20} MiB")
    print(f"{'shape':>11} {'cfg':>7} | {'mxq µs':>8} {'GB/s':>7} {'% peak':>6} | {'cuBLAS fp16 µs':>14} {'GB/s':>7} |"
          f" {'speed-up':>8}")
    for r in rows:
        print(f"{r['shape']:>11} {'b%dg%d' % (r['bits'], r['group_size']):>7} | {r['mxq_us']:8.1f} {r['mxq_gbps']:7.1f}"
              f" {r['mxq_pct_peak']:6.1f} | {r['cublas_fp16_us']:14.1f} {r['cublas_gbps']:7.1f} |"
              f" {r['speedup_vs_cublas']:7.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
