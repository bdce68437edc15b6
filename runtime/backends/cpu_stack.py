"""Several affine matrices that multiply one input, as ONE compiled call (lean-mode decode on the CPU).

A decoder layer multiplies the same normed x by q, k and v, and by gate and up; a `rows` matrix
(row_blocks.py) is several blocks, each its own affine matrix. Each product as its own kernel call
costs ~6 µs of per-call work (argument unboxing, rounding x) and ~3 µs of Python on top of the
weights' ~8 µs (SmolLM2's 576×576 at 4 bits), and a rows matrix adds a gather. A KernelStack lists
every member's affine pieces in one int64 table — one line per piece:

    rows, groups, bits, group_size, tile_bytes         the piece's shape and config
    tiles, scale_tiles, zero_tiles, meta,              addresses of its arrays: the handle's tiles
    row_ptr, cols, values                              (cpu_tiles.py) and the file's CSR outliers
    runs, row_ptr_size, nnz                            their lengths
    first                                              its first entry in out_rows

and cpu_kernels.stack_matmul rounds x once, then runs every piece's tiles of 16 rows, writing stored row r of a piece straight to
column out_rows[first + r] of y (T, width): members side by side in the order
given, a rows matrix's rows in their logical order (its row_order: no gather). The handles keep the
arrays alive: the stack holds the handles. Pieces that are not affine (fp16, lut, vq blocks) have no
table line: such members are multiplied one by one as before (KernelStack.of returns None).

The NumPy path of a stack (no kernels, or a kernel failed) is its members' own products put side by
side: the same reference as multiplying them one by one.
"""
from __future__ import annotations

import numpy as np

from .cpu_weights import NO_COLS, NO_ROWS, NO_VALUES, AffineWeight, Matrix, kernel_extras

FIELDS = ("rows", "groups", "bits", "group_size", "tile_bytes", "tiles", "scale_tiles", "zero_tiles", "meta", "row_ptr",
          "cols", "values", "runs", "row_ptr_size", "nnz", "first")
(ROWS, GROUPS, BITS, GROUP_SIZE, TILE_BYTES, TILES, SCALE_TILES, ZERO_TILES, META, ROW_PTR, COLS, VALUES, RUNS,
 ROW_PTR_SIZE, NNZ, FIRST) = range(len(FIELDS))


def _address(a: np.ndarray) -> int:
    assert a.flags.c_contiguous, "stack arrays must be C-contiguous"
    return a.__array_interface__["data"][0]


def table_line(weight: AffineWeight, first: int) -> list[int]:
    """One line of a stack table for an affine handle whose rows start at out_rows[first]."""
    row_ptr, cols, values = weight.csr or (NO_ROWS, NO_COLS, NO_VALUES)
    tiles = weight.tiles()
    line = dict(rows=weight.shape[0], groups=weight.n_groups, bits=weight.bits, group_size=weight.group_size,
                tile_bytes=tiles.codes.shape[1], tiles=_address(tiles.codes), scale_tiles=_address(tiles.scale_codes),
                zero_tiles=_address(tiles.zero_codes), meta=_address(tiles.meta), row_ptr=_address(row_ptr),
                cols=_address(cols), values=_address(values), runs=tiles.meta.size // 4, row_ptr_size=row_ptr.size,
                nnz=cols.size, first=first)
    return [int(line[name]) for name in FIELDS]


def affine_pieces(weight):
    """[(affine handle, its stored rows' logical rows in the member (int64))], or None when some part of
    the member is not an affine handle the kernels multiply from the file (fp16, lut, vq, or cached)."""
    from .row_blocks import RowBlocks

    if isinstance(weight, AffineWeight):
        pieces = [(weight, np.arange(weight.shape[0], dtype=np.int64))]
    elif isinstance(weight, RowBlocks):
        pieces = [(block, weight.order[weight.starts[i]:weight.starts[i + 1]]) for i, block in enumerate(weight.blocks)]
    else:
        return None
    return pieces if all(isinstance(p, AffineWeight) and p.dense is None and p.tiles() is not None
                         for p, _ in pieces) else None


class KernelStack(Matrix):
    """Members (weight handles, one input width) as one (width, in) matrix: their outputs side by side."""

    def __init__(self, members, backend):
        self.members, self.backend = tuple(members), backend
        self.widths = [m.shape[0] for m in self.members]
        self.shape = (sum(self.widths), self.members[0].shape[1])
        lines, out_rows, offset = [], [], 0
        for member in self.members:
            for piece, rows in affine_pieces(member):
                lines.append(table_line(piece, sum(r.size for r in out_rows)))
                out_rows.append(offset + rows)
            offset += member.shape[0]
        self.table = np.array(lines, dtype=np.int64)  # (pieces, len(FIELDS))
        self.out_rows = np.concatenate(out_rows)  # (width,) stored row of the pieces → column of y
        ends = np.cumsum(self.widths).tolist()
        self.columns = [slice(end - width, end) for end, width in zip(ends, self.widths)]  # member i's columns of y

    def matmul(self, x, bias=None, residual=None):
        """x (T, in) float32 C-contiguous → x @ Wᵀ + bias + residual (T, width). Decode's path, called ~120 times a
        token on SmolLM2, goes straight to the team kernel (what Matrix.matmul → run_product would pick, without
        their general checks: a stack is never cached); anything else, or a busy or failed team, Matrix.matmul."""
        be = self.backend
        if self.team_parts and be.team is not None and x.shape[0] <= be.stack_max_tokens:
            y = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
            if be.run_team(be.team_kernels.stack_matmul_team, *self.kernel_args(x, bias, residual, y), self.team_parts):
                return y
        return super().matmul(x, bias, residual)

    @property
    def kernel_tokens(self) -> int:
        """The tiles' kernel takes decode, and prefill pieces as far as it beats sgemm (the backend's limit)."""
        return self.backend.stack_max_tokens

    @classmethod
    def of(cls, members, backend) -> KernelStack | None:
        """The stack of these members, or None when one is not affine throughout or the widths differ."""
        if any(affine_pieces(m) is None for m in members) or len({m.shape[1] for m in members}) != 1:
            return None
        return cls(members, backend)

    def bias(self, biases) -> np.ndarray | None:
        """The members' biases (None or (out_i,)) as one (width,) vector, or None when none has one."""
        if biases is None or all(b is None for b in biases):
            return None
        return np.concatenate([np.zeros(w, np.float32) if b is None else np.asarray(b, np.float32)
                               for b, w in zip(biases, self.widths)])

    def split(self, y) -> list:
        """y (T, width) → the members' outputs (T, out_i), views."""
        return [y[:, columns] for columns in self.columns]

    def kernel_args(self, x, bias, residual, y) -> tuple:
        """The stack kernels' arguments before n_parts (cpu_kernels.stack_matmul)."""
        return (x, self.table, self.out_rows, *kernel_extras(bias, residual), y)

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        return self.run_product(kernels.stack_matmul_serial, kernels.stack_matmul, *self.kernel_args(x, bias, residual, y),
                                team=kernels.stack_matmul_team)

    def numpy_matmul(self, x):
        """The members' own products side by side (the reference)."""
        return np.concatenate([self.backend.linear(x, m) for m in self.members], axis=1)
