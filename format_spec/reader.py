"""Reader for .mxq files: mmap, validate everything, hand out zero-copy NumPy views (SPEC.md §9).

Every number in the header and the JSON is checked (type, range, alignment, agreement with the
cost model's layout, bounds against the file length, no overlaps) before any view is made, so a
corrupt or hostile file yields MxqFormatError and never a crash or a huge allocation.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .affine import loaded_blobs
from .errors import MxqFormatError
from .header import HEADER_NBYTES, HEADER_STRUCT, MAGIC, MAJOR_VERSION, MAX_JSON_NBYTES
from .layout import (BLOCK_SCHEMES, CODEBOOK_ROLE, CODEBOOK_ROWS, GROUP_SIZES, META_BITS, META_GROUP_SIZE, SCHEMES,
                     TRELLIS_WINDOW_BITS,
                     StorageConfig, align_up, blob_specs, file_codebook, leaves)
from .packing import SUPPORTED_BITS
from .rows import content_problem, nonfinite_problem
from .strict_json import JsonError
from .strict_json import loads as strict_loads
from .tokenizer_blob import ratio_problem, unpack as unpack_tokenizer
from .tokenizer_schema import MetadataError, base_kind, check_tokenizer

MAX_DIM = 1 << 40
MAX_TENSORS = 1 << 20
VERIFY_CHUNK = 8 << 20  # verify reads the file in chunks of this size: memory stays flat


def open_regular(path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor for `path` if it is a regular file, else OSError. The open never blocks
    (O_NONBLOCK: a FIFO would wait for a writer forever) and the kind is checked with fstat on the
    opened descriptor, so a path swapped in between cannot slip through."""
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device or socket"
            raise OSError(f"{path}: is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class BlobRef:
    dtype: str
    shape: tuple
    offset: int
    nbytes: int
    crc32: str  # "" in a packed tensor entry: its crc32 covers all its blobs (TensorEntry.crc32)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple
    config: StorageConfig
    role: str
    blobs: dict  # blob name -> BlobRef, in file order
    crc32: str = ""  # packed entry (SPEC.md §4.1): CRC-32 of its blobs' bytes in order; else each blob has its own

    @property
    def nbytes(self) -> int:
        return sum(blob.nbytes for blob in self.blobs.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Check:
    """Small typed accessors that raise MxqFormatError naming the field."""

    def __init__(self, path):
        self.path = path

    def fail(self, message):
        raise MxqFormatError(self.path, message)

    def get(self, obj, key, kind, where):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(f"{where}: missing field '{key}'")
        value = obj[key]
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << 62):
                self.fail(f"{where}: field '{key}' must be a non-negative integer, got {value!r:.60}")
        elif not isinstance(value, kind):
            self.fail(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
        return value


class MxqFile:
    """An open .mxq file. Use MxqFile.open(path) or `with MxqFile.open(path) as f:`."""

    def __init__(self, path, mm: mmap.mmap | None, size: int, version, document: dict, data_offset: int,
                 fd: int | None = None):
        self.path = Path(path)
        self._mmap = mm
        self._fd = fd  # kept open for verify's chunked reads
        self.file_nbytes = size
        self.version = version
        self.document = document
        self.data_offset = data_offset
        self.alignment = document["alignment"]
        self.model = document["model"]
        self.tokenizer = document["tokenizer"]
        self.quantization = document.get("quantization", {}) if isinstance(document.get("quantization"), dict) else {}
        self.provenance = document.get("provenance", {}) if isinstance(document.get("provenance"), dict) else {}
        self.tensors: dict[str, TensorEntry] = {}  # the model's tensors (every role but CODEBOOK_ROLE)
        self.codebooks: dict[str, TensorEntry] = {}  # shared vq codebooks (role CODEBOOK_ROLE, SPEC.md §12.4)
        self.tokenizer_blob: BlobRef | None = None

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "MxqFile":
        path = Path(path)
        check = _Check(path)
        try:
            fd = open_regular(path)
        except OSError as error:
            check.fail(f"cannot open: {error.strerror}" if error.strerror else "not a regular file")
        mm = None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_NBYTES:
                check.fail(f"file is {size} bytes, shorter than the {HEADER_NBYTES}-byte header")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return cls._parse(path, mm, size, check, fd)
        except BaseException:
            if mm is not None:
                mm.close()
            os.close(fd)
            raise

    @classmethod
    def _parse(cls, path, mm, size, check, fd) -> "MxqFile":
        magic, major, minor, json_crc, json_nbytes, data_offset = HEADER_STRUCT.unpack_from(mm, 0)
        if magic != MAGIC:
            check.fail("not an .mxq file (bad magic bytes)")
        if major != MAJOR_VERSION:
            check.fail(f"format version {major}.{minor} is not supported (this reader reads {MAJOR_VERSION}.x)")
        if json_nbytes > MAX_JSON_NBYTES:
            check.fail(f"header field json_nbytes {json_nbytes} exceeds the {MAX_JSON_NBYTES}-byte cap")
        if HEADER_NBYTES + json_nbytes > size:
            check.fail(f"header field json_nbytes {json_nbytes} runs past the end of the file ({size} bytes)")
        if data_offset < HEADER_NBYTES + json_nbytes or data_offset > size:
            check.fail(f"header field data_offset {data_offset} is outside [{HEADER_NBYTES + json_nbytes}, {size}]")
        raw = mm[HEADER_NBYTES: HEADER_NBYTES + json_nbytes]
        if zlib.crc32(raw) != json_crc:
            check.fail("JSON metadata checksum mismatch (header corrupted)")
        try:
            document = strict_loads(raw)
        except JsonError as error:
            check.fail(f"JSON metadata {error}")
        if not isinstance(document, dict):
            check.fail("JSON metadata is not an object")
        if document.get("format") != "mxq":
            check.fail("JSON field 'format' must be \"mxq\"")
        alignment = check.get(document, "alignment", int, "JSON")
        if alignment < 8 or alignment & (alignment - 1) or data_offset % alignment:
            check.fail(f"JSON field 'alignment' {alignment} must be a power of two >= 8 dividing data_offset")
        for key in ("model", "tokenizer"):
            check.get(document, key, dict, "JSON")
        tensors = check.get(document, "tensors", list, "JSON")
        if len(tensors) > MAX_TENSORS:
            check.fail(f"JSON field 'tensors' lists {len(tensors)} tensors (cap {MAX_TENSORS})")
        try:
            check_tokenizer(document["tokenizer"], document["model"].get("vocab_size"))
        except MetadataError as error:
            check.fail(str(error))
        f = cls(path, mm, size, (major, minor), document, data_offset, fd)
        f._json_raw = raw
        spans = []
        tokenizer_blob = f._blob_ref(document["tokenizer"].get("blob"), "uint8", None, "tokenizer blob", check)
        f.tokenizer_blob = tokenizer_blob
        if problem := ratio_problem(document["tokenizer"], tokenizer_blob.nbytes):
            check.fail(problem)
        spans.append((tokenizer_blob.offset, tokenizer_blob.nbytes, "tokenizer blob"))
        end = tokenizer_blob.offset + tokenizer_blob.nbytes  # where the previous tensor's data ends
        for index, raw_entry in enumerate(tensors):
            entry = f._tensor_entry(raw_entry, index, check, align_up(end, alignment))
            if entry.name in f.tensors or entry.name in f.codebooks:
                check.fail(f"tensor '{entry.name}' appears twice")
            (f.codebooks if entry.role == CODEBOOK_ROLE else f.tensors)[entry.name] = entry
            spans += [(blob.offset, blob.nbytes, f"tensor '{entry.name}' blob '{name}'")
                      for name, blob in entry.blobs.items()]
            end = max(blob.offset + blob.nbytes for blob in entry.blobs.values())
        spans.sort()
        previous_end, previous_name = data_offset, "the JSON metadata"
        for offset, nbytes, name in spans:
            if offset < previous_end:
                check.fail(f"{name} at offset {offset} overlaps {previous_name}")
            previous_end, previous_name = offset + nbytes, name
        f._check_codebooks(check)
        return f

    def _check_codebooks(self, check) -> None:
        """Every file codebook a tensor (or block) uses — a shared vq codebook, a trellis table — is a codebook
        tensor of the right name, scheme and shape (SPEC.md §12.4, §13); every codebook tensor is fp16."""
        for entry in self.codebooks.values():
            if entry.config.scheme != "fp16" or len(entry.shape) != 2:
                check.fail(f"codebook tensor '{entry.name}': scheme {entry.config.scheme} shape {list(entry.shape)} "
                           "(a codebook is a 2-D fp16 tensor)")
        for entry in self.tensors.values():
            for _, _, part in leaves(entry.shape, entry.config):
                if (book := file_codebook(part)) is None:
                    continue
                name, shape = book
                codebook = self.codebooks.get(name)
                if codebook is None:
                    kind = "table" if part.scheme == "trellis" else "shared codebook"
                    check.fail(f"tensor '{entry.name}': its {kind} '{name}' is not in the file "
                               f"(a tensor of role '{CODEBOOK_ROLE}')")
                if tuple(codebook.shape) != shape:
                    check.fail(f"codebook tensor '{name}': shape {list(codebook.shape)} != {list(shape)}, "
                               f"which tensor '{entry.name}' needs")

    def _blob_ref(self, raw, dtype, shape, where, check) -> BlobRef:
        if not isinstance(raw, dict):
            check.fail(f"{where}: missing or not an object")
        if check.get(raw, "dtype", str, where) != dtype:
            check.fail(f"{where}: dtype {raw['dtype']!r:.40} != expected {dtype!r}")
        raw_shape = check.get(raw, "shape", list, where)
        dims = tuple(check.get({"d": d}, "d", int, f"{where} shape") for d in raw_shape)
        if shape is not None and dims != tuple(shape):
            check.fail(f"{where}: shape {list(dims)} != expected {list(shape)}")
        if len(dims) != 1 and shape is None:
            check.fail(f"{where}: shape must be 1-D")
        offset = check.get(raw, "offset", int, where)
        nbytes = check.get(raw, "nbytes", int, where)
        if any(d > MAX_DIM for d in dims) or nbytes != math.prod(dims) * np.dtype(dtype).itemsize:
            check.fail(f"{where}: nbytes {nbytes} does not match dtype {dtype} and shape {list(dims)}")
        self._check_span(offset, nbytes, where, check)
        return BlobRef(dtype, dims, offset, nbytes, self._crc32_field(raw, where, check))

    def _check_span(self, offset, nbytes, where, check) -> None:
        if offset % self.alignment:
            check.fail(f"{where}: offset {offset} is not aligned to {self.alignment}")
        if offset < self.data_offset or offset + nbytes > self.file_nbytes:
            check.fail(f"{where}: offset {offset} + nbytes {nbytes} lies outside the data region "
                       f"[{self.data_offset}, {self.file_nbytes})")

    @staticmethod
    def _crc32_field(raw, where, check) -> str:
        crc = check.get(raw, "crc32", str, where)
        if len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
            check.fail(f"{where}: crc32 must be 8 lowercase hex digits")
        return crc

    def _packed_blobs(self, raw, specs, start, where, check) -> dict:
        """A packed entry's blobs (SPEC.md §4.1): §5's blobs in order, the first at the entry's `offset`,
        which must be `start` (the first multiple of `alignment` after the previous tensor's data), each
        next one at the first multiple of `alignment` at or after the previous one's end."""
        cursor = check.get(raw, "offset", int, where)
        if cursor != start:
            check.fail(f"{where}: offset {cursor} != {start}, the first aligned byte after the previous tensor's data")
        blobs = {}
        for blob_name, spec in specs.items():
            offset = align_up(cursor, self.alignment)  # the first: `start`, aligned already
            self._check_span(offset, spec.nbytes, f"{where} blob '{blob_name}'", check)
            blobs[blob_name] = BlobRef(spec.dtype, tuple(spec.shape), offset, spec.nbytes, "")
            cursor = offset + spec.nbytes
        return blobs

    def _tensor_entry(self, raw, index, check, start) -> TensorEntry:
        where = f"tensor #{index}"
        name = check.get(raw, "name", str, where)
        if not name or not name.isprintable():  # names reach terminals and messages: one line each
            check.fail(f"{where}: name {name[:80]!r} is empty or has non-printable characters")
        where = f"tensor '{name[:200]}'"
        shape = tuple(check.get({"d": d}, "d", int, f"{where} shape") for d in check.get(raw, "shape", list, where))
        if not 1 <= len(shape) <= 4 or any(not 0 < d <= MAX_DIM for d in shape):
            check.fail(f"{where}: shape {list(shape)[:8]} is not 1 to 4 positive dimensions")
        scheme = check.get(raw, "scheme", str, where)
        if scheme not in SCHEMES:
            check.fail(f"{where}: scheme {scheme!r:.40} is not supported by this reader (reads {', '.join(SCHEMES)})")
        config = self._config(check.get(raw, "config", dict, where), scheme, shape, where, check)
        try:
            specs = blob_specs(shape, config, self.version[1])
        except ValueError as error:
            check.fail(f"{where}: {error}")
        role = raw.get("role", "other")
        role = role if isinstance(role, str) else "other"
        if "blobs" not in raw:  # the packed form (1.5)
            if "offset" not in raw:
                check.fail(f"{where}: missing field 'offset' (or 'blobs')")
            blobs = self._packed_blobs(raw, specs, start, where, check)
            return TensorEntry(name, shape, config, role, blobs, self._crc32_field(raw, where, check))
        if "offset" in raw or "crc32" in raw:
            check.fail(f"{where}: has both 'blobs' and the packed form's 'offset'/'crc32'")
        raw_blobs = check.get(raw, "blobs", dict, where)
        if set(raw_blobs) != set(specs):
            check.fail(f"{where}: blobs {sorted(raw_blobs)[:12]} != expected {sorted(specs)}")
        blobs = {blob_name: self._blob_ref(raw_blobs[blob_name], spec.dtype, spec.shape,
                                           f"{where} blob '{blob_name}'", check)
                 for blob_name, spec in specs.items()}
        return TensorEntry(name, shape, config, role, blobs)

    def _config(self, config_raw, scheme, shape, where, check) -> StorageConfig:
        """The StorageConfig of a tensor's (or a `rows` block's) "config" object, every field checked."""
        if scheme == "fp16":
            return StorageConfig.fp16()
        if len(shape) != 2:
            check.fail(f"{where}: scheme {scheme} needs a 2-D shape, got {list(shape)}")
        if scheme == "rows":
            return self._rows_config(config_raw, shape, where, check)
        bits = check.get(config_raw, "bits", int, f"{where} config")
        outliers = check.get(config_raw, "outliers", int, f"{where} config") if scheme != "trellis" else 0
        if scheme == "lut":
            rows = check.get(config_raw, "codebook_rows", int, f"{where} config")
            if bits not in SUPPORTED_BITS or rows not in CODEBOOK_ROWS or outliers < 0:
                check.fail(f"{where}: config bits={bits} codebook_rows={rows} outliers={outliers} is not supported")
            return StorageConfig.lut(bits, rows, outliers)
        group_size = check.get(config_raw, "group_size", int, f"{where} config")
        if scheme == "trellis":
            meta_bits = check.get(config_raw, "meta_bits", int, f"{where} config")
            fields = (bits, group_size, meta_bits, check.get(config_raw, "meta_group_size", int, f"{where} config"),
                      check.get(config_raw, "window_bits", int, f"{where} config"))
            config = None
            if fields[3:] == (META_GROUP_SIZE, TRELLIS_WINDOW_BITS) and meta_bits:
                try:
                    config = StorageConfig.trellis(bits, group_size, meta_bits)  # layout.py's rules
                except ValueError:
                    pass
            if config is None:
                check.fail(f"{where}: config bits={bits} group_size={group_size} meta_bits={meta_bits} "
                           f"meta_group_size={fields[3]} window_bits={fields[4]} is not supported")
            return config
        if scheme == "vq":
            dim = check.get(config_raw, "dim", int, f"{where} config")
            meta_bits = check.get(config_raw, "meta_bits", int, f"{where} config")
            meta_group_size = check.get(config_raw, "meta_group_size", int, f"{where} config")
            shared = config_raw.get("shared", False)  # 1.7; absent: the tensor's own codebook
            if not isinstance(shared, bool):
                check.fail(f"{where} config: field 'shared' must be true or false, got {shared!r:.40}")
            config = None
            if meta_group_size == META_GROUP_SIZE and outliers >= 0 and meta_bits:  # 0 would mean "the default"
                try:
                    config = StorageConfig.vq(bits, dim, group_size, outliers, meta_bits, shared)  # layout.py's rules
                except ValueError:
                    pass
            if config is None:
                check.fail(f"{where}: config bits={bits} dim={dim} group_size={group_size} meta_bits={meta_bits} "
                           f"meta_group_size={meta_group_size} outliers={outliers} shared={shared} is not supported")
            return config
        if bits not in SUPPORTED_BITS or group_size not in GROUP_SIZES or outliers < 0:
            check.fail(f"{where}: config bits={bits} group_size={group_size} outliers={outliers} is not supported")
        meta_bits = check.get(config_raw, "meta_bits", int, f"{where} config")
        if meta_bits not in META_BITS or \
                check.get(config_raw, "meta_group_size", int, f"{where} config") != META_GROUP_SIZE:
            check.fail(f"{where}: only meta_bits in {list(META_BITS)}, meta_group_size={META_GROUP_SIZE} are supported")
        return StorageConfig.affine(bits, group_size, outliers, meta_bits)

    def _rows_config(self, config_raw, shape, where, check) -> StorageConfig:
        """`rows` (SPEC.md §8): at least 2 blocks of positive row counts summing to out, each block one
        of BLOCK_SCHEMES with a config parsed exactly like a tensor's of that scheme."""
        raw_blocks = check.get(config_raw, "blocks", list, f"{where} config")
        if len(raw_blocks) < 2:
            check.fail(f"{where}: config 'blocks' lists {len(raw_blocks)} blocks (rows needs at least 2)")
        if len(raw_blocks) > shape[0]:
            check.fail(f"{where}: config 'blocks' lists {len(raw_blocks)} blocks for {shape[0]} rows")
        counts = []
        for i, raw_block in enumerate(raw_blocks):
            count = check.get(raw_block, "rows", int, f"{where} block {i}")
            if count < 1:
                check.fail(f"{where} block {i}: field 'rows' must be a positive integer, got {count}")
            counts.append(count)
        if sum(counts) != shape[0]:
            check.fail(f"{where}: row blocks cover {sum(counts)} rows, not {shape[0]}")
        blocks = []
        for i, (count, raw_block) in enumerate(zip(counts, raw_blocks)):
            block_where = f"{where} block {i}"
            scheme = check.get(raw_block, "scheme", str, block_where)
            if scheme not in BLOCK_SCHEMES:
                check.fail(f"{block_where}: scheme {scheme!r:.40} is not a block scheme (one of {', '.join(BLOCK_SCHEMES)})")
            config = self._config(check.get(raw_block, "config", dict, block_where), scheme, (count, shape[1]),
                                  block_where, check)
            blocks.append((count, config))
        return StorageConfig.rows(blocks)

    # -- access ----------------------------------------------------------------------------------
    def view(self, blob: BlobRef) -> np.ndarray:
        """Zero-copy read-only view of one blob (little-endian dtype)."""
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        dtype = np.dtype(blob.dtype).newbyteorder("<")
        count = math.prod(blob.shape)
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=blob.offset).reshape(blob.shape)

    def blobs(self, name: str) -> dict:
        """All blobs of tensor `name` (a model tensor or a codebook) as zero-copy views, keyed by blob name; a
        `vq` tensor (or block) with a shared codebook, and a `trellis` one, gets the file's codebook tensor as its
        `codebook` (`i.codebook`) blob, a view of that tensor's bytes, so that every consumer sees the blobs of
        SPEC.md §5's per-tensor form."""
        entry = self.tensors[name] if name in self.tensors else self.codebooks[name]
        views = {blob_name: self.view(ref) for blob_name, ref in entry.blobs.items()}
        loaded = loaded_blobs(views, entry.shape, entry.config)
        for blob_name, array in loaded.items():
            if array is not views[blob_name]:  # unpacked 6-bit metadata codes: the packed bytes are done with
                self._release(entry.blobs[blob_name])
        for prefix, _, part in leaves(entry.shape, entry.config):
            if (book := file_codebook(part)) is not None:
                loaded[prefix + "codebook"] = self.view(self.codebooks[book[0]].blobs["data"])
        return loaded

    def release_all(self) -> None:
        """Drop every page of the mapping from this process's resident memory (views stay valid: what is
        read again is faulted in from the file): for a reader that copied what it reads often."""
        if hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED") and len(self._mmap):
            self._mmap.madvise(mmap.MADV_DONTNEED, 0, len(self._mmap) // mmap.PAGESIZE * mmap.PAGESIZE)

    def _release(self, blob: BlobRef) -> None:
        """Drop the whole pages of a blob from this process's resident memory (they are read again from
        the file if ever touched): a blob used only to make an in-memory copy costs no RSS afterwards."""
        page = mmap.PAGESIZE
        start, end = -(-blob.offset // page) * page, (blob.offset + blob.nbytes) // page * page
        if end > start and hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tokenizer_data(self) -> bytes:
        """The tokenizer file: the blob's bytes, checked against their crc32 (small, so always checked),
        unpacked when its kind is +xz (SPEC.md §3.2)."""
        data = bytes(self.view(self.tokenizer_blob))
        if f"{zlib.crc32(data):08x}" != self.tokenizer_blob.crc32:
            raise MxqFormatError(self.path, "tokenizer blob: crc32 mismatch (the file is damaged)")
        try:
            return unpack_tokenizer(self.tokenizer, data)
        except ValueError as error:
            raise MxqFormatError(self.path, f"tokenizer blob: {error}") from None

    @property
    def tokenizer_kind(self) -> str:
        """What the tokenizer file is: 'sentencepiece' or 'hf-tokenizers' (without +xz)."""
        return base_kind(self.tokenizer["kind"])[0]

    @property
    def tokenizer_nbytes(self) -> int:
        """The tokenizer file's size (unpacked)."""
        return self.tokenizer["raw_nbytes"] if base_kind(self.tokenizer["kind"])[1] else self.tokenizer_blob.nbytes

    def _chunks(self, start: int, end: int):
        """The bytes [start, end) as successive memoryviews of one reused buffer: reading with
        pread instead of through the mapping keeps the resident memory at one chunk."""
        if self._fd is None:
            raise ValueError(f"{self.path}: file is closed")
        buffer = bytearray(min(VERIFY_CHUNK, max(end - start, 1)))
        view = memoryview(buffer)
        while start < end:
            count = os.preadv(self._fd, [view[: min(len(buffer), end - start)]], start)
            if count <= 0:
                raise MxqFormatError(self.path, f"file shrank while being read (at byte {start})")
            yield view[:count]
            start += count

    def blob_crc32(self, *refs: BlobRef) -> str:
        """CRC-32 of the blobs' bytes, one after the other (gaps excluded)."""
        crc = 0
        for ref in refs:
            for chunk in self._chunks(ref.offset, ref.offset + ref.nbytes):
                crc = zlib.crc32(chunk, crc)
        return f"{crc:08x}"

    def checksums(self) -> list:
        """(where, blobs, recorded crc32) for every checksum of the file: the tokenizer blob, then each
        packed tensor's (over all its blobs) or each blob's of a tensor with a blob table."""
        items = [("tokenizer blob", (self.tokenizer_blob,), self.tokenizer_blob.crc32)]
        for entry in [*self.tensors.values(), *self.codebooks.values()]:
            if entry.crc32:
                items.append((f"tensor '{entry.name}'", tuple(entry.blobs.values()), entry.crc32))
            else:
                items += [(f"tensor '{entry.name}' blob '{blob_name}'", (ref,), ref.crc32)
                          for blob_name, ref in entry.blobs.items()]
        return items

    def verify(self, progress=None, content: bool = True) -> list[str]:
        """Check every crc32 (a packed tensor's, or each blob's) and that every gap between blobs is zero, so that no byte of
        the file goes unchecked, that an +xz tokenizer blob unpacks (§3.2) and, with `content`, that every 2-D
        tensor's content keeps the rules a runtime checks before use (finite float16 blobs, fp16 weights
        included; CSR outliers; a `rows` tensor's row_order a permutation: SPEC.md §9); returns the problems
        found (empty when the file is intact). Reads the file once in VERIFY_CHUNK pieces, then, with
        `content`, the blobs the content rules look at (through the map: a runtime that checks content as
        it prepares each tensor passes content=False and keeps its pages out of memory)."""
        problems = []
        items = self.checksums()
        tokenizer_intact = True
        for where, refs, recorded in (progress(items) if progress else items):
            actual = self.blob_crc32(*refs)
            if actual != recorded:
                problems.append(f"{where}: crc32 {actual} != recorded {recorded}")
                tokenizer_intact = tokenizer_intact and refs[0] is not self.tokenizer_blob
        if tokenizer_intact:
            try:  # its crc holds: does it unpack (a hostile writer's xz stream may not)?
                self.tokenizer_data()
            except MxqFormatError as error:
                problems.append(error.detail)
        json_end = HEADER_NBYTES + len(self._json_raw)
        spans = sorted((ref.offset, ref.offset + ref.nbytes) for _, refs, _ in items for ref in refs)
        gaps = [(json_end, self.data_offset)] + [(a[1], b[0]) for a, b in zip(spans, spans[1:])]
        gaps.append((spans[-1][1], self.file_nbytes))
        for start, end in gaps:
            if end > start and self._has_nonzero(start, end):
                problems.append(f"padding bytes [{start}, {end}) are not zero")
        for entry in self.tensors.values() if content else ():  # what the layout cannot judge
            if len(entry.shape) == 2:
                problem = content_problem(self.blobs(entry.name), entry.shape, entry.config, weights=True)
                if problem:
                    problems.append(f"tensor '{entry.name}': {problem}")
        for name in self.codebooks if content else ():
            problem = nonfinite_problem(self.blobs(name), weights=True)
            if problem:
                problems.append(f"tensor '{name}': {problem}")
        return problems

    def _has_nonzero(self, start: int, end: int) -> bool:
        """Any non-zero byte in [start, end)? Holes of a sparse file are skipped (SEEK_DATA)."""
        position = start
        while position < end:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
                stop = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            except OSError as error:
                if error.errno == errno.ENXIO:  # nothing but a hole from here on
                    return False
                data, stop = position, end  # no sparse-file support here: read it all
            if data >= end:
                return False
            if any(np.frombuffer(chunk, dtype=np.uint8).any() for chunk in self._chunks(data, stop)):
                return True
            position = stop
        return False

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive: the mapping goes when they do
                pass
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
