"""Storage configs and the cost model: which blobs a tensor stores, and how many bytes.

This module is the single source of truth for the bytes of a tensor (SPEC.md §4–§8, §12): the writer
emits exactly `blob_specs(shape, config)`, the reader accepts exactly that and nothing else, and
the converter's budget uses `tensor_nbytes`, which is the sum of those blobs. It also holds the one
config label grammar (SPEC.md §11: `StorageConfig.parse` / `.label`) that the CLI, `mxq inspect`
and the docs use.
Alignment padding between blobs is not part of a tensor's cost; `aligned_nbytes` gives it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from .header import MINOR_VERSION, WORD_PADDED_VQ_MINOR
from .packing import CODES_PER_PACK, SUPPORTED_BITS, word_unit

SCHEMES = ("affine", "fp16", "lut", "rows", "trellis", "vq")
BLOCK_SCHEMES = ("affine", "fp16", "lut", "trellis", "vq")  # what a `rows` block may use (no nesting)
GROUP_SIZES = (32, 64, 128)
CODEBOOK_ROWS = (1, 2, 4, 8, 16, 32)  # lut: output channels that share one codebook
META_BITS = (6, 8)  # scales and zeros are stored as 6- or 8-bit codes ...
META_GROUP_SIZE = 128  # ... in groups of 128 consecutive values, each with fp16 (step, min)
MAX_OUTLIER_COLUMNS = 1 << 16  # outlier column indices are uint16
VQ_DIMS = (2, 4)  # vq: consecutive inputs that share one codebook index
VQ_BITS = (2, 3, 4)  # vq: bits per weight, so an index has dim · bits bits ...
VQ_INDEX_BITS = (4, 6, 8)  # ... which must be one of these (a codebook of 16, 64 or 256 points) ...
VQ_SHARED_INDEX_BITS = (4, 6, 8, 12)  # ... or of these with a codebook shared by the file (12: 4096 points)
CODEBOOK_ROLE = "codebook"  # the role of a file's shared vq codebook tensors (shared_codebook_name)
VQ_META_BITS = 6  # vq: the default width of its scale codes (8 also allowed: v..m8)
TRELLIS_BITS = (2, 3, 4, 5)  # trellis: bits per weight (K), each weight shifting K new bits into the window ...
TRELLIS_WINDOW_BITS = 12  # ... of L bits, which indexes the file's table of 2^L levels for K (SPEC.md §13)
TRELLIS_META_BITS = 6  # trellis: the default width of its scale codes (8 also allowed: t..m8)
META_ARRAYS = {"affine": ("scale_codes", "zero_codes"), "vq": ("scale_codes",),
               "trellis": ("scale_codes",)}  # double-quantized (out, G) codes

# The one label grammar of storage configs (CLI --configs, `mxq inspect`, file summaries, docs):
#   fp16 | b<bits>g<group>[m<meta bits>] | l<bits>[c<channels>] | v<bits>d<dim>g<group>[m<meta bits>][s]
#   (each optionally +o<count> or +o<percent>%) | t<bits>g<group>[m<meta bits>]
LABEL_GRAMMAR = ("fp16; bBgG or bBgGmM (affine: B bits, groups of G inputs, M-bit metadata codes, 6 or 8; "
                 "default 6 for B <= 3, else 8); lB or lBcC (lut: B-bit codebook per "
                 "output channel, or per C channels); vBdDgG or vBdDgGmM (vq: every D consecutive inputs "
                 "share one index into the matrix's codebook of 2^(B·D) D-dimensional points, B·D in 4, 6, 8; "
                 "a signed scale per G inputs in M-bit codes, default 6; a trailing s: the codebook is the file's "
                 "shared one for (B, D), which also allows B·D = 12); "
                 "tKgG or tKgGmM (trellis: each weight shifts K bits, K in 2-5, into a 12-bit window that indexes "
                 "the file's table of 4096 levels for K; a scale per G inputs in M-bit codes, default 6; no outliers); "
                 "each but trellis optionally +oN (N outliers) or +oP% (P percent "
                 "of the matrix's weights); rows(R:LABEL,R:LABEL,...) (row blocks of R output channels "
                 "each, in a stored row order, with their own configs)")
_LABEL = re.compile(r"^(?:b(?P<bits>\d+)g(?P<group>\d+)(?:m(?P<meta>\d+))?|l(?P<lbits>\d+)(?:c(?P<rows>\d+))?"
                    r"|v(?P<vbits>\d+)d(?P<dim>\d+)g(?P<vgroup>\d+)(?:m(?P<vmeta>\d+))?(?P<shared>s)?"
                    r"|t(?P<tbits>\d+)g(?P<tgroup>\d+)(?:m(?P<tmeta>\d+))?)"
                    r"(?:\+o(?:(?P<percent>\d+(?:\.\d+)?)%|(?P<count>\d+)))?$")


def default_meta_bits(bits: int) -> int:
    """The metadata width an affine config of `bits` gets unless its label says otherwise (`mM`): 6 for
    b ≤ 3, 8 above. A zero's code step is ~2^b/(2^m − 1) code units, so 6-bit zeros add ~(2^b/63)² of the
    codes' own rounding error — ≤ 1.6% at b ≤ 3, 6% at b4, 26% at b5 — for 0.125 / 0.0625 / 0.03 bpw
    saved at g32 / g64 / g128 (README, "6-bit metadata", has the measured perplexities)."""
    return 6 if bits <= 3 else 8


@dataclass(frozen=True, order=True)
class StorageConfig:
    """How one tensor is stored (SPEC.md §4–§8, §12).
    `fp16`: plain half floats.
    `affine`: b-bit codes in groups of `group_size` along the input dimension, a double-quantized
        scale/zero per group.
    `lut`: b-bit codes indexing a codebook of 2^b fp16 levels per `codebook_rows` output channels.
    `vq`: every `dim` consecutive inputs of a row share one (dim·b)-bit index into the tensor's codebook
        of 2^(dim·b) fp16 points of `dim` coordinates; a double-quantized scale per `group_size` inputs;
        `shared`: the codebook is the file's tensor shared_codebook_name(bits, dim), not a blob of its own.
    `trellis`: each row is one bit stream; weight c reads the 12-bit window at bit c·b, which indexes the
        file's table of 4096 fp16 levels for b (trellis_table_name), times a double-quantized scale per
        `group_size` inputs (SPEC.md §13).
    The quantized schemes but trellis may keep `outliers` fp16 values in CSR.
    `rows`: row blocks in a stored row order, each block (row count, one of the configs above).
    A config made from a label with
    `+oP%` carries `outlier_percent` instead: a spec for any matrix, which `storage(shape)` turns into
    the exact config (a count) of one matrix."""

    scheme: str
    bits: int = 16
    group_size: int = 0  # affine only
    outliers: int = 0  # number of stored outlier values (CSR nnz)
    outlier_percent: float = 0.0  # a spec's outliers as a percent of the weights (resolved by storage())
    codebook_rows: int = 0  # lut only
    blocks: tuple = ()  # rows only: ((row count, StorageConfig of the block), ...) in stored order
    meta_bits: int = 0  # affine, vq: 6 or 8-bit metadata codes (0 given: default_meta_bits(bits) / VQ_META_BITS)
    dim: int = 0  # vq only: inputs per codebook index
    shared: bool = False  # vq only: the codebook is the file's shared one (SPEC.md §12.4)

    def __post_init__(self):
        if self.scheme == "affine" and self.meta_bits == 0 and self.bits in SUPPORTED_BITS:
            object.__setattr__(self, "meta_bits", default_meta_bits(self.bits))
        if self.scheme == "vq" and self.meta_bits == 0:
            object.__setattr__(self, "meta_bits", VQ_META_BITS)
        if self.scheme == "trellis" and self.meta_bits == 0:
            object.__setattr__(self, "meta_bits", TRELLIS_META_BITS)
        if self.scheme not in META_ARRAYS and self.meta_bits:
            raise ValueError(f"{self.scheme} takes no metadata bits")
        if self.scheme != "vq" and (self.dim or self.shared):
            raise ValueError(f"{self.scheme} takes no vector dimension or shared codebook")
        if self.scheme == "rows":
            if (self.bits, self.group_size, self.outliers, self.outlier_percent, self.codebook_rows) != (16, 0, 0, 0, 0):
                raise ValueError("rows takes only blocks (each block has its own config)")
            if len(self.blocks) < 2:
                raise ValueError("rows needs at least 2 blocks")
            for count, block in self.blocks:
                if not isinstance(count, int) or count < 1:
                    raise ValueError(f"a rows block needs a positive row count, got {count!r}")
                if not isinstance(block, StorageConfig) or block.scheme not in BLOCK_SCHEMES:
                    raise ValueError(f"a rows block is stored as one of {BLOCK_SCHEMES}")
            return
        if self.blocks:
            raise ValueError(f"{self.scheme} takes no blocks")
        if self.scheme == "fp16":
            if (self.bits, self.group_size, self.outliers, self.outlier_percent, self.codebook_rows) != (16, 0, 0, 0, 0):
                raise ValueError("fp16 takes no bits, group size, codebook or outliers")
            return
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; known: {SCHEMES}")
        if self.scheme == "vq":
            index_bits = VQ_SHARED_INDEX_BITS if self.shared else VQ_INDEX_BITS
            if self.bits not in VQ_BITS or self.dim not in VQ_DIMS or self.bits * self.dim not in index_bits:
                raise ValueError(f"vq needs bits in {VQ_BITS}, dim in {VQ_DIMS} and bits·dim in {VQ_INDEX_BITS} "
                                 f"({VQ_SHARED_INDEX_BITS} with a shared codebook), got bits {self.bits}, "
                                 f"dim {self.dim}{', shared' if self.shared else ''}")
            if self.codebook_rows:
                raise ValueError("vq takes no codebook_rows (its codebook serves the whole tensor)")
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"vq group size must be one of {GROUP_SIZES}, got {self.group_size}")
            if self.meta_bits not in META_BITS:
                raise ValueError(f"vq metadata bits must be one of {META_BITS}, got {self.meta_bits}")
        elif self.scheme == "trellis":
            if self.bits not in TRELLIS_BITS:
                raise ValueError(f"trellis needs bits in {TRELLIS_BITS}, got {self.bits}")
            if self.codebook_rows or self.outliers or self.outlier_percent:
                raise ValueError("trellis takes no codebook_rows or outliers")
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"trellis group size must be one of {GROUP_SIZES}, got {self.group_size}")
            if self.meta_bits not in META_BITS:
                raise ValueError(f"trellis metadata bits must be one of {META_BITS}, got {self.meta_bits}")
            return
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.scheme == "affine" and (self.group_size not in GROUP_SIZES or self.codebook_rows):
            raise ValueError(f"affine group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.scheme == "affine" and self.meta_bits not in META_BITS:
            raise ValueError(f"affine metadata bits must be one of {META_BITS}, got {self.meta_bits}")
        if self.scheme == "lut" and (self.codebook_rows not in CODEBOOK_ROWS or self.group_size):
            raise ValueError(f"lut channels per codebook must be one of {CODEBOOK_ROWS}, got {self.codebook_rows}")
        if self.outliers < 0 or not 0 <= self.outlier_percent <= 100:
            raise ValueError("outliers must be a count >= 0 or a percent in [0, 100]")
        if self.outliers and self.outlier_percent:
            raise ValueError("outliers are a count or a percent, not both")

    @staticmethod
    def fp16() -> "StorageConfig":
        return StorageConfig("fp16")

    @staticmethod
    def affine(bits: int, group_size: int, outliers: int = 0, meta_bits: int = 0) -> "StorageConfig":
        """meta_bits 0: default_meta_bits(bits)."""
        return StorageConfig("affine", bits, group_size, outliers, meta_bits=meta_bits)

    @staticmethod
    def lut(bits: int, codebook_rows: int = 1, outliers: int = 0) -> "StorageConfig":
        return StorageConfig("lut", bits, 0, outliers, codebook_rows=codebook_rows)

    @staticmethod
    def vq(bits: int, dim: int, group_size: int, outliers: int = 0, meta_bits: int = 0,
           shared: bool = False) -> "StorageConfig":
        """meta_bits 0: VQ_META_BITS."""
        return StorageConfig("vq", bits, group_size, outliers, meta_bits=meta_bits, dim=dim, shared=shared)

    @staticmethod
    def trellis(bits: int, group_size: int, meta_bits: int = 0) -> "StorageConfig":
        """meta_bits 0: TRELLIS_META_BITS."""
        return StorageConfig("trellis", bits, group_size, meta_bits=meta_bits)

    @property
    def index_bits(self) -> int:
        """vq: the bits of one codebook index (dim · bits)."""
        return self.bits * self.dim

    @staticmethod
    def rows(blocks) -> "StorageConfig":
        """Row blocks: [(row count, config), ...] in stored order (SPEC.md §8)."""
        return StorageConfig("rows", blocks=tuple((int(count), config) for count, config in blocks))

    @property
    def row_counts(self) -> tuple:
        """rows: the blocks' row counts, in stored order."""
        return tuple(count for count, _ in self.blocks)

    @staticmethod
    def parse(label: str) -> "StorageConfig":
        """The config a label names (LABEL_GRAMMAR): 'fp16', 'b4g32', 'b3g64+o1234', 'l4', 'l3c8+o0.5%',
        'rows(144:b3g64,432:b4g64)'."""
        if label == "fp16":
            return StorageConfig.fp16()
        if label.startswith("rows(") and label.endswith(")"):
            blocks = []
            for part in label[5:-1].split(","):
                count, sep, inner = part.partition(":")
                if not sep or not count.isdigit() or inner.startswith("rows("):
                    raise ValueError(f"cannot parse config label {label!r} (grammar: {LABEL_GRAMMAR})")
                blocks.append((int(count), StorageConfig.parse(inner)))
            return StorageConfig.rows(blocks)
        match = _LABEL.match(label)
        if not match:
            raise ValueError(f"cannot parse config label {label!r} (grammar: {LABEL_GRAMMAR})")
        outliers = int(match["count"] or 0)
        percent = float(match["percent"] or 0)
        if match["bits"] is not None:
            return StorageConfig("affine", int(match["bits"]), int(match["group"]), outliers, percent,
                                 meta_bits=int(match["meta"] or 0))
        if match["tbits"] is not None:
            if match["count"] or match["percent"]:
                raise ValueError(f"config label {label!r}: trellis takes no outliers")
            return StorageConfig("trellis", int(match["tbits"]), int(match["tgroup"]), meta_bits=int(match["tmeta"] or 0))
        if match["vbits"] is not None:
            return StorageConfig("vq", int(match["vbits"]), int(match["vgroup"]), outliers, percent,
                                 meta_bits=int(match["vmeta"] or 0), dim=int(match["dim"]),
                                 shared=match["shared"] is not None)
        return StorageConfig("lut", int(match["lbits"]), 0, outliers, percent, int(match["rows"] or 1))

    @property
    def label(self) -> str:
        """The label (LABEL_GRAMMAR) that parse() maps back to this config."""
        if self.scheme == "fp16":
            return "fp16"
        if self.scheme == "rows":
            return "rows(" + ",".join(f"{count}:{block.label}" for count, block in self.blocks) + ")"
        if self.scheme == "affine":
            base = f"b{self.bits}g{self.group_size}"
            base += f"m{self.meta_bits}" if self.meta_bits != default_meta_bits(self.bits) else ""
        elif self.scheme == "vq":
            base = f"v{self.bits}d{self.dim}g{self.group_size}"
            base += f"m{self.meta_bits}" if self.meta_bits != VQ_META_BITS else ""
            base += "s" if self.shared else ""
        elif self.scheme == "trellis":
            return f"t{self.bits}g{self.group_size}" + (f"m{self.meta_bits}" if self.meta_bits != TRELLIS_META_BITS else "")
        else:
            base = f"l{self.bits}" + (f"c{self.codebook_rows}" if self.codebook_rows > 1 else "")
        if self.outlier_percent:
            return base + f"+o{self.outlier_percent:g}%"
        return base + (f"+o{self.outliers}" if self.outliers else "")

    def storage(self, shape) -> "StorageConfig":
        """The exact config of a matrix of `shape`: a percent of outliers becomes a count (floor, so
        budgets stay exact); a config with a count (or none) is returned as is."""
        if self.scheme == "rows":
            if sum(self.row_counts) != shape[0]:
                raise ValueError(f"row blocks {self.label} cover {sum(self.row_counts)} rows, not {shape[0]}")
            return StorageConfig.rows([(count, block.storage((count, *shape[1:]))) for count, block in self.blocks])
        if not self.outlier_percent:
            return self
        return replace(self, outliers=outlier_count(shape, self.outlier_percent / 100), outlier_percent=0.0)

    def to_json(self) -> dict:
        """The tensor entry's "config" object (SPEC.md §4.1)."""
        if self.outlier_percent:
            raise ValueError(f"config {self.label} has an unresolved outlier percent (use storage(shape))")
        if self.scheme == "fp16":
            return {}
        if self.scheme == "rows":
            return {"blocks": [{"rows": count, "scheme": block.scheme, "config": block.to_json()}
                               for count, block in self.blocks]}
        if self.scheme == "lut":
            return {"bits": self.bits, "codebook_rows": self.codebook_rows, "outliers": self.outliers}
        if self.scheme == "trellis":
            return {"bits": self.bits, "group_size": self.group_size, "meta_bits": self.meta_bits,
                    "meta_group_size": META_GROUP_SIZE, "window_bits": TRELLIS_WINDOW_BITS}
        if self.scheme == "vq":
            shared = {"shared": True} if self.shared else {}  # written only when true (older readers: 1.6 files)
            return {"bits": self.bits, "dim": self.dim, "group_size": self.group_size, "meta_bits": self.meta_bits,
                    "meta_group_size": META_GROUP_SIZE, "outliers": self.outliers, **shared}
        return {"bits": self.bits, "group_size": self.group_size, "meta_bits": self.meta_bits,
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


def lut_dims(shape) -> tuple[int, int, int]:
    """(out_features, in_features, n_packs) of a 2-D lut tensor; each row is padded to whole packs."""
    out_features, in_features = shape
    return out_features, in_features, math.ceil(in_features / CODES_PER_PACK)


def vq_dims(shape, config: "StorageConfig", minor: int = MINOR_VERSION) -> tuple[int, int, int, int]:
    """(out_features, in_features, n_slots, n_groups) of a 2-D vq tensor: each row's V = ceil(in / dim)
    indices padded with 0 indices to n_slots — whole uint32 words (a multiple of word_unit(index bits))
    from format 1.8, whole packs of 32 before (SPEC.md §12.1) — and ceil(in / group_size) scales per row."""
    out_features, in_features = shape
    n_vectors = math.ceil(in_features / config.dim)
    unit = word_unit(config.index_bits) if minor >= WORD_PADDED_VQ_MINOR else CODES_PER_PACK
    return out_features, in_features, math.ceil(n_vectors / unit) * unit, math.ceil(in_features / config.group_size)


def trellis_dims(shape, config: "StorageConfig") -> tuple[int, int, int, int]:
    """(out_features, in_features, words_per_row, n_groups) of a 2-D trellis tensor: each row's bit stream holds
    L + (in − 1)·K bits (the first window, then K bits per further weight), padded with 0 bits to whole uint32
    words; ceil(in / group_size) scales per row (SPEC.md §13)."""
    out_features, in_features = shape
    stream_bits = TRELLIS_WINDOW_BITS + (in_features - 1) * config.bits
    return out_features, in_features, math.ceil(stream_bits / 32), math.ceil(in_features / config.group_size)


def meta_codes_spec(out_features: int, n_groups: int, meta_bits: int) -> BlobSpec:
    """The file blob of one (out, G) array of metadata codes: uint8 (out, G) for 8 bits; for 6 bits the
    codes in row-major order bit-packed like weight codes (§5.1: packs of 32 codes in 6 uint32 words,
    the last pack padded with 0 codes). Readers hand both to runtimes as uint8 (out, G)
    (format_spec.affine.loaded_blobs)."""
    if meta_bits == 8:
        return BlobSpec("uint8", (out_features, n_groups))
    return BlobSpec("uint32", (math.ceil(out_features * n_groups / CODES_PER_PACK) * meta_bits,))


def blob_specs(shape, config: StorageConfig, minor: int = MINOR_VERSION) -> dict[str, BlobSpec]:
    """Every blob a tensor of `shape` stored with `config` consists of, in file order, in a file of format
    1.`minor` (only vq's index padding depends on it: vq_dims)."""
    shape = tuple(int(d) for d in shape)
    if config.scheme == "fp16":
        return {"data": BlobSpec("float16", shape)}
    if len(shape) != 2:
        raise ValueError(f"{config.scheme} needs a 2-D tensor, got shape {shape}")
    if config.scheme == "rows":
        out_features, in_features = shape
        if sum(config.row_counts) != out_features:
            raise ValueError(f"row blocks {config.label} cover {sum(config.row_counts)} rows, not {out_features}")
        specs = {"row_order": BlobSpec(row_order_dtype(out_features), (out_features,))}
        for i, (count, block) in enumerate(config.blocks):
            try:
                block_specs = blob_specs((count, in_features), block, minor)
            except ValueError as error:
                raise ValueError(f"block {i}: {error}") from None
            specs.update({f"{i}.{name}": spec for name, spec in block_specs.items()})
        return specs
    if config.outlier_percent:
        raise ValueError(f"config {config.label} has an unresolved outlier percent")
    if config.scheme == "lut":
        out_features, in_features, n_packs = lut_dims(shape)
        specs = {
            "qweight": BlobSpec("uint32", (out_features, n_packs * config.bits)),
            "codebook": BlobSpec("float16", (math.ceil(out_features / config.codebook_rows), 1 << config.bits)),
        }
    elif config.scheme == "vq":
        out_features, in_features, n_slots, n_groups = vq_dims(shape, config, minor)
        specs = {
            "qweight": BlobSpec("uint32", (out_features, n_slots * config.index_bits // 32)),
            "codebook": codebook_spec(config),
            "scale_codes": meta_codes_spec(out_features, n_groups, config.meta_bits),
            "scale_meta": BlobSpec("float16", (math.ceil(out_features * n_groups / META_GROUP_SIZE), 2)),
        }
        if config.shared:  # the file's codebook tensor (shared_codebook_name), resolved by the reader
            del specs["codebook"]
    elif config.scheme == "trellis":  # its table is the file's tensor trellis_table_name(bits), resolved by the reader
        out_features, in_features, words_per_row, n_groups = trellis_dims(shape, config)
        if in_features < 1:
            raise ValueError("trellis needs at least one input")
        specs = {
            "qweight": BlobSpec("uint32", (out_features, words_per_row)),
            "scale_codes": meta_codes_spec(out_features, n_groups, config.meta_bits),
            "scale_meta": BlobSpec("float16", (math.ceil(out_features * n_groups / META_GROUP_SIZE), 2)),
        }
    else:
        out_features, in_features, n_groups = affine_dims(shape, config.group_size)
        words_per_row = n_groups * config.group_size // CODES_PER_PACK * config.bits
        n_meta_groups = math.ceil(out_features * n_groups / META_GROUP_SIZE)
        codes = meta_codes_spec(out_features, n_groups, config.meta_bits)
        specs = {
            "qweight": BlobSpec("uint32", (out_features, words_per_row)),
            "scale_codes": codes,
            "scale_meta": BlobSpec("float16", (n_meta_groups, 2)),
            "zero_codes": codes,
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


def codebook_spec(config: StorageConfig) -> BlobSpec:
    """A vq config's codebook: fp16 (2^(dim·bits), dim), a blob of the tensor or (shared) the file's tensor."""
    return BlobSpec("float16", (1 << config.index_bits, config.dim))


def shared_codebook_name(bits: int, dim: int) -> str:
    """The name of the file tensor (role CODEBOOK_ROLE, fp16 codebook_spec's shape) that every `vq` tensor
    or block with `shared` and this (bits, dim) uses (SPEC.md §12.4)."""
    return f"codebook.v{bits}d{dim}"


def shared_codebooks(config: StorageConfig) -> set:
    """{(bits, dim)} of the shared vq codebooks a config (a `rows` config: its blocks) uses."""
    if config.scheme == "rows":
        return set().union(*(shared_codebooks(block) for _, block in config.blocks))
    return {(config.bits, config.dim)} if config.scheme == "vq" and config.shared else set()


def trellis_table_name(bits: int) -> str:
    """The name of the file tensor (role CODEBOOK_ROLE, fp16 (2^L, 1)) holding the levels every `trellis` tensor
    or block of `bits` bits per weight indexes (SPEC.md §13)."""
    return f"codebook.t{bits}"


TRELLIS_TABLE_SHAPE = (1 << TRELLIS_WINDOW_BITS, 1)


def file_codebook(part: StorageConfig) -> tuple[str, tuple] | None:
    """(name, shape) of the file's codebook tensor a non-`rows` config reads as its `codebook` blob (a shared
    vq codebook, a trellis table), or None when it has none in the file."""
    if part.scheme == "vq" and part.shared:
        return shared_codebook_name(part.bits, part.dim), codebook_spec(part).shape
    if part.scheme == "trellis":
        return trellis_table_name(part.bits), TRELLIS_TABLE_SHAPE
    return None


def file_codebooks(config: StorageConfig) -> dict:
    """{name: shape} of every file codebook tensor a config (a `rows` config: its blocks) uses."""
    found = (file_codebook(part) for _, _, part in leaves((0, 0), config))
    return dict(book for book in found if book)


def row_order_dtype(out_features: int) -> str:
    """The `rows` scheme's row_order blob: uint16 while the row indices fit, else uint32."""
    return "uint16" if out_features <= 1 << 16 else "uint32"


def block_blobs(blobs: dict, index: int) -> dict:
    """The blobs of block `index` of a `rows` tensor, under their own scheme's names ('0.qweight' → 'qweight')."""
    prefix = f"{index}."
    return {name[len(prefix):]: blob for name, blob in blobs.items() if name.startswith(prefix)}


def leaves(shape, config: StorageConfig) -> list[tuple[str, tuple, StorageConfig]]:
    """(blob-name prefix, shape, config) of each part stored by a non-`rows` scheme: the tensor itself,
    or each block of a `rows` tensor ('0.', (n_0, in), c_0), …"""
    if config.scheme != "rows":
        return [("", tuple(shape), config)]
    return [(f"{i}.", (count, shape[1]), block) for i, (count, block) in enumerate(config.blocks)]


def unpacked_extra_nbytes(shape, config: StorageConfig) -> int:
    """Bytes a runtime holds for this tensor beyond its file bytes: 6-bit metadata codes are unpacked
    to uint8 (out, G) at load (format_spec.affine.loaded_blobs; the reader releases their packed pages),
    8-bit ones and every other blob are used in place."""
    extra = 0
    for _, part_shape, part in leaves(shape, config):
        if part.scheme in META_ARRAYS and part.meta_bits != 8:
            out_features, _, n_groups = affine_dims(part_shape, part.group_size)
            packed = meta_codes_spec(out_features, n_groups, part.meta_bits).nbytes
            extra += len(META_ARRAYS[part.scheme]) * max(0, out_features * n_groups - packed)
    return extra


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
