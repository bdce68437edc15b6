"""Row blocks: a decoder linear split into blocks of output channels (rows), each block with its own
config — format_spec's `rows` scheme (SPEC.md §8), chosen per block by the MILP (`--row-blocks K`).

    W (out, in) ──row importance r_i = Σ_j F_ij·W_ij²──► order = rows by r, most important first
        ──cut into K blocks of near-equal row counts──► block b: rows order[start_b:end_b]
        ──one config per block (MILP units, measure.py)──► StorageConfig.rows([(count_b, config_b), ...])
        ──write: quantize W[order[start_b:end_b]] per block, blobs `b.<name>`, and `row_order` = order

Sorting pays: the rows a matrix depends on most sit together, and get more bits than the rest
(measured on SmolLM2 at equal bits: sorted blocks cut the predicted loss by ~18%, contiguous blocks
by ~1%). The importance is the objective's own weight: the Fisher diagonal F (`fisher`), the input
second moments broadcast over rows (`output`), or 1 (data-free objectives: r_i = ‖W_i‖²). Ties keep
the row index order, so the order is a pure function of the weights and the importance.

A matrix is split only when every block gets at least MIN_BLOCK_ROWS rows (fewer blocks otherwise;
none below 2) and its rows have at least MIN_SPLIT_COLUMNS weights. The cost of a split matrix is exact: `row_order` (uint16/uint32 per row) plus each
block's own cost over its (count, in) shape — metadata runs are per block — which `unit_nbytes`
gives per MILP unit (the row_order bytes ride on block 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..format_spec import StorageConfig, aligned_nbytes, join_blocks, tensor_nbytes
from ..format_spec.layout import align_up, row_order_dtype
from .options import MIN_BLOCK_ROWS, MIN_SPLIT_COLUMNS

ORDER_VERSION = 1  # bump when the row order or the block cut changes (part of the error cache's key)


def block_counts(shape, blocks: int) -> list[int]:
    """Row counts of the blocks a (out, in) matrix is cut into (stored order): `blocks` near-equal parts
    (the first ones one row longer), fewer when a block would get < MIN_BLOCK_ROWS rows; [out] when the
    matrix stays whole (also when its rows are narrower than MIN_SPLIT_COLUMNS: there the row order's
    16 bits a row cost more than 1/16 bpw, about what sorted blocks gain)."""
    out_features, in_features = shape
    k = min(blocks, out_features // MIN_BLOCK_ROWS) if in_features >= MIN_SPLIT_COLUMNS else 1
    if k < 2:
        return [out_features]
    base, extra = divmod(out_features, k)
    return [base + (b < extra) for b in range(k)]


def blocks_wanted(row_blocks: int, candidates) -> int:
    """--row-blocks as applied: 1 with a single candidate config (its blocks could not differ, and the
    row_order would be bytes for nothing — `--configs fp16` stays plain fp16)."""
    return row_blocks if len(candidates) > 1 else 1


def row_importance(weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    """(out,) float64: Σ_j importance_ij·W_ij² of each row (importance None: ‖W_i‖²)."""
    out = np.empty(weight.shape[0])
    step = max(1, (1 << 20) // max(weight.shape[1], 1))  # rows at a time: no whole-matrix float64 copy
    for r in range(0, weight.shape[0], step):
        w = weight[r:r + step].numpy().astype(np.float64)
        w *= w
        if importance is not None:
            w *= importance[r:r + step].numpy()
        out[r:r + step] = w.sum(axis=1)  # NumPy: the same bits for any thread count
    return out


def row_order(weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    """(out,) int64: the rows by importance, most important first; ties in row index order."""
    return np.argsort(-row_importance(weight, importance), kind="stable")


@dataclass(frozen=True)
class RowSplit:
    order: np.ndarray  # (out,) int64: stored row s is row order[s] of W
    counts: tuple  # row count of each block, in stored order

    def rows(self, b: int) -> np.ndarray:
        """Rows of W in block b (count_b,), in stored order."""
        start = sum(self.counts[:b])
        return self.order[start:start + self.counts[b]]


def split(weight: torch.Tensor, importance: torch.Tensor | None, blocks: int) -> RowSplit | None:
    """The row blocks of a 2-D matrix for `--row-blocks blocks` (None: it stays whole)."""
    counts = block_counts(tuple(weight.shape), blocks) if weight.dim() == 2 else [0]
    if len(counts) < 2:
        return None
    return RowSplit(row_order(weight, importance), tuple(counts))


def unit_nbytes(shape, counts, b: int, config: StorageConfig, alignment: int | None = None) -> int:
    """Bytes of block b of a matrix of `shape` cut into `counts` rows, stored with `config` (a candidate:
    its outlier percent resolves over the block's rows); block 0 carries the row_order blob. With
    `alignment`, each blob padded to it (as the writer lays them out). For an unsplit matrix
    (counts = [out]) this is the matrix's own cost."""
    if len(counts) < 2:
        stored = config.storage(shape)
        return tensor_nbytes(shape, stored) if alignment is None else aligned_nbytes(shape, stored, alignment)
    block_shape = (counts[b], shape[1])
    stored = config.storage(block_shape)
    nbytes = tensor_nbytes(block_shape, stored) if alignment is None else aligned_nbytes(block_shape, stored, alignment)
    if b == 0:
        order = shape[0] * np.dtype(row_order_dtype(shape[0])).itemsize
        nbytes += order if alignment is None else align_up(order, alignment)
    return nbytes


def unit_costs(tensors, candidates, row_blocks: int) -> tuple[list, np.ndarray]:
    """The allocation units of `tensors` (2-D, with .shape) under --row-blocks: (row counts of each
    tensor's blocks ([out] when whole), int64 (units, candidates) bytes, the units in tensor order and
    a split tensor's blocks consecutive, block 0 first)."""
    row_blocks = blocks_wanted(row_blocks, candidates)
    counts = [block_counts(t.shape, row_blocks) for t in tensors]
    costs = np.array([[unit_nbytes(t.shape, c_t, b, c) for c in candidates]
                      for t, c_t in zip(tensors, counts) for b in range(len(c_t))], dtype=np.int64)
    return counts, costs


def rows_config(shape, counts, configs) -> StorageConfig:
    """The stored config of a split matrix: block b stored with configs[b] (a candidate) over its rows."""
    return StorageConfig.rows([(count, config.storage((count, shape[1]))) for count, config in zip(counts, configs)])


def quantize_rows(weight: torch.Tensor, config: StorageConfig, importance, order: np.ndarray, quantize_block) -> dict:
    """The blobs of W stored as `config` (a `rows` config) in row order `order`: `row_order`, then each
    block's blobs as quantize_block(W_b, block config, importance_b) gives them, named `b.<blob>`."""
    if sum(config.row_counts) != weight.shape[0] or len(order) != weight.shape[0]:
        raise ValueError(f"row blocks {config.label} do not cover the {weight.shape[0]} rows")
    blocks, parts = RowSplit(order, config.row_counts), []
    for b, (_, block) in enumerate(config.blocks):
        rows = torch.from_numpy(blocks.rows(b))
        parts.append(quantize_block(weight[rows], block, importance[rows] if importance is not None else None))
    return join_blocks(order, parts)
