"""The CPU backend's handle of a `vq` matrix (SPEC.md §12): every `dim` inputs of a row share one index into the
matrix's codebook, a double-quantized scale per group of inputs stretches it.

Lean mode (default) keeps the file's bytes: the packed indices, the 8-bit scale codes (6-bit ones: their uint8
copy, made at load by format_spec.loaded_blobs) and the CSR outliers are zero-copy views of the mmapped file;
what is widened at load is small: the codebook to float32, as (2^k, dim) points and for dim 2 (dim, 2^k) coordinate
planes (≤ 4 KiB; a 4-D codebook only as points, 4 or 64 KiB, its kernel reading the file's fp16 bytes), once
per distinct codebook (`widened`: the tensors sharing a file's codebook share one copy), and the (step, min) pairs
of the scales' runs to float32 (1/128 of the scales). The scales stay codes, decoded per row where used (in the
kernel: a few operations per group of inputs). Products:
  * up to KERNEL_MAX_TOKENS tokens (decode): the compiled fused GEMV of cpu_vq_kernels.py (indices unpacked,
    looked up, scaled and multiplied in one pass; every packed byte read once per call; loaded with the other
    kernels, cpu_jit.py); on one thread or all, whichever has been faster (cpu_weights.ThreadChoice); a 4-D
    codebook on the 8-bit grid (SPEC.md §12.5, found at load: Widened.grid_book) takes the integer kernel instead
    (vq_grid_matmul: x rounded as for affine matrices), on decode's team of threads for big matrices; in decode
    such a handle is a kernel stack entry beside the affine matrices that share its input (cpu_stack.py: one call
    for q/k/v, gate/up, a rows matrix's blocks), so its layers are fused as affine ones are (cpu_layers.py);
  * more tokens, or without the kernels: dequantize a chunk of rows to float32
    (W[r, c] = scale[r, c div g] · codebook[index[r, c div dim], c mod dim], format_spec.dequantize_vq), then sgemm.
cache_dequantized keeps a float32 copy of W made once, as for the other schemes. An embedding's rows are
dequantized as looked up (lean_rows).
A row's packed indices are padded to whole uint32 words (format 1.8) or to whole packs of 32 (files of format
≤ 1.7, SPEC.md §12.1): every path takes the width the file has (the kernels: cpu_vq_kernels' module doc; the NumPy
path: format_spec.unpack_codes, which unpacks a partial last pack), and drops the padding indices.
"""
from __future__ import annotations

import weakref
from functools import cached_property

import numpy as np

from ...format_spec import int8_grid, unpack_codes
from ...format_spec.layout import vq_dims
from ...format_spec.vq import GRID_DIM
from .cpu_weights import (NO_COLS, NO_ROWS, NO_VALUES, RowDequantized, _fresh, content_cached, decoded_scales,
                          kernel_extras, readonly)


class Widened:
    """A codebook widened to float32: `points` (2^k, dim), the NumPy path's lookups, and `planes` (dim, 2^k), the
    kernel's, one plane per coordinate (None for 4-D points: that kernel gathers the fp16 points); for 4-D points on
    an 8-bit grid (format_spec.int8_grid, SPEC.md §12.5) also `grid_book` uint8 (2^k, 4), the codes + 128, and
    `grid_step` float32 2^e, which the integer kernel takes (else None)."""

    __slots__ = ("points", "planes", "grid_book", "grid_step", "__weakref__")

    def __init__(self, codebook: np.ndarray):
        self.points = readonly(codebook.astype(np.float32))
        self.planes = readonly(self.points.T) if codebook.shape[1] == PLANAR_DIM else None
        grid = int8_grid(codebook) if codebook.shape[1] == GRID_DIM else None
        self.grid_book = readonly((grid[0].astype(np.int16) + 128).astype(np.uint8)) if grid is not None else None
        self.grid_step = np.float32(2.0 ** grid[1]) if grid is not None else None


PLANAR_DIM = 2  # codebooks of 2-D points: the kernels look their points up in coordinate planes
_widened = weakref.WeakValueDictionary()  # (content hash, shape) → Widened, alive while a handle holds it


def widened(codebook: np.ndarray) -> Widened:
    """The float32 forms of an fp16 codebook (2^k, dim), made once per distinct content (cpu_weights.content_cached):
    the tensors of a file that share its codebook (format 1.7: a view of the same file bytes each) share one."""
    return content_cached(_widened, codebook, Widened)


