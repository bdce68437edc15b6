"""Compiled CPU kernels (Numba) of the kernel stacks (cpu_stack.py): several matrices times one input in one call.

    stack_matmul(x, table, out_rows, bias, residual, y, n_parts)   y (T, width) = x̂ @ [every entry]ᵀ + bias
                                                                   + residual
    stack_matmul_serial(... the same ...)                          on the calling thread only
    (cpu_team_kernels.stack_matmul_team: the same on decode's team of threads)

x is rounded once (cpu_kernels.tile_x: high and low int8 in the natural column order, a step and a sum of x̂ per block
of 32), then every entry of the table runs its own kind's rows (cpu_stack.py, its table):
  * KIND_AFFINE: an affine matrix's tiles of 16 rows (cpu_kernels.tile_rows_for, cpu_tiles.py);
  * KIND_VQ_GRID: a 4-D vq matrix with its codebook on the 8-bit grid, from the file's packed rows
    (cpu_vq_kernels.grid_part: a row's points gathered into an 8-bit row, multiplied as an affine row with zero 128).
    The affine row kernels' activation order for 8-bit codes (cpu_kernels.layout_x) is the natural one, so tile_x's
    high and low serve both kinds; the sums of x̂ per weight group that the grid rows take are the blocks' sums added
    per group (group_xsum: the same float32 additions as layout_x's), so a vq entry's rows equal its handle's own
    kernel's (cpu_vq_kernels.vq_grid_matmul) exactly.
Stored row r of an entry goes to column out_rows[first + r] of y (and of bias and residual).

Parallel and team parts (stack_part_units): the entries' units of 16 rows taken as one sequence, entry after entry,
each unit weighted by its cost (unit_cost: the bytes it reads; a vq grid byte VQ_GRID_BYTE_COST affine tile
bytes), cut into n_parts stretches of about equal cost, so a part touches only the entries its stretch overlaps.
Parts write stored rows to a stage (staged entries), and unstage adds bias and residual and puts them in place.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .cpu_kernels import BLOCK, PARALLEL, SERIAL, padded_groups, pointer, repack, tile_rows_for, tile_x
from .cpu_stack import (BITS, BOOK, CODES, COLS, FIELDS, FIRST, GRID_STEP, GROUP_SIZE, GROUPS, KIND, KIND_AFFINE,
                        KIND_VQ_GRID, META, NNZ, ROW_PTR, ROW_PTR_SIZE, ROWS, RUNS, SCALES, STRIDE, VALUES, ZEROS)
from .cpu_tiles import TILE_ROWS
from .cpu_vq_kernels import grid_part
from .cpu_weights import NO_COLS, NO_FLOAT, NO_MAP, NO_RESIDUAL, NO_ROWS, NO_VALUES, readonly

# What a byte of a vq grid entry costs against a byte of an affine tile, for cutting a stack into parts of equal time:
# a grid row gathers its points (one 32-bit gather per 4 weights), a tile streams its codes. Measured per packed byte
# (tools/bench_vq.py --shapes 576x1536,1536x576 --tokens 1 --threads 1, one-matrix stacks): v3d4g64s 10.6x and 12x
# b4g64's, v2d4g64 12.6x. (SmolLM2's 3.5-bpw default decoded alike with 3, 10 and 16 here: within ±5% noise.)
VQ_GRID_BYTE_COST = 10


@njit(**SERIAL)
def unit_count(table, i):
    """Entry i's units of TILE_ROWS rows (an affine entry's tiles; the last one may be partial)."""
    return -(-table[i, ROWS] // TILE_ROWS)


@njit(**SERIAL)
def unit_cost(table, i):
    """What one unit of entry i costs (module doc): the bytes it reads, vq grid bytes weighted."""
    if table[i, KIND] == KIND_AFFINE:
        return table[i, STRIDE]
    return TILE_ROWS * table[i, STRIDE] * VQ_GRID_BYTE_COST


@njit(**SERIAL)
def csr(table, i):
    """Entry i's CSR outliers: row_ptr uint32, cols uint16, values (fp16 bits) uint16."""
    return (carray(pointer(table[i, ROW_PTR]), (table[i, ROW_PTR_SIZE],), np.uint32),
            carray(pointer(table[i, COLS]), (table[i, NNZ],), np.uint16),
            carray(pointer(table[i, VALUES]), (table[i, NNZ],), np.uint16))


