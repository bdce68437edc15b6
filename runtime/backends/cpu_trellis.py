"""The CPU backend's handle of a `trellis` matrix (SPEC.md §13): each row one bit stream whose 12-bit windows index
the file's table of 4096 levels for K bits per weight, a double-quantized scale per group of inputs stretching them
(format_spec/trellis.py: W[r, c] = scale[r, c div g] · table[(stream_r >> c·K) mod 2^12]).

Lean mode (default) keeps the file's bytes: the rows' streams and the 8-bit scale codes (6-bit ones: their uint8
copy, made at load by format_spec.loaded_blobs) are zero-copy views of the mmapped file; what is widened at load is
small: the table to float32 (16 KiB), once per distinct table (`widened`: every tensor of a file with the same K
shares the file's table, and one float32 copy), and the (step, min) pairs of the scales' runs to float32 (1/128 of
the scales). Products:
  * up to KERNEL_MAX_TOKENS tokens (decode): the compiled GEMV of cpu_trellis_kernels.py (windows cut from each
    row's stream, looked up, scaled and multiplied in one pass; every stream byte read once per call; loaded with
    the other kernels, cpu_jit.py); on one thread or all, whichever has been faster (cpu_weights.ThreadChoice);
  * more tokens, or without the kernels: dequantize a chunk of rows to float32 (the windows of format_spec's
    trellis_windows, looked up and scaled: exactly format_spec.dequantize_trellis), then sgemm.
cache_dequantized keeps a float32 copy of W made once, as for the other schemes. An embedding's rows are
dequantized as looked up (lean_rows).
"""
from __future__ import annotations

import weakref

import numpy as np

from ...format_spec.layout import trellis_dims
from ...format_spec.trellis import trellis_windows
from .cpu_weights import RowDequantized, _fresh, content_cached, decoded_scales, kernel_extras, readonly


class Table:
    """A trellis table widened to float32: `levels` (4096,), what both paths look windows up in."""

    __slots__ = ("levels", "__weakref__")

    def __init__(self, table: np.ndarray):
        self.levels = readonly(table.astype(np.float32).reshape(-1))


_widened = weakref.WeakValueDictionary()  # (content hash, shape) → Table, alive while a handle holds it


def widened(table: np.ndarray) -> Table:
    """The float32 form of an fp16 table (4096, 1), made once per distinct content (cpu_weights.content_cached)."""
    return content_cached(_widened, table, Table)


class TrellisWeight(RowDequantized):
    """A `trellis` matrix (out, in), multiplied from the mmapped file bytes (lean) or from a float32 copy
    (cached)."""

    def __init__(self, entry, blobs: dict, backend):
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        config = entry.config
        self.bits, self.group_size = config.bits, config.group_size
        _, _, _, self.n_groups = trellis_dims(self.shape, config)
        self.stream = blobs["qweight"]  # (out, words_per_row) uint32, zero-copy
        self.packed = readonly(blobs["qweight"].view(np.uint8))  # (out, 4·words_per_row) bytes, zero-copy
        self.table = widened(blobs["codebook"])  # one per distinct table: a file's tensors of one K share it
        self.scale_codes = readonly(blobs["scale_codes"])  # (out, G) uint8
        self.scale_meta = readonly(blobs["scale_meta"].astype(np.float32))  # (runs, 2): step, min
        if backend.kernels is not None:  # compile now; a failure switches the kernels off (NumPy path)
            backend.run_kernel(lambda _threads: backend.kernels.trellis())

    def scales(self, rows: np.ndarray) -> np.ndarray:
        """Decoded scales of `rows` (R,): (R, G) float32 (cpu_weights.decoded_scales)."""
        return decoded_scales(self.scale_codes, self.scale_meta, self.n_groups, rows)

    def dequantize_rows(self, r: np.ndarray | slice, scratch=_fresh) -> np.ndarray:
        """Float32 rows r of W: (R, in), scratch("weight", (R, in)) (the NumPy path's reused buffer; by default a
        new array); exactly format_spec.dequantize_trellis's rows."""
        in_features, g = self.shape[1], self.group_size
        rows = np.arange(self.shape[0])[r]  # (R,): out-of-range ids raise here
        windows = trellis_windows(self.stream[rows], in_features, self.bits)  # (R, in) int32
        w = scratch("weight", (rows.size, in_features), np.float32)
        np.take(self.table.levels, windows, out=w, mode="clip")  # every window is < 4096: nothing clipped
        scales = self.scales(rows)  # (R, G)
        for k in range(self.n_groups):
            w[:, k * g:(k + 1) * g] *= scales[:, k, None]
        return w

    def kernel_matmul(self, kernels, x, bias, residual, y) -> bool:
        trellis = kernels.trellis()
        return self.run_product(trellis.trellis_matmul_serial, trellis.trellis_matmul, x, self.packed,
                                self.table.levels, self.bits, self.scale_codes, self.scale_meta, self.group_size,
                                *kernel_extras(bias, residual), y)
