"""How fast could a CPU decode a trellis-coded matrix (tools/proto_trellis.py's bitshift trellis)? A prototype
GEMV in Numba's JIT against the affine b4 kernels decode runs on the same shape (tools/bench_vq.py's handles:
the rows kernel and the tile kernel) and against this machine's memory read bandwidth, all measured in one run.

The layout a scheme would store: each row one bit stream, least significant bit first, padded to whole 32-bit
words; its first L bits are the first window, then K new bits per weight, so weight t's window is bits
[t·K, t·K + L): the new K bits on top, the previous window's top L − K bits below — proto_trellis.py's
trellis with each window's bits reversed (its new bits come in at the bottom), i.e. its table permuted.
Weight t = scale[group] × table[window], with one table of 2^L levels (float32 here, 16 KiB at L = 12,
L1-resident) and one float32 scale per 64 weights (a file would store 6-bit codes under a row maximum).
The table kernel walks each row's stream through a 64-bit buffer refilled a word at a time, four windows per
step, one table load per weight into four partial sums; rows are split over threads (prange). (With one
partial sum, the multiply-add chain held it at ~0.93 ns per weight: 4096x4096 took 15.6 ms on one thread.)
The "1mad" kernel computes each level from its window instead (QTIP's 1MAD code: an LCG step and the sum of its
four bytes, tools/proto_trellis_milp.py --code 1mad) and reads every window straight from its bit offset.

    python tools/proto_trellis_decode.py [--shapes 576x1536,1536x576,4096x4096] [--K 2,3,4,5] [--L 12]
                                         [--threads 1,2] [--rounds 7] [--calls 30]

Columns: µs per call (median of calls timed alone, kinds interleaved), the bytes a call reads, × the memory
limit, and the ratio to the affine b4g64 rows kernel and to its tile kernel (decode's). A check decodes one
matrix in NumPy and compares the products first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))
sys.path.insert(0, str(REPO / "tools"))

import numba  # noqa: E402
import numpy as np  # noqa: E402

GROUP = 64


@numba.njit(fastmath=True, cache=False, inline="always")
def _row_dot(words, base, scales, sbase, table, x, n, K, L):
    """Σ_t scale[t / GROUP]·table[window t]·x[t] over one row: four windows per step out of the buffer, into four
    partial sums (independent table loads and multiply-adds; the buffer's shifts are the only chain)."""
    mask = (np.uint64(1) << np.uint64(L)) - np.uint64(1)
    k = np.uint64(K)
    buf, have, w = np.uint64(0), 0, base
    total = np.float32(0.0)
    for g in range(0, n, GROUP):
        a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        end = min(g + GROUP, n)
        t = g
        while t + 4 <= end:
            if have < L + 3 * K:  # ≤ 58 bits held after the refill for K ≤ 5, L ≤ 12
                buf |= np.uint64(words[w]) << np.uint64(have)
                w += 1
                have += 32
            a0 += table[buf & mask] * x[t]
            a1 += table[(buf >> k) & mask] * x[t + 1]
            a2 += table[(buf >> (k + k)) & mask] * x[t + 2]
            a3 += table[(buf >> (k + k + k)) & mask] * x[t + 3]
            buf >>= k + k + k + k
            have -= 4 * K
            t += 4
        while t < end:
            if have < L:
                buf |= np.uint64(words[w]) << np.uint64(have)
                w += 1
                have += 32
            a0 += table[buf & mask] * x[t]
            buf >>= k
            have -= K
            t += 1
        total += scales[sbase + g // GROUP] * ((a0 + a1) + (a2 + a3))
    return total


@numba.njit(fastmath=True, cache=False, inline="always")
def _row_dot_1mad(words, base, scales, sbase, x, n, K, L):
    """The same sum with levels computed from the window (QTIP's 1MAD: an LCG step, the sum of its four bytes)
    and every window read straight from its bit offset (two words), so no step depends on the one before."""
    mask = np.uint64((1 << L) - 1)
    total = np.float32(0.0)
    for g in range(0, n, GROUP):
        acc = np.float32(0.0)
        for t in range(g, min(g + GROUP, n)):
            bit = t * K
            i = base + (bit >> 5)
            v = ((np.uint64(words[i]) | (np.uint64(words[i + 1]) << np.uint64(32))) >> np.uint64(bit & 31)) & mask
            h = (v * np.uint64(34038481) + np.uint64(76625530)) & np.uint64(0xFFFFFFFF)
            level = np.float32((h & np.uint64(255)) + ((h >> np.uint64(8)) & np.uint64(255))
                               + ((h >> np.uint64(16)) & np.uint64(255)) + (h >> np.uint64(24))) - np.float32(510.0)
            acc += level * x[t]
        total += scales[sbase + g // GROUP] * acc
    return total * np.float32(1.0 / 147.800537)


@numba.njit(fastmath=True, parallel=True, cache=False)
def trellis_gemv_1mad(words, words_per_row, scales, x, y, K, L):
    rows, n = y.shape[0], x.shape[0]
    groups = (n + GROUP - 1) // GROUP
    for r in numba.prange(rows):
        y[r] = _row_dot_1mad(words, r * words_per_row, scales, r * groups, x, n, K, L)


@numba.njit(fastmath=True, cache=False)
def trellis_gemv_1mad_serial(words, words_per_row, scales, x, y, K, L):
    rows, n = y.shape[0], x.shape[0]
    groups = (n + GROUP - 1) // GROUP
    for r in range(rows):
        y[r] = _row_dot_1mad(words, r * words_per_row, scales, r * groups, x, n, K, L)


def one_mad(L):
    """(2^L,) the levels _row_dot_1mad computes, for every window (QTIP's 1MAD code: an LCG step, then the sum of
    its four bytes, which is near Gaussian; unit variance): tools/proto_trellis_milp.py --code 1mad codes with them."""
    v = (np.arange(1 << L, dtype=np.uint64) * np.uint64(34038481) + np.uint64(76625530)) & np.uint64(0xFFFFFFFF)
    return (sum((v >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)).astype(np.float64) - 510.0) / 147.800537


@numba.njit(fastmath=True, parallel=True, cache=False)
def trellis_gemv(words, words_per_row, scales, table, x, y, K, L):
    rows, n = y.shape[0], x.shape[0]
    groups = (n + GROUP - 1) // GROUP
    for r in numba.prange(rows):
        y[r] = _row_dot(words, r * words_per_row, scales, r * groups, table, x, n, K, L)


@numba.njit(fastmath=True, cache=False)
def trellis_gemv_serial(words, words_per_row, scales, table, x, y, K, L):
    rows, n = y.shape[0], x.shape[0]
    groups = (n + GROUP - 1) // GROUP
    for r in range(rows):
        y[r] = _row_dot(words, r * words_per_row, scales, r * groups, table, x, n, K, L)


def random_trellis(rng, shape, K, L):
    """(words (rows·words_per_row + 1,) uint32, words_per_row, scales (rows·groups,) float32, table (2^L,) float32):
    a random bit stream per row (its padding bits zero) and one zero word past the last row, which the 1MAD kernel
    reads as a last window's second word."""
    rows, n = shape
    bits = K * n + (L - K)
    words_per_row = -(-bits // 32)
    words = rng.integers(0, 1 << 32, size=(rows, words_per_row), dtype=np.uint64)
    if bits % 32:
        words[:, -1] &= (1 << (bits % 32)) - 1
    words = np.append(words.astype(np.uint32).reshape(-1), np.uint32(0))
    scales = rng.uniform(0.001, 0.05, rows * (-(-n // GROUP))).astype(np.float32)
    return words, words_per_row, scales, rng.standard_normal(1 << L).astype(np.float32)


def windows_of(words, words_per_row, shape, K, L):
    """(rows, n) int64: the window of every weight, bits [t·K, t·K + L) of its row's stream (the layout above)."""
    rows, n = shape
    stream = np.unpackbits(words[:rows * words_per_row].view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    place = (1 << np.arange(L)).astype(np.int64)
    return np.stack([stream[:, t * K:t * K + L].astype(np.int64) @ place for t in range(n)], 1)


def check(K, L):
    rng = np.random.default_rng(3)
    shape = (37, 203)  # a partial last group, and a length not a multiple of 4
    words, wpr, scales, table = random_trellis(rng, shape, K, L)
    windows = windows_of(words, wpr, shape, K, L)
    per_weight = np.repeat(scales.reshape(shape[0], -1), GROUP, axis=1)[:, :shape[1]]
    x = rng.standard_normal(shape[1]).astype(np.float32)
    y = np.empty(shape[0], np.float32)
    trellis_gemv(words, wpr, scales, table, x, y, K, L)
    if not np.allclose(y, (table[windows] * per_weight) @ x, rtol=1e-4, atol=1e-4):
        sys.exit(f"proto_trellis_decode: the kernel disagrees with NumPy at K {K}")
    trellis_gemv_1mad(words, wpr, scales, x, y, K, L)
    if not np.allclose(y, (one_mad(L)[windows] * per_weight) @ x, rtol=1e-4, atol=1e-4):
        sys.exit(f"proto_trellis_decode: the 1MAD kernel disagrees with NumPy at K {K}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="OUTxIN, comma-separated")
    ap.add_argument("--K", default="2,3,4,5")
    ap.add_argument("--L", type=int, default=12)
    ap.add_argument("--threads", default=None, help="thread counts (default: 1 and all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    Ks = [int(k) for k in args.K.split(",")]

    from bench_decode import measure_bandwidth
    from bench_vq import Bench, affine_runs, median_times

    from mxq.runtime.backends import cpu_jit

    for K in Ks:
        check(K, args.L)
    kernels = cpu_jit._load_jit()
    if isinstance(kernels, str):
        sys.exit(f"proto_trellis_decode: Numba's JIT kernels are not available here ({kernels})")
    most = numba.config.NUMBA_NUM_THREADS
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, most})
    bandwidth = {t: measure_bandwidth(t)["gb_s"] for t in thread_counts}
    print("read bandwidth (GB/s, this run): " + ", ".join(f"{t} thread(s) {bw:.1f}" for t, bw in bandwidth.items()))
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.standard_normal((1, shape[1])).astype(np.float32)
        y = np.empty((1, shape[0]), np.float32)
        runs = affine_runs(kernels, Bench(kernels), rng, shape, 4, GROUP)  # "b4g64" (rows kernel), "b4g64 tiles"
        for K in Ks:
            words, wpr, scales, table = random_trellis(rng, shape, K, args.L)

            def run(x, y, n_parts, parallel, words=words, wpr=wpr, scales=scales, table=table, K=K):
                (trellis_gemv if parallel else trellis_gemv_serial)(words, wpr, scales, table, x[0], y[0], K, args.L)

            def run_1mad(x, y, n_parts, parallel, words=words, wpr=wpr, scales=scales, K=K):
                (trellis_gemv_1mad if parallel else trellis_gemv_1mad_serial)(words, wpr, scales, x[0], y[0], K, args.L)

            runs[f"trellis K{K}"] = (words.nbytes + scales.nbytes // 4 + table.nbytes, run)  # 8-bit scales' worth
            runs[f"1mad K{K}"] = (words.nbytes + scales.nbytes // 4, run_1mad)
        for threads in thread_counts:
            numba.set_num_threads(threads)
            timed = median_times(runs, x, y, threads, args.rounds, args.calls)
            bw = bandwidth[threads]
            med = {label: seconds * 1e6 for label, (seconds, _) in timed.items()}
            print(f"\n{shape[0]}x{shape[1]}, 1 token, {threads} thread(s)")
            print(f"  {'kind':14} {'µs':>9} {'KiB':>8} {'×memory':>8} {'×b4 rows':>9} {'×b4 tiles':>10}")
            for label, (nbytes, _) in runs.items():
                limit = nbytes / (bw * 1e9) * 1e6
                print(f"  {label:14} {med[label]:9.1f} {nbytes / 1024:8.0f} {med[label] / limit:8.2f} "
                      f"{med[label] / med['b4g64']:9.2f} {med[label] / med['b4g64 tiles']:10.2f}")


if __name__ == "__main__":
    main()
