"""The `trellis` scheme's reference codec (SPEC.md §13): trellis-coded quantization (QTIP's bitshift trellis,
Tseng et al. 2024) with a table of levels shared by the file.

Each row of a (out, in) matrix is one bit stream, read least significant bit first: uint32 word j of the row
holds stream bits 32j … 32j + 31, bit 0 of the word first. Weight c of the row reads the L-bit window at stream
bit c·K (L = 12; K = the config's bits, 2–5): so consecutive windows overlap in L − K bits, and the stream
holds L + (in − 1)·K bits, padded with 0 bits to whole words. The window indexes the file's table for K (role
codebook, fp16 (4096, 1), layout.trellis_table_name), and a double-quantized scale per `group_size` inputs
(as vq's, SPEC.md §6.2) stretches it:

    window(r, c) = (stream_r >> (c·K)) mod 2^L
    W[r, c]      = scale[r, c div g] · table[window(r, c)]

This module is the NumPy reference every backend and kernel is tested against, and `pack_windows` is how a
writer turns a walk through the trellis (the windows of a row) into its stream.
"""
from __future__ import annotations

import numpy as np

from .layout import TRELLIS_WINDOW_BITS, StorageConfig, trellis_dims

WINDOW_MASK = (1 << TRELLIS_WINDOW_BITS) - 1


def trellis_windows(qweight: np.ndarray, in_features: int, bits: int) -> np.ndarray:
    """(out, in) int32: each weight's window, read from the rows' streams (qweight uint32 (out, words))."""
    words = np.asarray(qweight, dtype=np.uint32).astype(np.uint64)
    words = np.concatenate([words, np.zeros((words.shape[0], 1), np.uint64)], axis=1)  # a window may end in the last word
    start = np.arange(in_features, dtype=np.int64) * bits  # (in,) each window's first stream bit
    word, shift = start >> 5, (start & 31).astype(np.uint64)
    pair = words[:, word] | (words[:, word + 1] << np.uint64(32))  # (out, in) the 64 stream bits from the word
    return ((pair >> shift) & np.uint64(WINDOW_MASK)).astype(np.int32)


def pack_windows(windows: np.ndarray, bits: int) -> np.ndarray:
    """qweight uint32 (out, words_per_row) of rows whose walks are `windows` (out, in): window 0's L bits, then
    the top K bits of each next window. ValueError unless each window continues its predecessor (its low L − K
    bits are the predecessor's high ones) — a walk through the trellis."""
    windows = np.asarray(windows, dtype=np.int64)
    out_features, in_features = windows.shape
    if windows.size and (windows.min() < 0 or windows.max() > WINDOW_MASK):
        raise ValueError(f"trellis windows must lie in 0..{WINDOW_MASK}")
    tail = TRELLIS_WINDOW_BITS - bits
    if in_features > 1 and np.any((windows[:, 1:] & ((1 << tail) - 1)) != windows[:, :-1] >> bits):
        raise ValueError("trellis windows do not form a walk (a window's low bits must be its predecessor's high ones)")
    _, _, words_per_row, _ = trellis_dims(windows.shape, StorageConfig.trellis(bits, 32))
    words = np.zeros((out_features, words_per_row + 1), np.uint64)  # + a word the last chunk may spill into
    # stream bits: window 0's 12, then for c ≥ 1 the K bits window c adds (its top K) at bit L + (c − 1)·K;
    # a column at a time, (out,) vector operations: memory stays the output's
    for c in range(in_features):
        start, chunk = (0, windows[:, 0]) if c == 0 else (TRELLIS_WINDOW_BITS + (c - 1) * bits, windows[:, c] >> tail)
        shifted = chunk.astype(np.uint64) << np.uint64(start & 31)  # < 2^43: fits
        words[:, start >> 5] |= shifted & np.uint64(0xFFFFFFFF)
        words[:, (start >> 5) + 1] |= shifted >> np.uint64(32)
    return np.ascontiguousarray(words[:, :words_per_row].astype(np.uint32))


def per_weight(scales: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    """(rows, G) group scales → (rows, in): each weight's scale."""
    return np.repeat(scales, group_size, axis=1)[:, :in_features]


def dequantize_trellis(blobs: dict, shape, config: StorageConfig) -> np.ndarray:
    """Reference dequantization of one `trellis` tensor → float32 (out, in); its `codebook` blob is the file's
    table (fp16 (4096, 1), handed over by the reader), its scale codes in their in-memory form (uint8 (out, G),
    format_spec.affine.loaded_blobs)."""
    from .affine import decode_meta  # affine's metadata is shared

    out_features, in_features, _, _ = trellis_dims(shape, config)
    table = np.asarray(blobs["codebook"]).astype(np.float32).reshape(-1)  # (4096,)
    weight = table[trellis_windows(blobs["qweight"], in_features, config.bits)]  # (out, in)
    scale = decode_meta(blobs["scale_codes"], blobs["scale_meta"])  # (out, G)
    weight *= per_weight(scale, config.group_size, in_features)
    return np.ascontiguousarray(weight, dtype=np.float32)
