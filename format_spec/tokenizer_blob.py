"""The tokenizer blob's bytes (SPEC.md §3.2): writers store the tokenizer file xz-compressed — a
tokenizer.json is mostly vocabulary and merges, text that xz shrinks ~8-10x (SmolLM2's 3.52 MB →
0.45 MB, Gemma 3's 33.4 MB → 3.5 MB; bytes a --size budget then gives to the weights) — and readers
unpack it with its size known up front, so a hostile blob cannot unpack into more than `raw_nbytes`."""
from __future__ import annotations

import lzma
from functools import lru_cache

from .tokenizer_schema import XZ, base_kind

PRESET = 6  # xz's default level: -9 -e saved 0.4% more on SmolLM2's tokenizer.json for 1.3-1.6x the time
MEMLIMIT = 256 << 20  # the unpacker's memory cap (a preset-6 stream needs ~9 MiB)


@lru_cache(maxsize=2)
def _xz(data: bytes) -> bytes:  # a --size conversion lays the file out many times: compress once
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=PRESET)


def pack(meta: dict, data: bytes) -> tuple[dict, bytes]:
    """The tokenizer object (blob aside) and the raw tokenizer file → (the object as stored: kind with
    +xz and raw_nbytes, the blob's bytes). A stored object (already +xz) is accepted as its raw kind."""
    kind, _ = base_kind(meta["kind"])
    stored = {k: v for k, v in meta.items() if k not in ("blob", "raw_nbytes")}
    return {**stored, "kind": kind + XZ, "raw_nbytes": len(data)}, _xz(bytes(data))


def unpack(meta: dict, blob: bytes) -> bytes:
    """The tokenizer file from a checked tokenizer object and its blob's bytes; ValueError (one line)
    when an xz blob does not unpack to exactly raw_nbytes bytes."""
    if not base_kind(meta["kind"])[1]:
        return blob
    want = meta["raw_nbytes"]
    unpacker = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MEMLIMIT)
    try:
        data = unpacker.decompress(blob, max_length=want + 1)
    except lzma.LZMAError as error:
        raise ValueError(f"not a valid xz stream ({error})") from None
    if len(data) > want:
        raise ValueError(f"unpacks to more than raw_nbytes = {want:,} bytes")
    if not unpacker.eof:
        raise ValueError(f"the xz stream is truncated ({len(data):,} of raw_nbytes = {want:,} bytes)")
    if len(data) != want:
        raise ValueError(f"unpacks to {len(data):,} bytes, not raw_nbytes = {want:,}")
    if unpacker.unused_data:
        raise ValueError("bytes after the end of the xz stream")
    return data
