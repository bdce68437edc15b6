"""Several matrices that multiply one input, as ONE compiled call (lean-mode decode on the CPU).

A decoder layer multiplies the same normed x by q, k and v, and by gate and up; a `rows` matrix
(row_blocks.py) is several blocks, each its own matrix. Each product as its own kernel call
costs ~6 µs of per-call work (argument unboxing, rounding x) and ~3 µs of Python on top of the
weights' ~8 µs (SmolLM2's 576×576 at 4 bits), and a rows matrix adds a gather. A KernelStack lists
every member's pieces in one int64 table — one line per piece, of one of two kinds:

    KIND_AFFINE   an affine matrix, from its tiles of 16 rows (cpu_tiles.py)
    KIND_VQ_GRID  a 4-D vq matrix whose codebook is on the 8-bit grid (SPEC.md §12.5; cpu_vq.Widened.grid_book),
                  from the file's packed rows

    field           KIND_AFFINE                          KIND_VQ_GRID
    kind, rows, groups, bits, group_size                 (bits: the index bits, 8 or 12)
    stride          bytes of one tile                    bytes of one packed row
    codes           the tiles' codes                     the packed rows (rows, stride)
    scales          the scale tiles                      the scale codes (rows, groups)
    zeros           the zero tiles                       0
    book            0                                    the grid codebook, uint8 (2^bits, 4): its codes + 128
    meta            the tiles' metadata (4 floats a run)  the scales' (step, min) runs (runs, 2)
    row_ptr, cols, values, row_ptr_size, nnz             the file's CSR outliers and their lengths
    runs            the metadata's runs
    first           its first entry in out_rows
    grid_step       0                                    the grid's step 2^e, as the bits of a float64

and cpu_stack_kernels.stack_matmul rounds x once, then runs every piece's rows, writing stored row r of a piece
straight to column out_rows[first + r] of y (T, width): members side by side in the order given, a rows matrix's
rows in their logical order (its row_order: no gather). The handles keep the arrays alive: the stack holds the
handles. Pieces of other kinds (fp16, lut, vq off the grid, or cached float32 copies) have no table line: such
members are multiplied one by one as before (KernelStack.of returns None). A stack with a vq piece takes up to
KERNEL_MAX_TOKENS tokens, as the vq handle's own kernel does; an affine one up to the backend's stack_max_tokens.

The NumPy path of a stack (no kernels, or a kernel failed) is its members' own products put side by
side: the same reference as multiplying them one by one.
"""
from __future__ import annotations

import numpy as np

from .cpu_vq import VqWeight
from .cpu_weights import KERNEL_MAX_TOKENS, NO_COLS, NO_ROWS, NO_VALUES, AffineWeight, Matrix, kernel_extras

FIELDS = ("kind", "rows", "groups", "bits", "group_size", "stride", "codes", "scales", "zeros", "book", "meta",
          "row_ptr", "cols", "values", "runs", "row_ptr_size", "nnz", "first", "grid_step")
(KIND, ROWS, GROUPS, BITS, GROUP_SIZE, STRIDE, CODES, SCALES, ZEROS, BOOK, META, ROW_PTR, COLS, VALUES, RUNS,
 ROW_PTR_SIZE, NNZ, FIRST, GRID_STEP) = range(len(FIELDS))
KIND_AFFINE, KIND_VQ_GRID = 0, 1


def _address(a: np.ndarray) -> int:
    assert a.flags.c_contiguous, "stack arrays must be C-contiguous"
    return a.__array_interface__["data"][0]


