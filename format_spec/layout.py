"""Storage configs and the cost model: which blobs a tensor stores, and how many bytes.

This module is the single source of truth for the bytes of a tensor (SPEC.md §4–§6): the
writer emits exactly `blob_specs(shape, config)`, the reader accepts exactly that and nothing
else, and the converter's budget uses `tensor_nbytes`, which is the sum of those blobs.
Alignment padding between blobs is not part of a tensor's cost; `aligned_nbytes` gives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .packing import CODES_PER_PACK, SUPPORTED_BITS

SCHEMES = ("affine", "fp16")
GROUP_SIZES = (32, 64, 128)
META_BITS = 8  # scales and zeros are stored as 8-bit codes ...
META_GROUP_SIZE = 128  # ... in groups of 128 consecutive values, each with fp16 (step, min)
MAX_OUTLIER_COLUMNS = 1 << 16  # outlier column indices are uint16


@dataclass(frozen=True, order=True)
class StorageConfig:
    """How one tensor is stored. `fp16`: plain half floats. `affine`: b-bit codes in groups of g
    along the input dimension, double-quantized scale/zero per group, `outliers` fp16 values in CSR."""

    scheme: str
    bits: int = 16
    group_size: int = 0
    outliers: int = 0  # number of stored outlier values (CSR nnz)

    def __post_init__(self):
        if self.scheme == "fp16":
            if (self.bits, self.group_size, self.outliers) != (16, 0, 0):
                raise ValueError("fp16 takes no bits, group size or outliers")
        elif self.scheme == "affine":
            if self.bits not in SUPPORTED_BITS:
                raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
            if self.outliers < 0:
                raise ValueError("outlier count must be >= 0")
        else:
            raise ValueError(f"unknown scheme {self.scheme!r}; known: {SCHEMES}")

    @staticmethod
    def fp16() -> "StorageConfig":
        return StorageConfig("fp16")

    @staticmethod
    def affine(bits: int, group_size: int, outliers: int = 0) -> "StorageConfig":
        return StorageConfig("affine", bits, group_size, outliers)

    @property
    def label(self) -> str:
        """Short human name: 'fp16', 'b4g32', 'b3g64+o1234' (1234 outliers)."""
        if self.scheme == "fp16":
            return "fp16"
        return f"b{self.bits}g{self.group_size}" + (f"+o{self.outliers}" if self.outliers else "")

    def to_json(self) -> dict:
        """The tensor entry's "config" object (SPEC.md §4.3)."""
        if self.scheme == "fp16":
            return {}
        return {"bits": self.bits, "group_size": self.group_size, "meta_bits": META_BITS,
                "meta_group_size": META_GROUP_SIZE, "outliers": self.outliers}


@dataclass(frozen=True)
class BlobSpec:
    dtype: str  # numpy dtype name, little-endian: uint8 uint16 uint32 float16
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def affine_dims(shape, group_size: int) -> tuple[int, int, int]:
    """(out_features, in_features, n_groups) of a 2-D affine tensor; the last group is padded."""
    out_features, in_features = shape
    return out_features, in_features, math.ceil(in_features / group_size)


def blob_specs(shape, config: StorageConfig) -> dict[str, BlobSpec]:
    """Every blob a tensor of `shape` stored with `config` consists of, in file order."""
    shape = tuple(int(d) for d in shape)
    if config.scheme == "fp16":
        return {"data": BlobSpec("float16", shape)}
    if len(shape) != 2:
        raise ValueError(f"affine needs a 2-D tensor, got shape {shape}")
    out_features, in_features, n_groups = affine_dims(shape, config.group_size)
    words_per_row = n_groups * config.group_size // CODES_PER_PACK * config.bits
    n_meta_groups = math.ceil(out_features * n_groups / META_GROUP_SIZE)
    specs = {
        "qweight": BlobSpec("uint32", (out_features, words_per_row)),
        "scale_codes": BlobSpec("uint8", (out_features, n_groups)),
        "scale_meta": BlobSpec("float16", (n_meta_groups, 2)),
        "zero_codes": BlobSpec("uint8", (out_features, n_groups)),
        "zero_meta": BlobSpec("float16", (n_meta_groups, 2)),
    }
    if config.outliers:
        if config.outliers > out_features * in_features:
            raise ValueError(f"{config.outliers} outliers exceed the {out_features * in_features} weights")
        if in_features > MAX_OUTLIER_COLUMNS:
            raise ValueError(f"outliers need in_features <= {MAX_OUTLIER_COLUMNS}, got {in_features}")
        specs["outlier_row_ptr"] = BlobSpec("uint32", (out_features + 1,))
        specs["outlier_cols"] = BlobSpec("uint16", (config.outliers,))
        specs["outlier_values"] = BlobSpec("float16", (config.outliers,))
    return specs


def tensor_nbytes(shape, config: StorageConfig) -> int:
    """The cost model: bytes a tensor of `shape` stored with `config` occupies (blobs only)."""
    return sum(spec.nbytes for spec in blob_specs(shape, config).values())


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def aligned_nbytes(shape, config: StorageConfig, alignment: int) -> int:
    """Bytes the tensor occupies in the data region, each blob padded to `alignment`."""
    return sum(align_up(spec.nbytes, alignment) for spec in blob_specs(shape, config).values())


def outlier_count(shape, fraction: float) -> int:
    """Outliers kept for a fraction of a tensor's weights (floor, so budgets stay exact)."""
    return int(math.floor(fraction * math.prod(shape) + 1e-9))
