"""Row-interleaved tiles (the layout; cpu_tiles_kernels.py has the kernels that make and read them): how lean-mode decode keeps an affine matrix's codes for the compiled kernels.

The file stores each row's codes as one little-endian bit stream (SPEC.md §5), so a kernel that walks a row
must cut codes out of it, multiply them with x and end every row in a horizontal sum, and a 576-wide row
has only ~9 SIMD steps to spread that fixed work over (tools/bench_kernels.py: 14-30% of one thread's
read bandwidth for 2-4 bits). At load the codes are moved once into tiles of TILE_ROWS = 16 rows, laid out
so one 64-byte vector holds, for each of the 16 rows, 4 neighbouring columns' codes (llama.cpp's repacked
formats do the same): an integer multiply-add of that vector with the 4 columns' int8 activations
broadcast to every lane (AVX512-VNNI: one vpdpbusd with a broadcast memory operand; AVX2: the 16-bit
activations against the codes' even and odd bytes, two vpmaddwd per 32 bytes, or with 8-bit activations
($MXQ_ACTIVATIONS=8) one vpmaddubsw per 32 bytes, summed in int16 over several quads before one vpmaddwd
widens them) adds the 16 rows' partial dot products in 16 int32 lanes. No shuffles, no horizontal sums: each lane is a row.

Tile layout (per tile t, rows 16t .. 16t+15; rows past the matrix are zero codes):
    codes[t]  (n_blocks · 64 · bits) uint8, block after block of 32 columns. A b-bit code is split into
              a low part of PLANES[b][0] bits and a high part of PLANES[b][1] bits (3 = 2+1, 5 = 4+1,
              6 = 4+2; 2, 4, 8 have no high part); each part of width p fills p vectors of 64 bytes:
              byte 4·l + i of vector v holds, at bit j·p, the part of row l's code at column
              32·block + 4·(v·(8/p) + j) + i, for j < 8/p — so vector v carries 8/p column quads.
    scale_codes[t], zero_codes[t]  (G · 16) uint8: group k's 16 codes side by side (lane l at 16k + l).
The metadata runs (step, min per 128 values of the file's row-major (rows, G) codes, SPEC.md §6.2) stay
as they are, as one (runs · 4) float32 array: scale step, scale min, zero step, zero min per run. Lane l
of tile t at group k reads run ((16t + l)·G + k) >> 7, which changes for a lane only every 128 groups:
the kernel gathers a lane's pair only when its run changes.

Bytes: the same codes and metadata codes as the file, plus at most 15 padding rows per matrix.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...format_spec.layout import META_GROUP_SIZE
from .cpu_weights import ACTIVATION_BLOCK

TILE_ROWS = 16
BLOCK = ACTIVATION_BLOCK  # 32 columns: x's rounding block, and the columns of a tile's block of vectors
assert BLOCK == 32
PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 8: (8, 0)}  # bits → (low, high) part widths
META_SHIFT = META_GROUP_SIZE.bit_length() - 1  # metadata runs of 2^META_SHIFT values (SPEC.md §6.2)
assert 1 << META_SHIFT == META_GROUP_SIZE


# build repacks about this many bytes of a matrix's packed rows at a time, releasing them before the next: a
# quantized 49152×576 tied embedding (SmolLM2 --size 80MiB, 17.7 MB) was resident twice at load, file pages and tiles
REPACK_CHUNK_BYTES = 4 << 20


def n_tiles(rows: int) -> int:
    return -(-rows // TILE_ROWS)


class Tiles(NamedTuple):
    """One affine matrix in tiles (the module doc): codes (n_tiles, n_blocks · 64 · bits), scale_codes and
    zero_codes (n_tiles, G · 16) uint8, meta (runs · 4) float32."""
    codes: np.ndarray
    scale_codes: np.ndarray
    zero_codes: np.ndarray
    meta: np.ndarray


def build(packed, scale_codes, zero_codes, scale_meta, zero_meta, bits: int, repack, release=None) -> Tiles:
    """The tiles of a matrix stored as the file holds it: packed (R, C·bits/8) uint8, metadata codes (R, G) uint8,
    metadata runs (runs, 2) float32 each; repack: cpu_tiles_kernels.repack as the loaded kernels have it (this
    module imports no Numba: the kernels built ahead of time run without it). Repacked whole tiles' rows at a
    time, about REPACK_CHUNK_BYTES of packed rows each, and release(rows of packed) called after each chunk: the
    caller drops those file pages as the tiles that replace them fill (cpu_weights.release), so a big matrix
    is not resident twice at load."""
    R, G = scale_codes.shape
    n, n_cols = n_tiles(R), packed.shape[1] * 8 // bits
    codes = np.zeros((n, n_cols // BLOCK * 64 * bits), np.uint8)
    scale_tiles = np.zeros((n, G * TILE_ROWS), np.uint8)
    zero_tiles = np.zeros((n, G * TILE_ROWS), np.uint8)
    step = TILE_ROWS * max(1, REPACK_CHUNK_BYTES // (TILE_ROWS * packed.shape[1]))  # rows a chunk
    for r0 in range(0, R, step):
        r1, t0 = min(R, r0 + step), r0 // TILE_ROWS
        t1 = n_tiles(r1)
        repack(packed[r0:r1], scale_codes[r0:r1], zero_codes[r0:r1], bits, codes[t0:t1], scale_tiles[t0:t1],
               zero_tiles[t0:t1])
        if release is not None:
            release(packed[r0:r1])
    meta = np.ascontiguousarray(np.concatenate([scale_meta, zero_meta], axis=1), dtype=np.float32).reshape(-1)
    return Tiles(codes, scale_tiles, zero_tiles, meta)
