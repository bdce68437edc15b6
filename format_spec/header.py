"""The fixed 32-byte header at the start of every .mxq file (SPEC.md §2)."""
import struct

MAGIC = b"\x89MXQ\r\n\x1a\n"
MAJOR_VERSION = 1
MINOR_VERSION = 2  # the newest minor this package reads and writes (SPEC.md §9)
SCHEME_MINOR = {"fp16": 1, "affine": 1, "lut": 1, "rows": 2}  # the minor a writer writes for a file using it


def minor_version(schemes) -> int:
    """The minor version a file whose tensors use `schemes` is written with: the lowest that has them
    all (1.2 added `rows`; 1.1 is what writers wrote before, so those files keep their bytes)."""
    return max((SCHEME_MINOR[scheme] for scheme in schemes), default=1)
HEADER_STRUCT = struct.Struct("<8sHHIQQ")  # magic, major, minor, json_crc32, json_nbytes, data_offset
HEADER_NBYTES = HEADER_STRUCT.size  # 32
MAX_JSON_NBYTES = 64 << 20
DEFAULT_ALIGNMENT = 64
