"""Tiles of 16 rows (runtime/backends/cpu_tiles.py): the layout repack writes is the one the module documents
(decoded here with NumPy from the doc's formula, for every bit width, padding rows included), tile_dequantize
reads rows back from it exactly, and products
whose rows cross many metadata runs (a lane's run changes several times along a row) match the NumPy path.
The products of every config, rows matrices, outliers, bias, residual and the parallel parts are in
test_cpu_stack.py, which multiplies through the tiles."""
from __future__ import annotations

import numpy as np
import pytest

from mxq.format_spec import pack_codes
from mxq.runtime.backends import cpu_tiles
from mxq.runtime.backends.cpu_tiles import BLOCK, PLANES, TILE_ROWS, build, n_tiles
from test_cpu_kernels import backends  # noqa: F401 - the fixture
from test_cpu_stack import check_stack

pytest.importorskip("numba")


def documented_codes(tiles, rows: int, n_cols: int, bits: int) -> np.ndarray:
    """(rows, n_cols) codes read back from tiles by the module doc's formula: byte 4·l + i of vector v of a
    part of width p holds, at bit j·p, the part of row l's code at column 32·block + 4·(v·(8/p) + j) + i."""
    low, high = PLANES[bits]
    out = np.zeros((n_tiles(rows) * TILE_ROWS, n_cols), np.int64)
    for t in range(tiles.codes.shape[0]):
        for c in range(n_cols):
            block, q, i = c // BLOCK, (c % BLOCK) // 4, c % 4
            base = block * 64 * bits
            for first_vector, width, shift in ((0, low, 0), (low, high, low)):
                if not width:
                    continue
                v, j = divmod(q, 8 // width)
                lanes = tiles.codes[t, base + 64 * (first_vector + v) + 4 * np.arange(TILE_ROWS) + i]
                out[t * TILE_ROWS:(t + 1) * TILE_ROWS, c] |= ((lanes.astype(np.int64) >> (j * width)) & ((1 << width) - 1)) << shift
    return out


@pytest.mark.parametrize("bits", sorted(PLANES))
def test_repack_writes_the_documented_layout(backends, bits):
    fast, _ = backends
    rng = np.random.default_rng(bits)
    rows, n_cols, groups = 37, 96, 3  # 37 rows: the last tile has 11 padding rows
    codes = rng.integers(0, 1 << bits, (rows, n_cols)).astype(np.uint8)
    packed = pack_codes(codes, bits).view(np.uint8).reshape(rows, -1)
    scale_codes = rng.integers(0, 256, (rows, groups)).astype(np.uint8)
    zero_codes = rng.integers(0, 256, (rows, groups)).astype(np.uint8)
    meta = rng.random((1, 2)).astype(np.float32)
    tiles = build(packed, scale_codes, zero_codes, meta, 2 * meta, bits, fast.kernels.repack)
    assert tiles.codes.shape == (3, n_cols // BLOCK * 64 * bits)  # the file's bytes, in 16-row tiles
    got = documented_codes(tiles, rows, n_cols, bits)
    assert np.array_equal(got[:rows], codes) and not got[rows:].any()
    for name, want in (("scale_codes", scale_codes), ("zero_codes", zero_codes)):  # group k's lanes side by side
        lanes = getattr(tiles, name).reshape(3, groups, TILE_ROWS).transpose(0, 2, 1).reshape(-1, groups)
        assert np.array_equal(lanes[:rows], want) and not lanes[rows:].any()
    assert np.array_equal(tiles.meta.reshape(-1, 4), np.concatenate([meta, 2 * meta], axis=1))


def test_tiles_are_built_a_chunk_of_rows_at_a_time(backends, monkeypatch):
    """build repacks whole tiles' rows a chunk at a time and hands each chunk's file rows to release before the
    next (so a big matrix's file pages and tiles are not resident together): the tiles of a build in one piece."""
    fast, _ = backends
    rng = np.random.default_rng(11)
    rows, n_cols, groups, bits = 37, 96, 3, 5
    packed = pack_codes(rng.integers(0, 1 << bits, (rows, n_cols)).astype(np.uint8), bits).view(np.uint8).reshape(rows, -1)
    scale_codes, zero_codes = (rng.integers(0, 256, (rows, groups)).astype(np.uint8) for _ in range(2))
    meta = rng.random((1, 2)).astype(np.float32)
    whole = build(packed, scale_codes, zero_codes, meta, meta, bits, fast.kernels.repack)
    released = []
    monkeypatch.setattr(cpu_tiles, "REPACK_CHUNK_BYTES", 1)  # a tile's rows a chunk
    chunked = build(packed, scale_codes, zero_codes, meta, meta, bits, fast.kernels.repack,
                    lambda part: released.append((part.base is not None, part.shape[0], part.flags.c_contiguous)))
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked))
    assert released == [(True, 16, True), (True, 16, True), (True, 5, True)]  # views of the packed rows, in order


@pytest.mark.parametrize("bits", sorted(PLANES))
def test_tile_dequantize_reads_back_the_rows_the_file_holds(backends, bits):
    """An embedding whose codes moved into tiles is looked up there: rows (in any order, repeated) come back as
    (code − zero)·scale exactly as SPEC.md §6.1-6.2 decode them from the file, metadata runs crossed."""
    fast, _ = backends
    rng = np.random.default_rng(10 + bits)
    rows, n_cols, group_size = 45, 96, 32
    groups = n_cols // group_size  # 45 · 3 = 135 metadata values: two runs
    codes = rng.integers(0, 1 << bits, (rows, n_cols)).astype(np.uint8)
    packed = pack_codes(codes, bits).view(np.uint8).reshape(rows, -1)
    scale_codes, zero_codes = (rng.integers(0, 256, (rows, groups)).astype(np.uint8) for _ in range(2))
    scale_meta, zero_meta = (rng.random((2, 2)).astype(np.float32) for _ in range(2))
    tiles = build(packed, scale_codes, zero_codes, scale_meta, zero_meta, bits, fast.kernels.repack)
    ids = np.array([44, 0, 17, 17, 31, 2], np.int64)
    out = np.empty((ids.size, n_cols), np.float32)
    fast.kernels.tile_dequantize(*tiles, ids, bits, group_size, out)
    run = (ids[:, None] * groups + np.arange(groups)) // 128  # (R, G)
    scale = scale_codes[ids].astype(np.float32) * scale_meta[run, 0] + scale_meta[run, 1]
    zero = zero_codes[ids].astype(np.float32) * zero_meta[run, 0] + zero_meta[run, 1]
    want = (codes[ids].astype(np.float32).reshape(ids.size, groups, group_size) - zero[..., None]) * scale[..., None]
    assert np.array_equal(out, want.reshape(ids.size, n_cols))


def test_rows_across_many_metadata_runs_match_numpy_path(backends):
    """4352 columns at g32: 136 groups a row, so every lane's metadata run (128 values) changes once or twice
    along its row, at other groups in different lanes."""
    fast, ref = backends
    rng = np.random.default_rng(5)
    check_stack(fast, ref, rng, 4352, ["b3g32+o1", "rows(20:b5g32,19:b2g64)", "b8g32"], tokens=(1, 2))
