"""The file's codebook tensors: a shared vq codebook (SPEC.md §12.4) per (bits, dim) the candidates use with
`shared`, and a trellis table (§13) per bits K of the trellis candidates, keyed (K, 0) beside the vq pairs.

vq:

    every decoder linear W (streamed, one at a time)
        └─ SAMPLE_VECTORS vectors of `dim` consecutive weights, evenly spaced over W, each divided by its
           group's RMS (groups of the smallest group size the pair's candidates use), weighted by the
           importance · RMS² and normalized to mean 1 per matrix, so every matrix counts alike
    all samples ─► weighted k-means (kernels.vq_kmeans, KMEANS_ITERS rounds) of 2^(bits·dim) points ─► fp16

Fitted before measurement, so the MILP sees every shared candidate's error with the codebook the file will
store; measured errors are cached under the codebook's digest, and the codebooks themselves in the cache
(`codebooks/`, keyed by checkpoint, importance, pair and fit settings). Deterministic: a function of the weights, the
importance and the pair (k-means starts from sample vectors chosen by a fixed seed; the kernels give the
same bits for any thread count). Their bytes are reserved in the budget whenever a shared candidate is
allowed, whether or not the allocation picks one (the file always holds them): 32 KiB for (3, 4).

trellis: converter/trellis.fit_table on whole rows (trellis.table_rows) evenly spread over every decoder linear,
TABLE_FIT_WEIGHTS in all, one fit per K (with scales per 64 weights, whatever the candidates' group sizes); 8 KiB
each, reserved as the vq codebooks are.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..format_spec import StorageConfig, snap_to_int8_grid
from ..format_spec.layout import (CODEBOOK_ROLE, TRELLIS_TABLE_SHAPE, BlobSpec, codebook_spec, file_codebook,
                                  shared_codebook_name, trellis_table_name)
from ..format_spec.writer import TensorPlan
from ..format_spec.vq import GRID_DIM
from .trellis import PASSES, TABLE_FIT_WEIGHTS, TABLE_PASSES, fit_table, table_rows
from .vq import kmeans_codebook, sample_vectors, shared_points

SAMPLE_VECTORS = 8192  # per matrix: a 30-layer model gives 210 × 8192 ≈ 1.7 M vectors, 420 per point at 4096
KMEANS_ITERS = 24
VERSION = 1  # of the fit: part of the cache key


def shared_pairs(candidates) -> list[tuple[int, int]]:
    """The (bits, dim) of every file codebook the candidates use, sorted: (bits, dim) of the shared vq codebooks,
    (K, 0) of the trellis tables."""
    return sorted({(c.bits, c.dim) for c in _book_users(candidates)})


def _book_users(candidates) -> list:
    """The candidates that read a file codebook: shared vq configs and trellis ones."""
    return [c for c in candidates if file_codebook(c) is not None]


def fit_shared_codebooks(checkpoint, candidates, importance, progress=None, cache: Path | None = None,
                         key: str = "") -> dict:
    """{(bits, dim): fp16 (2^(bits·dim), dim)} for shared_pairs(candidates) (module doc); {} when there are none.
    importance: None or name → (out, in) importance tensor, as measure() takes it. cache: a folder for the
    fitted codebooks, `key` naming the checkpoint and importance they were fitted to (None: no cache)."""
    pairs = shared_pairs(candidates)
    if not pairs:
        return {}
    group = {pair: min(c.group_size for c in candidates if (c.bits, c.dim) == pair and c in _book_users(candidates))
             for pair in pairs}
    paths = {pair: Path(cache) / _file_name(key, pair, group[pair]) for pair in pairs} if cache is not None else {}
    books = {pair: _cached(paths[pair], pair) for pair in paths}
    books = {pair: book for pair, book in books.items() if book is not None}
    missing = [pair for pair in pairs if pair not in books]
    if missing:
        books.update(_fit(checkpoint, missing, group, importance, progress))
        for pair in missing:
            if pair in paths:
                _store(paths[pair], books[pair])
    return {pair: books[pair] for pair in pairs}


def _file_name(key: str, pair, group: int) -> str:
    """The cache file of one fitted codebook (its fit's settings in the name)."""
    if pair[1] == 0:
        return f"{key}-t{pair[0]}-{TABLE_FIT_WEIGHTS}x{TABLE_PASSES}p{PASSES}v{VERSION}.npy"
    return f"{key}-v{pair[0]}d{pair[1]}g{group}-{SAMPLE_VECTORS}x{KMEANS_ITERS}v{VERSION}.npy"


def _cached(path: Path, pair) -> np.ndarray | None:
    """A cached codebook of the right dtype and shape, or None (absent or damaged: fitted again)."""
    try:
        book = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if book.dtype != np.float16 or book.shape != _spec(*pair).shape or not np.isfinite(book).all():
        return None
    bits, dim = pair
    # (cached before kmeans_codebook moved 4-D points to the 8-bit grid: moved there now, as a fit would)
    return snap_to_int8_grid(book) if dim == GRID_DIM else book


def _store(path: Path, book: np.ndarray) -> None:
    """Written to a temporary file, then renamed: never a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, book, allow_pickle=False)
    os.replace(temporary, path)


def _fit(checkpoint, pairs, group, importance, progress) -> dict:
    """The fits of the module doc for these pairs (one pass over the linears for all of them)."""
    vq_pairs = [pair for pair in pairs if pair[1]]
    tables = [bits for bits, dim in pairs if dim == 0]
    samples = {pair: ([], []) for pair in vq_pairs}
    rows = []  # the trellis tables' sample: [(w, f)] whole rows of each linear
    linears = checkpoint.linears
    per_matrix = TABLE_FIT_WEIGHTS // max(1, sum(info.shape[1] for info in linears))  # rows of each linear
    bar = progress(total=len(linears), desc="codebooks", unit="matrix") if progress else None
    for info in linears:
        weight = checkpoint.load(info.name).numpy()
        weights = importance(info.name).numpy() if importance is not None else None
        for (bits, dim), (xs, ws) in samples.items():
            x, w = sample_vectors(weight, weights, group[(bits, dim)], dim, SAMPLE_VECTORS)
            xs.append(x)
            ws.append(w)
        if tables:
            rows.append(table_rows(weight, weights, per_matrix))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    books = {(bits, dim): kmeans_codebook(np.concatenate(xs), np.concatenate(ws), bits * dim, KMEANS_ITERS)
             for (bits, dim), (xs, ws) in samples.items()}
    bar = progress(total=len(tables) * TABLE_PASSES, desc="trellis tables", unit="pass") if progress and tables else None
    for bits in tables:
        books[(bits, 0)] = fit_table(rows, bits, bar.update if bar else None)
    if bar:
        bar.close()
    return books


def digest(codebooks: dict, config: StorageConfig) -> str:
    """A short hash of the file codebook a `shared` vq or a trellis config uses (the error cache's key for its
    errors)."""
    return hashlib.sha256(shared_points(codebooks, config).tobytes()).hexdigest()[:16]


def codebook_plans(pairs) -> list[TensorPlan]:
    """The file's codebook tensors for these (bits, dim) pairs (SPEC.md §12.4; (K, 0): a trellis table, §13)."""
    return [TensorPlan(trellis_table_name(bits) if dim == 0 else shared_codebook_name(bits, dim), _spec(bits, dim).shape,
                       StorageConfig.fp16(), CODEBOOK_ROLE) for bits, dim in pairs]


def reserved_nbytes(pairs) -> int:
    """The bytes the codebook tensors of these pairs take (fp16, 2 · dim · 2^(bits·dim) each; a trellis table
    8 KiB)."""
    return sum(_spec(bits, dim).nbytes for bits, dim in pairs)


def _spec(bits: int, dim: int) -> BlobSpec:
    """The codebook tensor's BlobSpec for (bits, dim) ((K, 0): the trellis table's)."""
    if dim == 0:
        return BlobSpec("float16", TRELLIS_TABLE_SHAPE)
    return codebook_spec(StorageConfig.vq(bits, dim, 32, shared=True))
