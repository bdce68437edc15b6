"""Speed of the compiled CPU affine kernels per config: decode's tile kernel against the row kernel, and against
one thread's memory read bandwidth.

    python tools/bench_kernels.py [--shape 1536x576] [--configs b2g32,b4g64,...] [--kernels aot|jit] [--json]

For each config: random packed matrices of SHAPE (file layout: codes, scale/zero codes of the config's
metadata bits and their runs), as many copies as make 64 MiB (twice this machine's largest cache here) so that every
product reads its bytes from memory as in decode; one token's product on the calling thread, the copies in
turn, best of 5 alternated rounds, with the row kernel (cpu_kernels.affine_matmul_serial on the file's packed
rows: what non-stack products use) and with decode's tile kernel (a one-matrix stack, stack_matmul_serial on
the tiles of cpu_tiles.py). Printed: µs per product of each and their ratio, and for the tile kernel weights/s,
GB/s of the matrix's bytes, and that as a share of the machine's one-thread read bandwidth measured in the
same run (tools/bench_decode.py's probe on one thread) — the limit a kernel that only waits for memory would
reach. Below 100%, the kernel's own arithmetic is what limits decode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))  # the repository root is the `mxq` package
sys.path.insert(0, str(REPO / "tools"))

CONFIGS = "b2g32,b3g32,b4g32,b5g32,b6g32,b8g32,b2g64,b3g64,b4g64,b5g64,b6g64,b8g64,b4g128"
TOTAL_MIB = 64  # bytes cycled through per round: twice the 32 MiB L3 of the machine this was written on


def random_matrix(rng, shape, config, kernels):
    """A random packed affine matrix of `config` (file layout), prepared as lean mode keeps it: AffineWeight
    (its tiles made with `kernels`). Returns (the row kernel's arrays, the handle, their bytes)."""
    from types import SimpleNamespace

    import numpy as np

    from mxq.format_spec import encode_meta, pack_codes
    from mxq.runtime.backends.cpu_weights import AffineWeight

    rows, cols = shape
    groups = -(-cols // config.group_size)
    codes = rng.integers(0, 1 << config.bits, size=(rows, groups * config.group_size))
    codes[:, cols:] = 0
    scale_codes, scale_meta = encode_meta(rng.uniform(0.001, 0.05, (rows, groups)).astype(np.float32), config.meta_bits)
    zero_codes, zero_meta = encode_meta(rng.uniform(0, 1 << config.bits, (rows, groups)).astype(np.float32),
                                        config.meta_bits)
    blobs = {"qweight": pack_codes(codes, config.bits), "scale_codes": scale_codes, "scale_meta": scale_meta,
             "zero_codes": zero_codes, "zero_meta": zero_meta}
    backend = SimpleNamespace(kernels=kernels, cache_dequantized=False)
    weight = AffineWeight(SimpleNamespace(name="bench", shape=shape, config=config, role="linear"), blobs, backend)
    arrays = (weight.packed, weight.scale_codes, weight.scale_meta, weight.zero_codes, weight.zero_meta)
    return arrays, weight, sum(a.nbytes for a in arrays)


def bench_config(kernels, label, shape, rounds=5) -> dict:
    import numpy as np

    from mxq.format_spec import StorageConfig
    from mxq.runtime.backends.cpu_stack import table_line
    from mxq.runtime.backends.cpu_weights import NO_COLS, NO_FLOAT, NO_RESIDUAL, NO_ROWS, NO_VALUES

    config = StorageConfig.parse(label)
    bits, group_size = config.bits, config.group_size
    rng = np.random.default_rng(0)
    first = random_matrix(rng, shape, config, kernels)
    nbytes = first[2]
    copies = [first] + [random_matrix(rng, shape, config, kernels) for _ in range(max(1, TOTAL_MIB * 2**20 // nbytes) - 1)]
    tables = [(np.array([table_line(weight, 0)], np.int64), weight) for _, weight, _ in copies]
    out_rows = np.arange(shape[0], dtype=np.int64)
    x = rng.standard_normal((1, shape[1])).astype(np.float32)
    y = np.empty((1, shape[0]), np.float32)

    def rows():  # the row kernel (cpu_kernels.affine_matmul_serial) on the file's packed rows
        for arrays, _, _ in copies:
            kernels.affine_matmul_serial(x, *arrays, bits, group_size, NO_ROWS, NO_COLS, NO_VALUES, NO_FLOAT,
                                         NO_RESIDUAL, y, 1)

    def tiles():  # decode's kernel: a one-matrix stack (cpu_stack_kernels.stack_matmul_serial) on the tiles
        for table, _ in tables:
            kernels.stack_matmul_serial(x, table, out_rows, NO_FLOAT, NO_RESIDUAL, y, 1)

    best = {"rows": float("inf"), "tiles": float("inf")}
    for kind in best:  # warm up
        {"rows": rows, "tiles": tiles}[kind]()
    for _ in range(rounds):  # alternated
        for kind, run in (("rows", rows), ("tiles", tiles)):
            t0 = time.perf_counter()
            run()
            best[kind] = min(best[kind], (time.perf_counter() - t0) / len(copies))
    return {"config": label, "us": best["tiles"] * 1e6, "rows_us": best["rows"] * 1e6,
            "gweights_s": shape[0] * shape[1] / best["tiles"] / 1e9, "gb_s": nbytes / best["tiles"] / 1e9,
            "bytes": nbytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1536x576", help="ROWSxCOLS of each matrix (default: SmolLM2's gate)")
    ap.add_argument("--configs", default=CONFIGS, help="comma-separated affine config labels (bBgG[mM])")
    ap.add_argument("--kernels", choices=("aot", "jit"), default="aot",
                    help="the kernels built ahead of time (default) or Numba's JIT")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    from mxq.format_spec import StorageConfig

    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        labels = [label.strip() for label in args.configs.split(",") if label.strip()]
        for label in labels:  # the config grammar's own parser; lean products of plain affine configs only
            config = StorageConfig.parse(label)
            if config.scheme != "affine" or config.outliers or config.outlier_percent:
                raise ValueError(f"{label!r} is not a plain affine config (bBgG[mM])")
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(args.shape)
    except ValueError as error:
        sys.exit(f"bench_kernels: not a shape or config label: {error}")

    from bench_decode import BANDWIDTH_MIB, measure_bandwidth

    from mxq.runtime.backends import cpu_aot, cpu_jit

    kernels = cpu_aot.load() if args.kernels == "aot" else cpu_jit._load_jit()
    if kernels is None or isinstance(kernels, str):
        sys.exit(f"bench_kernels: the {args.kernels} kernels are not available here ({kernels})")
    bandwidth = measure_bandwidth(1)["gb_s"]
    rows = [bench_config(kernels, label, shape) for label in labels]
    for row in rows:
        row["of_bandwidth"] = row["gb_s"] / bandwidth
    if args.json:
        print(json.dumps({"shape": shape, "kernels": args.kernels, "bandwidth_1t_gb_s": bandwidth, "configs": rows}))
        return
    print(f"{args.kernels} kernels, {shape[0]}x{shape[1]} matrices, one thread; read bandwidth of one thread "
          f"{bandwidth:.1f} GB/s (float32 GEMV / sum over {BANDWIDTH_MIB} MiB, this run)")
    print(f"{'config':8} {'rows µs':>8} {'tiles µs':>9} {'rows/tiles':>11} {'Gweights/s':>11} {'GB/s':>7} "
          f"{'of bandwidth':>13}")
    for row in rows:
        print(f"{row['config']:8} {row['rows_us']:8.1f} {row['us']:9.1f} {row['rows_us'] / row['us']:10.2f}x "
              f"{row['gweights_s']:11.2f} {row['gb_s']:7.2f} {100 * row['of_bandwidth']:12.0f}%")


if __name__ == "__main__":
    main()
