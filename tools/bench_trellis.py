"""Speed of the compiled CPU trellis GEMV (cpu_trellis_kernels.py, SPEC.md §13) against the affine b4g64 kernels
decode uses on the same shape, all measured in one run.

    python tools/bench_trellis.py [--shapes 576x1536,1536x576,4096x4096] [--tokens 1,4] [--threads 1,2]
                                  [--K 2,3,4,5] [--rounds 7] [--calls 30]

For each shape: a random trellis matrix per K (every bit stream is a walk through the trellis: random words, the
padding bits past a row's stream zero; a random fp16 table of 4096 levels; 6-bit scale codes per 64 inputs) and
a random affine b4g64 one, in the file's in-memory layout, as the handles lean mode makes of them
(cpu_trellis.TrellisWeight, cpu_weights.AffineWeight) multiplied through their own kernel_matmul — what
Matrix.matmul runs for decode-sized inputs — with the serial kernel on one thread and the parallel one
(n_parts = threads) on more, forced rather than left to ThreadChoice; b4g64 also through decode's tile kernel
(bench_vq.affine_runs: "b4g64 tiles", what a model's decoder layers run). Timing as tools/bench_vq.py's
(median_times): every call timed alone, the kinds interleaved call by call over --rounds rounds of --calls calls,
the median per kind; the same matrix again and again, so small ones are read from the caches.

First, for every K, the handle's products (one token and four, serial and parallel kernel) are checked against
format_spec.trellis.dequantize_trellis(blobs) @ x on small awkward shapes; the tool stops if they disagree.

Columns: µs per call (median), ns per weight (µs per call / (out × in): per weight of the matrix, whatever the
token count), and the ratio to the b4g64 tile kernel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package
sys.path.insert(0, str(REPO / "tools"))

import numpy as np  # noqa: E402

GROUP = 64
CHECK_SHAPES = ((37, 203), (9, 576))  # a partial quad of rows, a partial last group and chunk; SmolLM2's width


def trellis_blobs(rng, shape, config) -> dict:
    """A random trellis matrix's blobs (in-memory form: scale codes uint8 (out, G))."""
    from mxq.format_spec import encode_meta
    from mxq.format_spec.layout import TRELLIS_WINDOW_BITS, trellis_dims

    rows, cols, words_per_row, n_groups = trellis_dims(shape, config)
    words = rng.integers(0, 1 << 32, (rows, words_per_row), dtype=np.uint64)
    stream_bits = TRELLIS_WINDOW_BITS + (cols - 1) * config.bits
    if stream_bits % 32:
        words[:, -1] &= (1 << (stream_bits % 32)) - 1
    scale_codes, scale_meta = encode_meta(rng.uniform(0.005, 0.03, (rows, n_groups)), config.meta_bits)
    return {"qweight": words.astype(np.uint32), "codebook": rng.standard_normal((4096, 1)).astype(np.float16),
            "scale_codes": scale_codes, "scale_meta": scale_meta}


def trellis_run(kernels, backend, blobs, shape, config):
    """run(x, y, n_parts, parallel) of a TrellisWeight of these blobs through its kernel_matmul. backend: a Bench."""
    from mxq.runtime.backends.cpu_trellis import TrellisWeight

    weight = TrellisWeight(SimpleNamespace(name="bench", shape=shape, config=config, role="linear"), blobs, backend)
    trellis = kernels.trellis()

    def run(x, y, n_parts, parallel):
        backend.n_parts = n_parts
        kernel = trellis.trellis_matmul if parallel else trellis.trellis_matmul_serial
        namespace = SimpleNamespace(trellis_matmul=kernel, trellis_matmul_serial=kernel)
        if not weight.kernel_matmul(SimpleNamespace(trellis=lambda: namespace), x, None, None, y):
            sys.exit("bench_trellis: the trellis kernel did not run")

    return run


