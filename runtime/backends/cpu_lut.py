"""The CPU backend's handle of a `lut` matrix (SPEC.md §7): codes index a per-channel fp16 codebook.

Lean mode (default) keeps the file's bytes: the packed codes, the fp16 codebooks and the CSR outliers
are zero-copy views of the mmapped file. Products:
  * up to KERNEL_MAX_TOKENS tokens (decode): the compiled fused LUT GEMV of cpu_lut_kernels.py
    (codes unpacked, looked up and multiplied in one pass; every packed byte read once per call;
    loaded with the other kernels, cpu_jit.py);
  * more tokens, or without the kernels: dequantize a chunk of rows to float32
    (W[r, c] = codebook[r div codebook_rows, q], format_spec.dequantize_lut), then sgemm.
cache_dequantized keeps a float32 copy of W made once, as for the other schemes.
"""
from __future__ import annotations

import numpy as np

from ...format_spec import codebook_of_rows, unpack_codes
from ...format_spec.layout import lut_dims
from .cpu_weights import KERNEL_PARALLEL_MIN_WEIGHTS, NO_COLS, NO_ROWS, NO_VALUES, RowDequantized, kernel_extras, readonly


class LutWeight(RowDequantized):
    """A packed `lut` matrix (out, in), multiplied from the mmapped file bytes (lean) or from a float32
    copy (cached)."""

    def __init__(self, entry, blobs: dict, backend):
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        self.bits, self.codebook_rows = entry.config.bits, entry.config.codebook_rows
        self.packed_words = blobs["qweight"]  # (out, n_packs·b) uint32
        self.packed = readonly(blobs["qweight"].view(np.uint8))  # (out, n_packs·b·4) bytes, zero-copy
        self.codebook = blobs["codebook"]  # (n_codebooks, 2^b) fp16, zero-copy
        self.codebook_bits = readonly(blobs["codebook"].view(np.uint16))
        self.csr = None  # (row_ptr uint32, cols uint16, fp16 bits uint16), zero-copy
        if entry.config.outliers:
            self.csr = (readonly(blobs["outlier_row_ptr"]), readonly(blobs["outlier_cols"]),
                        readonly(blobs["outlier_values"].view(np.uint16)))
        if backend.kernels is not None:  # compile now; a failure switches the kernels off (NumPy path)
            backend.run_kernel(lambda _threads: backend.kernels.lut())

    def dequantize_rows(self, r: np.ndarray | slice, scratch=None) -> np.ndarray:
        """Float32 rows of W, outliers included: (R, in), a new array (no scratch buffer)."""
        _, in_features, _ = lut_dims(self.shape)
        rows = np.arange(self.shape[0])[r]
        codes = unpack_codes(self.packed_words[r], self.bits)[:, :in_features]  # (R, in)
        w = np.take_along_axis(codebook_of_rows(self.codebook, rows, self.codebook_rows), codes.astype(np.intp), 1)
        if self.csr is not None:
            row_ptr = self.csr[0].astype(np.int64)
            for i, row in enumerate(rows):
                span = slice(row_ptr[row], row_ptr[row + 1])
                w[i, self.csr[1][span].astype(np.intp)] += self.csr[2][span].view(np.float16).astype(np.float32)
        return w

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        lut = kernels.lut()
        out_features, in_features = self.shape
        csr = self.csr or (NO_ROWS, NO_COLS, NO_VALUES)
        parallel = (kernels.parallel and self.backend.threads > 1
                    and out_features * in_features >= KERNEL_PARALLEL_MIN_WEIGHTS)
        kernel = lut.lut_matmul if parallel else lut.lut_matmul_serial
        return self.backend.run_kernel(kernel, x, self.packed, self.codebook_bits, self.codebook_rows, self.bits,
                                       *csr, *kernel_extras(bias, residual), y)