class VqWeight(RowDequantized):
    """A packed `vq` matrix (out, in), multiplied from the mmapped file bytes (lean) or from a float32 copy
    (cached)."""

    def __init__(self, entry, blobs: dict, backend):
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        config = entry.config
        self.index_bits, self.dim, self.group_size = config.index_bits, config.dim, config.group_size
        _, _, _, self.n_groups = vq_dims(self.shape, config)
        self.n_vectors = -(-self.shape[1] // self.dim)
        self.packed_words = blobs["qweight"]  # (out, n_slots·k / 32) uint32: n_slots ≥ n_vectors (module doc)
        self.packed = readonly(blobs["qweight"].view(np.uint8))  # (out, n_slots·k / 8) bytes, zero-copy
        self.codebook = widened(blobs["codebook"])  # one per distinct codebook: shared ones are widened once
        self.points = self.codebook.points  # (2^k, dim) float32
        # the kernel's codebook: the planes, or for 4-D points the fp16 points' own bytes as float32 (2^k, dim/2),
        # zero-copy (cpu_vq_kernels.points_dot gathers a point's 4 coordinates as one 64-bit word)
        self.kernel_codebook = (self.codebook.planes if self.codebook.planes is not None else
                                readonly(np.ascontiguousarray(blobs["codebook"]).view(np.float32)))
        self.scale_codes = readonly(blobs["scale_codes"])  # (out, G) uint8
        self.scale_meta = readonly(blobs["scale_meta"].astype(np.float32))  # (runs, 2): step, min
        self.csr = None  # (row_ptr uint32 (out+1,), cols uint16 (nnz,), fp16 bits uint16 (nnz,)), zero-copy
        if config.outliers:
            self.csr = (readonly(blobs["outlier_row_ptr"]), readonly(blobs["outlier_cols"]),
                        readonly(blobs["outlier_values"].view(np.uint16)))
        if backend.kernels is not None:  # compile now; a failure switches the kernels off (NumPy path)
            backend.run_kernel(lambda _threads: backend.kernels.vq())

    @cached_property
    def outliers(self):
        """The NumPy path's outliers: (cols intp (nnz,), float32 values (nnz,), row_ptr int64 (out+1,)), or None."""
        if self.csr is None:
            return None
        row_ptr, cols, values = self.csr
        return cols.astype(np.intp), values.view(np.float16).astype(np.float32), row_ptr.astype(np.int64)

    def scales(self, rows: np.ndarray) -> np.ndarray:
        """Decoded scales of `rows` (R,): (R, G) float32 (cpu_weights.decoded_scales)."""
        return decoded_scales(self.scale_codes, self.scale_meta, self.n_groups, rows)

    def dequantize_rows(self, r: np.ndarray | slice, scratch=_fresh) -> np.ndarray:
        """Float32 rows r of W, outliers included: (R, in), a view of scratch("weight", (R, n_vectors, dim))
        (the NumPy path's reused buffer; by default a new array)."""
        in_features, g = self.shape[1], self.group_size
        rows = np.arange(self.shape[0])[r]  # (R,): out-of-range ids raise here
        R = rows.size
        index = unpack_codes(self.packed_words[r], self.index_bits)[:, :self.n_vectors]  # (R, n_vectors) uint8/16
        w = scratch("weight", (R, self.n_vectors, self.dim), np.float32)
        np.take(self.points, index, axis=0, out=w, mode="clip")  # every index is < 2^k: nothing clipped
        w = w.reshape(R, -1)  # (R, n_vectors·dim): the codebook coordinates, padding columns past in_features
        scales = self.scales(rows)  # (R, G)
        for k in range(self.n_groups):
            w[:, k * g:(k + 1) * g] *= scales[:, k, None]
        if self.outliers is not None:
            cols, values, row_ptr = self.outliers
            first, counts = row_ptr[rows], row_ptr[rows + 1] - row_ptr[rows]  # (R,)
            local = np.repeat(np.arange(R), counts)  # output row of each outlier taken
            at = np.arange(counts.sum()) + np.repeat(first - (np.cumsum(counts) - counts), counts)
            w[local, cols[at]] += values[at]  # (row, col) pairs are unique: no lost updates
        return w[:, :in_features]

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        vq = kernels.vq()
        csr = self.csr or (NO_ROWS, NO_COLS, NO_VALUES)
        if self.codebook.grid_book is not None:  # 4-D points on an 8-bit grid: gathered as bytes, x rounded as affine's
            return self.run_product(vq.vq_grid_matmul_serial, vq.vq_grid_matmul, x, self.packed,
                                    self.codebook.grid_book, self.index_bits, self.codebook.grid_step,
                                    self.scale_codes, self.scale_meta, self.group_size, *csr,
                                    *kernel_extras(bias, residual), y, team=kernels.vq_grid_matmul_team)
        return self.run_product(vq.vq_matmul_serial, vq.vq_matmul, x, self.packed, self.kernel_codebook,
                                self.index_bits, self.dim, self.scale_codes, self.scale_meta, self.group_size, *csr,
                                *kernel_extras(bias, residual), y)