def check(kernels, backend, Ks) -> None:
    """Stop unless the handle's products match dequantize_trellis(blobs) @ x (float64) on CHECK_SHAPES."""
    from mxq.format_spec import StorageConfig
    from mxq.format_spec.trellis import dequantize_trellis

    rng = np.random.default_rng(3)
    for K in Ks:
        for shape in CHECK_SHAPES:
            config = StorageConfig.trellis(K, GROUP)
            blobs = trellis_blobs(rng, shape, config)
            w = dequantize_trellis(blobs, shape, config).astype(np.float64)
            run = trellis_run(kernels, backend, blobs, shape, config)
            for tokens in (1, 4):
                x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
                expected = x.astype(np.float64) @ w.T
                allowed = 1e-4 * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-6 * (1 + np.abs(expected))
                for parallel in (False, True):
                    y = np.full((tokens, shape[0]), np.nan, np.float32)
                    run(x, y, 2 if parallel else 1, parallel)
                    if not np.all(np.abs(y - expected) <= allowed):
                        sys.exit(f"bench_trellis: the trellis kernel ({'parallel' if parallel else 'serial'}) "
                                 f"disagrees with format_spec.trellis.dequantize_trellis @ x at K {K}, shape "
                                 f"{shape[0]}x{shape[1]}, {tokens} token(s): largest error "
                                 f"{np.nanmax(np.abs(y - expected)):.3g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="OUTxIN, comma-separated")
    ap.add_argument("--tokens", default="1,4", help="rows of x, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--K", default="2,3,4,5", help="trellis bits per weight, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30, help="calls per kind per round")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        token_counts, thread_counts, Ks = ([int(v) for v in arg.split(",")]
                                           for arg in (args.tokens, args.threads, args.K))
        if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(token_counts + thread_counts) < 1:
            raise ValueError
    except ValueError:
        sys.exit("bench_trellis: --shapes is OUTxIN,... and --tokens, --threads, --K positive integers")

    import numba
    from bench_vq import Bench, affine_runs, median_times

    from mxq.format_spec import StorageConfig
    from mxq.format_spec.layout import TRELLIS_BITS
    from mxq.runtime.backends import cpu_jit

    if not set(Ks) <= set(TRELLIS_BITS):
        sys.exit(f"bench_trellis: --K must be among {TRELLIS_BITS}")
    if max(thread_counts) > numba.config.NUMBA_NUM_THREADS:
        sys.exit(f"bench_trellis: at most {numba.config.NUMBA_NUM_THREADS} threads here")
    kernels = cpu_jit._load_jit()  # the parallel forms exist in Numba's JIT only (the AOT build is serial)
    if isinstance(kernels, str):
        sys.exit(f"bench_trellis: Numba's JIT kernels are not available here ({kernels})")
    backend = Bench(kernels)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    check(kernels, backend, Ks)
    rng = np.random.default_rng(0)
    for shape in shapes:
        runs = affine_runs(kernels, backend, rng, shape, 4, GROUP)  # "b4g64" (rows kernel), "b4g64 tiles"
        for K in Ks:
            config = StorageConfig.trellis(K, GROUP)
            runs[f"trellis K{K}"] = (0, trellis_run(kernels, backend, trellis_blobs(rng, shape, config), shape, config))
        for tokens in token_counts:
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            y = np.empty((tokens, shape[0]), np.float32)
            for threads in thread_counts:
                numba.set_num_threads(threads)
                us = {label: s * 1e6 for label, (s, _) in median_times(runs, x, y, threads, args.rounds,
                                                                        args.calls).items()}
                print(f"\n{shape[0]}x{shape[1]}, {tokens} token(s), {threads} thread(s)")
                print(f"  {'kind':12} {'µs':>9} {'ns/weight':>10} {'×b4 tiles':>10}")
                for label, t in us.items():
                    print(f"  {label:12} {t:9.1f} {t * 1e3 / (shape[0] * shape[1]):10.3f} "
                          f"{t / us['b4g64 tiles']:10.2f}")


if __name__ == "__main__":
    main()
