"""mxq.format_spec — the bytes of a .mxq file: layout/cost model, packing, codecs, reader, writer.

SPEC.md in this folder is the normative description; this package implements it and imports
nothing else of mxq.
"""
from .affine import build_csr, csr_problem, decode_meta, dequantize, encode_meta, loaded_blobs, stored_blobs
from .errors import MxqFormatError
from .header import MAJOR_VERSION, MINOR_VERSION
from .layout import (BLOCK_SCHEMES, CODEBOOK_ROWS, GROUP_SIZES, LABEL_GRAMMAR, META_BITS, SCHEMES, BlobSpec, StorageConfig,
                     aligned_nbytes, blob_specs, block_blobs, outlier_count, row_order_dtype, tensor_nbytes)
from .lut import codebook_of_rows, dequantize_lut
from .vq import dequantize_vq, int8_grid, snap_to_int8_grid, vq_indices
from .packing import SUPPORTED_BITS, pack_codes, unpack_codes
from .reader import BlobRef, MxqFile, TensorEntry
from .rows import block_starts, content_problem, inverse_order, join_blocks, row_order_problem
from .writer import MxqWriter, TensorPlan

__all__ = [
    "MxqFormatError", "MAJOR_VERSION", "MINOR_VERSION", "GROUP_SIZES", "CODEBOOK_ROWS", "LABEL_GRAMMAR", "SCHEMES",
    "META_BITS", "loaded_blobs", "stored_blobs",
    "SUPPORTED_BITS", "codebook_of_rows", "dequantize_lut", "dequantize_vq", "vq_indices", "int8_grid", "snap_to_int8_grid",
    "BlobSpec", "StorageConfig", "aligned_nbytes", "blob_specs", "outlier_count", "tensor_nbytes",
    "pack_codes", "unpack_codes", "encode_meta", "decode_meta", "dequantize", "build_csr", "csr_problem",
    "BlobRef", "MxqFile", "TensorEntry", "MxqWriter", "TensorPlan",
    "BLOCK_SCHEMES", "block_blobs", "row_order_dtype", "block_starts", "content_problem", "inverse_order",
    "join_blocks", "row_order_problem",
]
