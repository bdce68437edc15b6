"""The fixed 32-byte header at the start of every .mxq file (SPEC.md §2)."""
import struct

MAGIC = b"\x89MXQ\r\n\x1a\n"
MAJOR_VERSION = 1
MINOR_VERSION = 1
HEADER_STRUCT = struct.Struct("<8sHHIQQ")  # magic, major, minor, json_crc32, json_nbytes, data_offset
HEADER_NBYTES = HEADER_STRUCT.size  # 32
MAX_JSON_NBYTES = 64 << 20
DEFAULT_ALIGNMENT = 64