@njit(**SERIAL)
def affine_entry(table, i, x_parts, x_hat, out_rows, bias, residual, y):
    """Affine entry i as tile_rows_for's arguments: (w, bits, group_size), its arrays viewed at the table's
    addresses; x_parts: tile_x's."""
    R, G, bits, group_size = table[i, ROWS], table[i, GROUPS], table[i, BITS], table[i, GROUP_SIZE]
    n = unit_count(table, i)
    codes = carray(pointer(table[i, CODES]), (n, table[i, STRIDE]), np.uint8)
    scale_tiles = carray(pointer(table[i, SCALES]), (n, G * TILE_ROWS), np.uint8)
    zero_tiles = carray(pointer(table[i, ZEROS]), (n, G * TILE_ROWS), np.uint8)
    meta = carray(pointer(table[i, META]), (4 * table[i, RUNS],), np.float32)
    row_ptr, cols, values = csr(table, i)
    high, low, dx, xsum = x_parts
    first = table[i, FIRST]
    w = (codes, scale_tiles, zero_tiles, meta, row_ptr, cols, values, bias, residual, y, high, low, dx, xsum, x_hat,
         out_rows[first:first + R], R)
    return w, bits, group_size


@njit(**SERIAL)
def group_xsum(xsum, n_groups, group_size):
    """tile_x's sums of x̂ per block (T, blocks) → per weight group (T, padded_groups(G)), zeros past G (as
    layout_x's)."""
    T = xsum.shape[0]
    per_group = group_size // BLOCK
    out = np.zeros((T, padded_groups(n_groups)), np.float32)
    for t in range(T):
        for b in range(n_groups * per_group):
            out[t, b // per_group] += xsum[t, b]
    return out


@njit(**SERIAL)
def grid_entry(table, i, x_parts, x_hat, out_rows, bias, residual, y):
    """Vq grid entry i as cpu_vq_kernels.grid_part's arguments: (a, index_bits, group_size, pair)."""
    R, G, index_bits, group_size = table[i, ROWS], table[i, GROUPS], table[i, BITS], table[i, GROUP_SIZE]
    packed = carray(pointer(table[i, CODES]), (R, table[i, STRIDE]), np.uint8)
    scale_codes = carray(pointer(table[i, SCALES]), (R, G), np.uint8)
    book = carray(pointer(table[i, BOOK]), (1 << index_bits, 4), np.uint8)
    scale_meta = carray(pointer(table[i, META]), (table[i, RUNS], 2), np.float32)
    grid_step = np.float32(table[i].view(np.float64)[GRID_STEP])
    row_ptr, cols, values = csr(table, i)
    high, low, dx, xsum = x_parts
    first = table[i, FIRST]
    pair = (G * group_size // BLOCK) % 2 == 0
    a = (packed, book, grid_step, scale_codes, scale_meta, row_ptr, cols, values, bias, residual, y, high, low, dx,
         group_xsum(xsum, G, group_size), x_hat, out_rows[first:first + R])
    return a, index_bits, group_size, pair


@njit(**SERIAL)
def entry_units(table, i, u0, u1, x_parts, x_hat, out_rows, bias, residual, y):
    """Units u0 .. u1-1 of entry i, as its kind computes them, into y's columns out_rows[first + r]."""
    if table[i, KIND] == KIND_VQ_GRID:
        a, index_bits, group_size, pair = grid_entry(table, i, x_parts, x_hat, out_rows, bias, residual, y)
        grid_part(u0 * TILE_ROWS, min(table[i, ROWS], u1 * TILE_ROWS), a, index_bits, group_size, pair)
    else:
        w, bits, group_size = affine_entry(table, i, x_parts, x_hat, out_rows, bias, residual, y)
        tile_rows_for(u0, u1, w, bits, group_size)


@njit(**SERIAL)
def staged_units(table, i, u0, u1, x_parts, x_hat, stage):
    """entry_units for the parallel stack kernels: entry i's stored row r goes to stage[:, first + r], without
    bias or residual (unstage adds them and puts the rows in their places). Why: a rows matrix's stored rows
    land all over y, so parts writing y directly share its cache lines; in stored order each part writes
    its own stretch. (SmolLM2 on two threads: 1.17-1.57x faster stacks with a layer's weights in cache,
    level when the weights stream from memory as in decode.)"""
    T, width = stage.shape
    # y[t, r] = stage[t, first + r] for the entry's r < rows (the view's last row reaches past the stage: unused)
    y = carray(pointer(stage.ctypes.data + 4 * table[i, FIRST]), (T, width), np.float32)
    entry_units(table, i, u0, u1, x_parts, x_hat, NO_MAP, NO_FLOAT, NO_RESIDUAL, y)


@njit(**SERIAL)
def stack_part_units(table, x_parts, x_hat, stage, part, n_parts):
    """Part `part` of n_parts of a stack's units, written to the stage (staged_units): the entries' units taken as one
    sequence, entry after entry, each weighted by unit_cost, cut into n_parts stretches of about equal cost; a unit
    belongs to the part its start falls in, so a part touches only the entries its stretch overlaps. (Each part a
    share of every entry instead gave part 0 the larger share of every entry: 5 of a 144-row block's 9 tiles, 2 of a
    48-row block's 3 — SmolLM2's q/k/v stack 36 of 60 tiles — and every part paid every entry's setup.)"""
    total = 0
    for i in range(table.shape[0]):
        total += unit_count(table, i) * unit_cost(table, i)
    first, end = part * total // n_parts, (part + 1) * total // n_parts  # this part's stretch of the sequence
    base = 0  # entry i's first unit's start in the sequence
    for i in range(table.shape[0]):
        n, cost = unit_count(table, i), unit_cost(table, i)
        u0 = min(n, max(0, -(-(first - base) // cost)))  # the units whose start base + u·cost lies in [first, end)
        u1 = min(n, max(0, -(-(end - base) // cost)))
        if u0 < u1:
            staged_units(table, i, u0, u1, x_parts, x_hat, stage)
        base += n * cost


@njit(**SERIAL)
def unstage(stage, out_rows, bias, residual, y):
    """y[t, out_rows[j]] = stage[t, j] + bias + residual (staged_units' rows in their places)."""
    T, width = stage.shape
    has_bias, has_residual = bias.size > 0, residual.size > 0
    for t in range(T):
        for j in range(width):
            o = out_rows[j]
            acc = stage[t, j]
            if has_bias:
                acc += bias[o]
            if has_residual:
                acc += residual[t, o]
            y[t, o] = acc


@njit(**SERIAL)
def stack_blocks(table):
    """The most activation blocks any entry's padded width has (tile_x rounds that many once)."""
    n = 0
    for i in range(table.shape[0]):
        n = max(n, table[i, GROUPS] * table[i, GROUP_SIZE] // BLOCK)
    return n


@njit(**PARALLEL)
def stack_matmul(x, table, out_rows, bias, residual, y, n_parts):
    """y (T, width) = x (T, in) @ [every entry of the stack table]ᵀ + bias + residual, each entry's stored
    row r written to column out_rows[first + r] (cpu_stack.py); x rounded once; then ONE parallel region,
    each of n_parts parts taking its stretch of the entries' units (stack_part_units). (A region per entry — a rows
    matrix's every block — woke the workers up to 12 times a call: SmolLM2's decode with every product parallel,
    OMP_WAIT_POLICY=active, 2 threads, ran 10–13% slower in three paired runs, e.g. 77.3 vs 85.6 tok/s.)"""
    high, low, dx, xsum, x_hat = tile_x(x, stack_blocks(table))
    x_parts = (high, low, dx, xsum)
    stage = np.empty(y.shape, np.float32)
    for part in prange(n_parts):
        stack_part_units(table, x_parts, x_hat, stage, part, n_parts)
    unstage(stage, out_rows, bias, residual, y)


@njit(**SERIAL)
def stack_matmul_serial(x, table, out_rows, bias, residual, y, n_parts):
    """stack_matmul on the calling thread; n_parts unused."""
    high, low, dx, xsum, x_hat = tile_x(x, stack_blocks(table))
    x_parts = (high, low, dx, xsum)
    for i in range(table.shape[0]):
        entry_units(table, i, 0, unit_count(table, i), x_parts, x_hat, out_rows, bias, residual, y)


_EXAMPLE_ARRAYS = []  # what example tables point to, kept alive


def _address(a: np.ndarray) -> int:
    _EXAMPLE_ARRAYS.append(a)
    return a.__array_interface__["data"][0]


def example_table(packed, codes, meta, bits, group_size) -> np.ndarray:
    """A one-line stack table (cpu_stack.py) of an affine entry for these arrays (scales and zeros both `codes` and
    `meta`)."""
    from .cpu_tiles import build

    tiles = build(packed, codes, codes, meta, meta, bits, repack)
    _EXAMPLE_ARRAYS.append(tiles)
    line = dict.fromkeys(FIELDS, 0)
    line.update(kind=KIND_AFFINE, rows=packed.shape[0], groups=codes.shape[1], bits=bits, group_size=group_size,
                stride=tiles.codes.shape[1], codes=_address(tiles.codes), scales=_address(tiles.scale_codes),
                zeros=_address(tiles.zero_codes), meta=_address(tiles.meta), row_ptr=_address(NO_ROWS),
                cols=_address(NO_COLS), values=_address(NO_VALUES), runs=meta.shape[0], row_ptr_size=1)
    return np.array([[line[name] for name in FIELDS]], np.int64)


def example_grid_line(rng, rows, n_in, index_bits, first) -> list[int]:
    """A stack table line of a vq grid entry: `rows` random packed rows of n_in inputs (word-padded, format 1.8), groups
    of 32, a random grid codebook."""
    from ...format_spec.packing import word_unit

    unit = word_unit(index_bits)
    n_slots = -(-(-(-n_in // 4)) // unit) * unit
    packed = readonly(rng.integers(0, 256, (rows, n_slots * index_bits // 8)).astype(np.uint8))
    book = readonly(rng.integers(1, 256, (1 << index_bits, 4)).astype(np.uint8))
    scale_codes = readonly(rng.integers(0, 256, (rows, -(-n_in // 32))).astype(np.uint8))
    scale_meta = readonly(np.full((1, 2), 0.01, np.float32))
    line = dict.fromkeys(FIELDS, 0)
    line.update(kind=KIND_VQ_GRID, rows=rows, groups=scale_codes.shape[1], bits=index_bits, group_size=32,
                stride=packed.shape[1], codes=_address(packed), scales=_address(scale_codes), book=_address(book),
                meta=_address(scale_meta), row_ptr=_address(NO_ROWS), cols=_address(NO_COLS),
                values=_address(NO_VALUES), runs=1, row_ptr_size=1, first=first,
                grid_step=int(np.array(1 / 64, np.float64).view(np.int64)))
    return [int(line[name]) for name in FIELDS]


def examples():
    """(kernel name, arguments) typed as KernelStack calls them (see cpu_kernels.examples): a stack of a 4-bit affine
    matrix (its rows reversed) and a 12-bit vq grid matrix of 3 rows each, 40 inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    packed = readonly(rng.integers(0, 256, (3, 2 * 32 * 4 // 8)).astype(np.uint8))
    codes = readonly(rng.integers(0, 256, (3, 2)).astype(np.uint8))
    table = np.concatenate([example_table(packed, codes, np.full((1, 2), 0.01, np.float32), 4, 32),
                            np.array([example_grid_line(rng, 3, 40, 12, 3)], np.int64)])
    out_rows = np.array([2, 1, 0, 3, 4, 5], np.int64)
    for name in ("stack_matmul", "stack_matmul_serial"):
        yield name, (x, table, out_rows, NO_FLOAT, NO_RESIDUAL, np.empty((1, 6), np.float32), 2)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the stacks use."""
    for name, args in examples():
        globals()[name](*args)
