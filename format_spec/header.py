"""The fixed 32-byte header at the start of every .mxq file (SPEC.md §2)."""
import struct

from .tokenizer_schema import base_kind

MAGIC = b"\x89MXQ\r\n\x1a\n"
MAJOR_VERSION = 1
MINOR_VERSION = 9  # the newest minor this package reads and writes (SPEC.md §10)
SCHEME_MINOR = {"fp16": 1, "affine": 1, "lut": 1, "rows": 2, "vq": 6, "trellis": 9}  # the minor that added each scheme
XZ_TOKENIZER_MINOR = 3  # 1.3 added xz-compressed tokenizer blobs (a tokenizer kind ending in +xz)
META6_MINOR = 4  # 1.4 added 6-bit affine metadata codes (meta_bits 6)
PACKED_MINOR = 5  # 1.5 added packed tensor entries (one offset and crc32 per tensor instead of a blob table)
SHARED_CODEBOOK_MINOR = 7  # 1.7 added shared vq codebooks (config "shared", role "codebook")
WORD_PADDED_VQ_MINOR = 8  # 1.8 pads a vq row's indices to whole uint32 words, not whole packs of 32 (§12.1)


def _config_minor(config) -> int:
    if config.scheme == "rows":
        return max([SCHEME_MINOR["rows"]] + [_config_minor(block) for _, block in config.blocks])
    if config.scheme == "vq":  # this writer pads vq rows to words, so every vq file is 1.8
        return WORD_PADDED_VQ_MINOR
    return META6_MINOR if config.scheme == "affine" and config.meta_bits == 6 else SCHEME_MINOR[config.scheme]


def minor_version(configs, tokenizer_kind: str, packed: bool = False) -> int:
    """The minor version a file whose tensors use `configs` (StorageConfigs) is written with: the lowest
    that has every feature they, its tokenizer kind and its tensor entries' form use (1.9 added `trellis`, 1.8 pads `vq` rows to
    words, which this writer always does, 1.7 added shared vq codebooks, 1.6 added `vq`, 1.5 added packed
    entries, 1.4 6-bit metadata codes, 1.3 +xz tokenizer kinds, 1.2 `rows`; 1.1 is what writers wrote before)."""
    xz = XZ_TOKENIZER_MINOR if base_kind(tokenizer_kind)[1] else 1
    return max([xz, PACKED_MINOR if packed else 1] + [_config_minor(config) for config in configs])


HEADER_STRUCT = struct.Struct("<8sHHIQQ")  # magic, major, minor, json_crc32, json_nbytes, data_offset
HEADER_NBYTES = HEADER_STRUCT.size  # 32
MAX_JSON_NBYTES = 64 << 20
DEFAULT_ALIGNMENT = 64
