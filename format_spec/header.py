"""The fixed 32-byte header at the start of every .mxq file (SPEC.md §2)."""
import struct

from .tokenizer_schema import base_kind

MAGIC = b"\x89MXQ\r\n\x1a\n"
MAJOR_VERSION = 1
MINOR_VERSION = 3  # the newest minor this package reads and writes (SPEC.md §10)
SCHEME_MINOR = {"fp16": 1, "affine": 1, "lut": 1, "rows": 2}  # the minor a writer writes for a file using it
XZ_TOKENIZER_MINOR = 3  # 1.3 added xz-compressed tokenizer blobs (a tokenizer kind ending in +xz)


def minor_version(schemes, tokenizer_kind: str) -> int:
    """The minor version a file whose tensors use `schemes` is written with: the lowest that has them
    all and its tokenizer kind (1.3 added +xz kinds, 1.2 `rows`; 1.1 is what writers wrote before)."""
    xz = XZ_TOKENIZER_MINOR if base_kind(tokenizer_kind)[1] else 1
    return max([xz] + [SCHEME_MINOR[scheme] for scheme in schemes])
HEADER_STRUCT = struct.Struct("<8sHHIQQ")  # magic, major, minor, json_crc32, json_nbytes, data_offset
HEADER_NBYTES = HEADER_STRUCT.size  # 32
MAX_JSON_NBYTES = 64 << 20
DEFAULT_ALIGNMENT = 64