def table_line(weight: AffineWeight | VqWeight, first: int) -> list[int]:
    """One line of a stack table for an affine handle or a vq handle on the grid whose rows start at out_rows[first]."""
    row_ptr, cols, values = weight.csr or (NO_ROWS, NO_COLS, NO_VALUES)
    line = dict.fromkeys(FIELDS, 0)
    line.update(rows=weight.shape[0], group_size=weight.group_size, row_ptr=_address(row_ptr), cols=_address(cols),
                values=_address(values), row_ptr_size=row_ptr.size, nnz=cols.size, first=first)
    if isinstance(weight, VqWeight):
        book = weight.codebook
        line.update(kind=KIND_VQ_GRID, groups=weight.n_groups, bits=weight.index_bits, stride=weight.packed.shape[1],
                    codes=_address(weight.packed), scales=_address(weight.scale_codes), book=_address(book.grid_book),
                    meta=_address(weight.scale_meta), runs=weight.scale_meta.shape[0],
                    grid_step=int(np.array(book.grid_step, np.float64).view(np.int64)))
    else:
        tiles = weight.tiles()
        line.update(kind=KIND_AFFINE, groups=weight.n_groups, bits=weight.bits, stride=tiles.codes.shape[1],
                    codes=_address(tiles.codes), scales=_address(tiles.scale_codes), zeros=_address(tiles.zero_codes),
                    meta=_address(tiles.meta), runs=tiles.meta.size // 4)
    return [int(line[name]) for name in FIELDS]


def stackable(piece) -> bool:
    """Whether the kernels multiply this handle from a table line: affine with tiles, or vq on the 8-bit grid,
    neither cached as float32."""
    if piece.dense is not None:
        return False
    if isinstance(piece, AffineWeight):
        return piece.tiles() is not None
    return isinstance(piece, VqWeight) and piece.codebook.grid_book is not None and not piece.backend.cache_dequantized


def stack_pieces(weight):
    """[(handle, its stored rows' logical rows in the member (int64))], or None when some part of the member is not
    a handle the stack kernels multiply (stackable)."""
    from .row_blocks import RowBlocks

    if isinstance(weight, RowBlocks):
        pieces = [(block, weight.order[weight.starts[i]:weight.starts[i + 1]]) for i, block in enumerate(weight.blocks)]
    else:
        pieces = [(weight, np.arange(weight.shape[0], dtype=np.int64))]
    return pieces if all(stackable(p) for p, _ in pieces) else None


class KernelStack(Matrix):
    """Members (weight handles, one input width) as one (width, in) matrix: their outputs side by side."""

    def __init__(self, members, backend):
        self.members, self.backend = tuple(members), backend
        self.widths = [m.shape[0] for m in self.members]
        self.shape = (sum(self.widths), self.members[0].shape[1])
        lines, out_rows, offset = [], [], 0
        for member in self.members:
            for piece, rows in stack_pieces(member):
                lines.append(table_line(piece, sum(r.size for r in out_rows)))
                out_rows.append(offset + rows)
            offset += member.shape[0]
        self.table = np.array(lines, dtype=np.int64)  # (pieces, len(FIELDS))
        self.out_rows = np.concatenate(out_rows)  # (width,) stored row of the pieces → column of y
        self.has_vq = bool((self.table[:, KIND] == KIND_VQ_GRID).any())
        ends = np.cumsum(self.widths).tolist()
        self.columns = [slice(end - width, end) for end, width in zip(ends, self.widths)]  # member i's columns of y

    def matmul(self, x, bias=None, residual=None):
        """x (T, in) float32 C-contiguous → x @ Wᵀ + bias + residual (T, width). Decode's path, called ~120 times a
        token on SmolLM2, goes straight to the team kernel (what Matrix.matmul → run_product would pick, without
        their general checks: a stack is never cached); anything else, or a busy or failed team, Matrix.matmul."""
        be = self.backend
        if self.team_parts and be.team is not None and x.shape[0] <= self.kernel_tokens:
            y = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
            if be.run_team(be.team_kernels.stack_matmul_team, *self.kernel_args(x, bias, residual, y), self.team_parts):
                return y
        return super().matmul(x, bias, residual)

    @property
    def kernel_tokens(self) -> int:
        """The tiles' kernel takes decode, and prefill pieces as far as it beats sgemm (the backend's limit); with a vq
        piece, as many tokens as the vq handle's own kernel (module doc)."""
        return min(self.backend.stack_max_tokens, KERNEL_MAX_TOKENS) if self.has_vq else self.backend.stack_max_tokens

    @classmethod
    def of(cls, members, backend) -> KernelStack | None:
        """The stack of these members, or None when one has a piece the stack kernels do not take (stackable) or the
        widths differ."""
        if any(stack_pieces(m) is None for m in members) or len({m.shape[1] for m in members}) != 1:
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
        """The stack kernels' arguments before n_parts (cpu_stack_kernels.stack_matmul)."""
        return (x, self.table, self.out_rows, *kernel_extras(bias, residual), y)

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        return self.run_product(kernels.stack_matmul_serial, kernels.stack_matmul, *self.kernel_args(x, bias, residual, y),
                                team=kernels.stack_matmul_team)

    def numpy_matmul(self, x):
        """The members' own products side by side (the reference)."""
        return np.concatenate([self.backend.linear(x, m) for m in self.members], axis=1)
