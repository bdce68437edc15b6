"""The tokenizer blob's bytes (SPEC.md §3.2): writers store the tokenizer file xz-compressed (a
tokenizer.json is mostly vocabulary and merge text that xz shrinks ~8-10x: bytes a --size budget then
gives to the weights); readers unpack it in pieces into a buffer of the size the metadata states, so a
hostile blob cannot unpack into more than `raw_nbytes` — itself capped (tokenizer_schema) and bounded
by the blob's size (MAX_RATIO, checked at open)."""
from __future__ import annotations

from functools import lru_cache

from .tokenizer_schema import XZ, base_kind

PRESET = 6  # xz's default level: -9 -e saved 0.4% more on SmolLM2's tokenizer.json for 1.3-1.6x the time
MEMLIMIT = 128 << 20  # the decoder's memory cap (SPEC §3.2; presets 0-9 need at most ~65 MiB)
MAX_RATIO, RATIO_SLACK = 64, 1 << 20  # raw_nbytes <= MAX_RATIO * blob nbytes + RATIO_SLACK (SPEC §3.2)
PIECE = 1 << 20  # unpacked bytes per decompress call


def ratio_problem(meta: dict, blob_nbytes: int) -> str | None:
    """Why an +xz tokenizer object's raw_nbytes is implausible for its blob's size, or None."""
    if not base_kind(meta["kind"])[1] or meta["raw_nbytes"] <= MAX_RATIO * blob_nbytes + RATIO_SLACK:
        return None
    return (f"tokenizer field 'raw_nbytes' = {meta['raw_nbytes']:,} is more than {MAX_RATIO} x the blob's "
            f"{blob_nbytes:,} bytes + {RATIO_SLACK:,}")


@lru_cache(maxsize=2)
def _xz(data: bytes) -> bytes:  # a --size conversion lays the file out many times: compress once
    import lzma  # here, not at import: a Python without _lzma still reads files with plain tokenizers

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
    import lzma

    want = meta["raw_nbytes"]
    unpacker = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MEMLIMIT)
    data, pending = bytearray(), blob  # the whole blob goes in once; then b"" asks for more output
    try:
        while not unpacker.eof and len(data) <= want:
            piece = unpacker.decompress(pending, max_length=min(PIECE, want + 1 - len(data)))
            pending = b""
            if not piece and unpacker.needs_input:
                break  # the input ended before the stream did
            data += piece
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
    return bytes(data)
