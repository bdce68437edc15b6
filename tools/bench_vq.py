"""Speed of the compiled CPU vq GEMV (cpu_vq_kernels.py) against the affine kernels decode uses on the same shape,
and against this machine's memory read bandwidth, all measured in one run.

    python tools/bench_vq.py [--shapes 576x1536,1536x576,4096x4096] [--tokens 1,4] [--threads 1,2]
                             [--group 64] [--minor 8] [--rounds 7] [--calls 30] [--json]

For each shape: random matrices (synthetic blobs in the file's in-memory layout) of every vq kind (v2d2, v3d2,
v4d2, v2d4: index bits 4, 6, 8, 8; v3d4s: 12, a file's shared codebook of 4096 points) and of affine b4 and b2,
all with groups of --group inputs, vq rows padded as format 1.--minor pads them (8: to whole words, a row's last
pack of 32 indices possibly partial, e.g. 576 inputs in 4-D vectors: 144 indices, 4 packs and 16; 7: to whole
packs); the handles lean mode makes of them (cpu_vq.VqWeight, cpu_weights.AffineWeight),
multiplied through their own kernel_matmul — what Matrix.matmul runs for decode-sized inputs — with the serial
kernel on one thread and the parallel one (n_parts = threads, Numba's JIT OpenMP loop) on more, forced rather
than left to ThreadChoice. The affine matrices also through decode's tile kernel (a one-matrix stack:
stack_matmul_serial / stack_matmul on cpu_tiles.py's tiles), which is what a model's decoder layers run, and so
are the vq matrices whose codebooks are on the 8-bit grid ("grid stack": cpu_stack_kernels.py).
Timing: every call timed alone, the kinds interleaved call by call over --rounds rounds of --calls calls, the
median per kind. The same matrix is multiplied again and again, so small matrices are read from the caches: this
measures the kernels' own work; the memory limit printed beside (the matrix's bytes at the read bandwidth of that
many threads, measured in this run by bench_decode.measure_bandwidth: a float32 GEMV and a sum over 512 MiB) is
what a model's decode, which reads each matrix from memory once per token, cannot beat.

Columns: µs per call (median), the bytes a call reads (a vq matrix's codebook in the form its kernel reads: float32
planes for 2-D points, fp16 points for 4-D ones), × the memory limit (µs / (bytes / bandwidth)), and the ratio to the
affine b4 and b2 handle products (rows kernel) and to b4's tile kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package
sys.path.insert(0, str(REPO / "tools"))

VQ_KINDS = ((2, 2), (3, 2), (4, 2), (2, 4), (3, 4))  # (bits, dim): index bits 4, 6, 8, 8, 12 (a shared codebook)
AFFINE_BITS = (4, 2)


class Bench:
    """The backend a handle sees: run_kernel calls the kernel with n_parts parts (threads < 2: the handles never
    consult ThreadChoice; which kernel runs is chosen by the kernels namespace passed to kernel_matmul)."""

    def __init__(self, kernels):
        self.kernels, self.cache_dequantized, self.threads, self.team, self.n_parts = kernels, False, 1, None, 1

    def run_kernel(self, kernel, *args) -> bool:
        kernel(*args, self.n_parts)
        return True


def vq_blobs(rng, shape, config, minor):
    """A vq matrix's blobs (in-memory form), its rows padded as format 1.`minor` pads them (layout.vq_dims)."""
    import numpy as np

    from mxq.format_spec import encode_meta, pack_codes
    from mxq.format_spec.layout import vq_dims

    rows, cols = shape
    _, _, n_slots, n_groups = vq_dims(shape, config, minor)
    n_vectors = -(-cols // config.dim)
    index = rng.integers(0, 1 << config.index_bits, size=(rows, n_slots))
    index[:, n_vectors:] = 0
    codebook = (rng.standard_normal((1 << config.index_bits, config.dim)) * 1.5).astype(np.float16)
    scale_codes, scale_meta = encode_meta(rng.normal(0.0, 0.02, (rows, n_groups)), config.meta_bits)
    return {"qweight": pack_codes(index, config.index_bits), "codebook": codebook, "scale_codes": scale_codes,
            "scale_meta": scale_meta}


def affine_blobs(rng, shape, config):
    import numpy as np

    from mxq.format_spec import encode_meta, pack_codes

    rows, cols = shape
    n_groups = -(-cols // config.group_size)
    codes = rng.integers(0, 1 << config.bits, size=(rows, n_groups * config.group_size))
    codes[:, cols:] = 0
    scale_codes, scale_meta = encode_meta(rng.uniform(0.001, 0.05, (rows, n_groups)).astype(np.float32),
                                          config.meta_bits)
    zero_codes, zero_meta = encode_meta(rng.uniform(0, 1 << config.bits, (rows, n_groups)).astype(np.float32),
                                        config.meta_bits)
    return {"qweight": pack_codes(codes, config.bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
            "zero_codes": zero_codes, "zero_meta": zero_meta}


def products(kernels, shape, group, minor):
    """{label: (bytes read per call, run(x, y, n_parts, parallel))} for every vq kind (rows padded as format
    1.`minor`) and affine b4/b2 (handle product and tile kernel)."""
    import numpy as np

    from mxq.format_spec import StorageConfig, snap_to_int8_grid
    from mxq.format_spec.layout import VQ_INDEX_BITS
    from mxq.runtime.backends.cpu_vq import VqWeight

    rng = np.random.default_rng(0)
    backend = Bench(kernels)
    out = {}
    vq = kernels.vq()
    for (bits, dim), grid in [(kind, False) for kind in VQ_KINDS] + [(kind, True) for kind in VQ_KINDS if kind[1] == 4]:
        config = StorageConfig.vq(bits, dim, group, shared=bits * dim not in VQ_INDEX_BITS)
        entry = SimpleNamespace(name="bench", shape=shape, config=config, role="linear")
        blobs = vq_blobs(rng, shape, config, minor)
        if grid:  # the codebook on the 8-bit grid: the integer kernel (vq_grid_matmul)
            blobs["codebook"] = snap_to_int8_grid(blobs["codebook"])
        weight = VqWeight(entry, blobs, backend)
        book = weight.codebook.grid_book if grid else weight.kernel_codebook
        nbytes = sum(a.nbytes for a in (weight.packed, weight.scale_codes, weight.scale_meta, book))

        def run(x, y, n_parts, parallel, weight=weight):
            backend.n_parts = n_parts
            kernel = vq.vq_matmul if parallel else vq.vq_matmul_serial
            grid = vq.vq_grid_matmul if parallel else vq.vq_grid_matmul_serial
            weight.kernel_matmul(SimpleNamespace(vq=lambda: SimpleNamespace(
                vq_matmul=kernel, vq_matmul_serial=kernel, vq_grid_matmul=grid, vq_grid_matmul_serial=grid),
                vq_grid_matmul_team=None), x, None, None, y)

        out[config.label + (" grid" if grid else "")] = (nbytes, run)
        if grid:  # decode's form: a one-matrix kernel stack (cpu_stack_kernels), as for the affine tiles below
            out[config.label + " grid stack"] = (nbytes, stack_run(kernels, weight, shape))
    for bits in AFFINE_BITS:
        out.update(affine_runs(kernels, backend, rng, shape, bits, group))
    return out


def affine_runs(kernels, backend, rng, shape, bits, group) -> dict:
    """{label: (bytes read per call, run(x, y, n_parts, parallel))} of a random affine bBgG matrix: its handle
    product (rows kernel, label bBgG) and decode's tile kernel (bBgG tiles). backend: a Bench."""
    from mxq.format_spec import StorageConfig
    from mxq.runtime.backends.cpu_weights import AffineWeight

    config = StorageConfig.affine(bits, group)
    entry = SimpleNamespace(name="bench", shape=shape, config=config, role="linear")
    weight = AffineWeight(entry, affine_blobs(rng, shape, config), backend)
    tiles = weight.tiles()
    nbytes = sum(a.nbytes for a in (weight.packed, weight.scale_codes, weight.zero_codes, weight.scale_meta,
                                    weight.zero_meta))

    def rows(x, y, n_parts, parallel):
        backend.n_parts = n_parts
        kernel = kernels.affine_matmul if parallel else kernels.affine_matmul_serial
        weight.kernel_matmul(SimpleNamespace(affine_matmul=kernel, affine_matmul_serial=kernel), x, None, None, y)

    return {config.label: (nbytes, rows),
            config.label + " tiles": (sum(a.nbytes for a in (tiles.codes, tiles.scale_codes, tiles.zero_codes,
                                                              tiles.meta)), stack_run(kernels, weight, shape))}


def stack_run(kernels, weight, shape):
    """run(x, y, n_parts, parallel) of a one-matrix kernel stack (cpu_stack.py) of this handle: decode's kernel."""
    import numpy as np

    from mxq.runtime.backends.cpu_stack import table_line
    from mxq.runtime.backends.cpu_weights import NO_FLOAT, NO_RESIDUAL

    table = np.array([table_line(weight, 0)], np.int64)
    out_rows = np.arange(shape[0], dtype=np.int64)

    def run(x, y, n_parts, parallel):
        kernel = kernels.stack_matmul if parallel else kernels.stack_matmul_serial
        kernel(x, table, out_rows, NO_FLOAT, NO_RESIDUAL, y, n_parts)

    run.keep = weight  # the table points into the handle's arrays
    return run


def bench(kernels, shape, tokens, threads, group, minor, rounds, calls) -> dict:
    """{label: median seconds per call} for one shape, token count and thread count (kinds interleaved)."""
    import numba
    import numpy as np

    numba.set_num_threads(threads)
    runs = products(kernels, shape, group, minor)
    x = np.random.default_rng(1).standard_normal((tokens, shape[1])).astype(np.float32)
    y = np.empty((tokens, shape[0]), np.float32)
    return median_times(runs, x, y, threads, rounds, calls)


def median_times(runs, x, y, threads, rounds, calls) -> dict:
    """{label: (median seconds per call, bytes)} of runs {label: (bytes, run(x, y, n_parts, parallel))} with
    n_parts = threads (Numba's thread count set by the caller): every call timed alone, the kinds interleaved
    call by call, after a warm-up."""
    parallel = threads > 1
    times = {label: [] for label in runs}
    for _, run in runs.values():  # warm up (caches, pages, OpenMP pool)
        for _ in range(3):
            run(x, y, threads, parallel)
    for _ in range(rounds):
        for _ in range(calls):
            for label, (_, run) in runs.items():
                t0 = time.perf_counter()
                run(x, y, threads, parallel)
                times[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(t), runs[label][0]) for label, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="OUTxIN, comma-separated")
    ap.add_argument("--tokens", default="1,4", help="rows of x, comma-separated")
    ap.add_argument("--threads", default=None, help="thread counts, comma-separated (default: 1 and all)")
    ap.add_argument("--group", type=int, default=64, choices=(32, 64, 128), help="group size of every matrix")
    ap.add_argument("--minor", type=int, default=None, choices=(7, 8),
                    help="pad vq rows as format 1.MINOR does (default: the newest, whole words)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30, help="calls per kind per round")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        token_counts = [int(t) for t in args.tokens.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(token_counts) < 1:
            raise ValueError
    except ValueError:
        sys.exit("bench_vq: --shapes is OUTxIN,... and --tokens positive integers")

    import numba
    from bench_decode import measure_bandwidth

    from mxq.format_spec.header import MINOR_VERSION
    from mxq.runtime.backends import cpu_jit

    kernels = cpu_jit._load_jit()  # the parallel forms exist in Numba's JIT only (the AOT build is serial)
    if isinstance(kernels, str):
        sys.exit(f"bench_vq: Numba's JIT kernels are not available here ({kernels})")
    most = numba.config.NUMBA_NUM_THREADS
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, most})
    minor = args.minor or MINOR_VERSION
    bandwidth = {t: measure_bandwidth(t)["gb_s"] for t in thread_counts}
    results = []
    for shape in shapes:
        for tokens in token_counts:
            for threads in thread_counts:
                timed = bench(kernels, shape, tokens, threads, args.group, minor, args.rounds, args.calls)
                results.append({"shape": shape, "tokens": tokens, "threads": threads,
                                "kinds": {label: {"us": s * 1e6, "bytes": b} for label, (s, b) in timed.items()}})
    if args.json:
        print(json.dumps({"bandwidth_gb_s": bandwidth, "group": args.group, "minor": minor, "results": results}))
        return
    print(f"vq rows padded as format 1.{minor}; read bandwidth (GB/s, this run): "
          + ", ".join(f"{t} thread(s) {bw:.1f}" for t, bw in bandwidth.items()))
    g = args.group
    for res in results:
        kinds, bw = res["kinds"], bandwidth[res["threads"]]
        b4, b2, b4t = (kinds[f"b4g{g}"]["us"], kinds[f"b2g{g}"]["us"], kinds[f"b4g{g} tiles"]["us"])
        print(f"\n{res['shape'][0]}x{res['shape'][1]}, {res['tokens']} token(s), {res['threads']} thread(s)")
        print(f"  {'kind':16} {'µs':>9} {'KiB':>8} {'×memory':>8} {'×b4 rows':>9} {'×b2 rows':>9} {'×b4 tiles':>10}")
        for label, k in kinds.items():
            limit_us = k["bytes"] / (bw * 1e9) * 1e6
            print(f"  {label:16} {k['us']:9.1f} {k['bytes'] / 1024:8.0f} {k['us'] / limit_us:8.2f} "
                  f"{k['us'] / b4:9.2f} {k['us'] / b2:9.2f} {k['us'] / b4t:10.2f}")


if __name__ == "__main__":
    main()
