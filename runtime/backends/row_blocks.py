"""A `rows` matrix (SPEC.md §8) on any backend: its row blocks are ordinary weight handles, put back
in the logical row order.

Each block i — count_i stored rows, its own scheme and config — is prepared by the backend's own
prepare_matrix as a (count_i, in) matrix named `NAME[rows i]`, so every product path the backend has
(compiled kernels, NumPy, cached float32, lut, vq, CUDA GEMVs) serves blocks unchanged. What is added:

    linear     y_i = x @ B_iᵀ (T, count_i) for each block, side by side in stored order, then one gather
               y[:, r] = stored[:, inverse[r]] (inverse = row_order⁻¹, on the backend's device), then bias
               and residual
    embedding  id r lives at stored row inverse[r]: its block by a binary search of the block starts,
               gathered through that block's handle (decode: one block, no scatter)

Everything is derived once at load. Per product, over one matrix's: a call per block (on the CPU kernels
~6 µs each: Python dispatch and the kernel's per-call preparation of x), one concatenation and one gather
(~4 µs at SmolLM2's sizes). So the CPU backend's decode does not come here when every block is affine or vq on
the 8-bit grid: it multiplies such a matrix (and the q/k/v, gate/up it shares an input with) in one compiled call
that writes each stored row straight to its logical row (cpu_stack.py, `order` below); this class remains its
NumPy reference, its prefill path, and the path of matrices with fp16, lut or other vq blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...format_spec import block_blobs, block_starts, inverse_order
from ..errors import ModelError


@dataclass(frozen=True)
class BlockEntry:
    """The tensor entry of one block, as a backend's prepare_matrix reads it."""

    name: str
    shape: tuple
    config: object
    role: str


class RowBlocks:
    """The weight handle of a `rows` matrix (out, in); `blocks` are the backend's handles of its blocks in
    stored order. Content (row_order a permutation, each block's outliers) is checked by Backend.prepare."""

    def __init__(self, backend, entry, blobs: dict):
        out_features, in_features = entry.shape
        self.name, self.shape, self.backend = entry.name, tuple(entry.shape), backend
        self.blocks = []
        for i, (count, config) in enumerate(entry.config.blocks):
            if config.scheme not in backend.schemes:
                raise ModelError(f"tensor '{entry.name}' block {i}: scheme {config.scheme!r} is not supported by "
                                 f"the {backend.name} backend")
            block = BlockEntry(f"{entry.name}[rows {i}]", (count, in_features), config, entry.role)
            self.blocks.append(backend.prepare_matrix(block, block_blobs(blobs, i)))
        order = np.asarray(blobs["row_order"]).astype(np.int64)  # (out,) stored row → logical row
        self.order = order  # host int64 (out,): stored row → logical row
        self.starts = block_starts(entry.config)  # host int64 (k + 1,)
        self.inverse = inverse_order(order)  # host int64 (out,): logical row → stored row
        self.gather = backend.xp.asarray(self.inverse)  # the same on the backend's device

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(block, "nbytes", 0)) for block in self.blocks)

    def linear(self, x, bias=None, residual=None):
        """x (T, in) float32 @ Wᵀ (+ bias (out,)) (+ residual (T, out)) → (T, out) in the logical row order."""
        backend, xp = self.backend, self.backend.xp
        parts = [backend.linear(x, block) for block in self.blocks]  # (T, count_i) each
        stored = xp.concatenate(parts, axis=1)  # (T, out) in stored order
        y = stored[:, self.gather]  # (T, out): y[:, r] = stored[:, inverse[r]]
        if bias is not None:
            y += bias
        if residual is not None:
            y += residual
        return y

    def rows(self, ids: np.ndarray):
        """Rows `ids` (host int64 (T,)) of W → (T, in) float32: the embedding gather."""
        backend, xp = self.backend, self.backend.xp
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise ModelError(f"tensor '{self.name}': token id outside 0..{self.shape[0] - 1}")
        stored = self.inverse[ids]  # (T,) stored rows
        which = np.searchsorted(self.starts, stored, side="right") - 1  # (T,) block of each id
        if ids.size and np.all(which == which[0]):  # decode: one id, one block
            return backend.embedding(self.blocks[which[0]], stored - self.starts[which[0]])
        out = xp.empty((ids.size, self.shape[1]), dtype=xp.float32)  # (T, in)
        for i in np.unique(which):
            at = np.flatnonzero(which == i)
            out[xp.asarray(at)] = backend.embedding(self.blocks[i], stored[at] - self.starts[i])
        return out
