"""Streaming writer for .mxq files (SPEC.md).

The plan (every tensor's name, shape and storage config) is known before any data is written,
so the layout and the JSON document are fixed up front; tensors are then streamed one at a
time in plan order, and only the crc32 fields (fixed-width hex) are filled in at the end.
Output goes to a hidden temporary file in the destination directory (unpredictable name, created
with O_EXCL|O_NOFOLLOW), fsynced and renamed into place on success, deleted on any failure or
SIGINT/SIGTERM; temporaries left by killed processes are removed by the next write to the same
target. An interrupted write never leaves a .mxq file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .affine import check_blobs, stored_blobs
from .header import DEFAULT_ALIGNMENT, HEADER_NBYTES, HEADER_STRUCT, MAGIC, MAJOR_VERSION, minor_version
from .layout import CODEBOOK_ROLE, StorageConfig, align_up, blob_specs, file_codebooks
from .rows import row_order_problem
from . import tokenizer_blob
from .tokenizer_schema import check_tokenizer

CRC_PLACEHOLDER = "00000000"


class OutputPathError(ValueError):
    """The output location cannot be written (one line naming the path)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that cleanup code runs (see `terminate_as_exception`)."""


def check_output_path(path, kind: str = "file") -> Path:
    """Fail fast, before any expensive work, unless `path` can be created or replaced: its
    directory exists and is writable (probed by creating and removing a temporary file there),
    and `path` is not a symbolic link, nor a directory when writing a file (`kind="file"`), nor a
    non-directory when writing a directory (`kind="directory"`)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"{path}: directory {parent} does not exist")
    if path.is_symlink():
        raise OutputPathError(f"{path}: is a symbolic link; refusing to write through it")
    if path.exists():
        if kind == "file" and not path.is_file():
            raise OutputPathError(f"{path}: exists and is not a regular file")
        if kind == "directory" and not path.is_dir():
            raise OutputPathError(f"{path}: exists and is not a directory")
    probe = temp_path(path, "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise OutputPathError(f"{path}: cannot write in {parent}: {error.strerror or error}") from None
    return path


def temp_path(target: Path, kind: str = "partial") -> Path:
    """A hidden, unpredictable sibling of `target`: .NAME.KIND-PID-RANDOM (PID lets a later run
    tell a live writer's temporary from a dead one's)."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(8)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list:
    """Delete temporaries of `target` (see temp_path; also the older .NAME.partial-PID form) whose
    process is gone; returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:partial|old|probe)-(\d+)(?:-[0-9a-f]{{16}})?")
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        stale = target.parent / name
        try:
            if stat.S_ISDIR(os.lstat(stale).st_mode):
                shutil.rmtree(stale)
            else:
                os.unlink(stale)
            removed.append(stale)
        except FileNotFoundError:  # another run removed it first
            pass
    return removed


def create_exclusive(path: Path):
    """A new file opened for binary writing; never follows or reuses an existing name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    return os.fdopen(fd, "wb")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def terminate_as_exception():
    """Within the block, SIGTERM raises Terminated (so `finally`/`__exit__` clean up) instead of
    killing the process outright. Only the main thread can install signal handlers; elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class TensorPlan:
    name: str
    shape: tuple
    config: StorageConfig
    role: str = "other"  # linear | embedding | lm_head | norm | bias | codebook | other (SPEC.md §4.1)


@dataclass
class _Slot:
    entry: dict  # the blob's JSON object (offset, nbytes, crc32 ...); not in the JSON of a packed entry
    dtype: str
    shape: tuple


def _json_bytes(document: dict) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass
class MxqWriter:
    """with MxqWriter(path, model=..., tokenizer=..., tokenizer_data=..., tensors=[...]) as w:
           for plan in tensors: w.write(plan.name, blobs)
    tokenizer_data: the tokenizer file itself; it is stored xz-compressed (tokenizer_blob.pack).
    Each tensor entry records its first blob's offset and one crc32 over its blobs (SPEC.md §4.1, the
    packed form of 1.5); blob_table=True writes every blob's object instead (the form of 1.0–1.4, which
    older readers read: ~100 JSON bytes more per blob)."""

    path: Path
    model: dict
    tokenizer: dict
    tokenizer_data: bytes
    tensors: list
    quantization: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT
    blob_table: bool = False

    def __post_init__(self):
        self.path = Path(self.path)
        names = [plan.name for plan in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in plan")
        plans = {plan.name: plan for plan in self.tensors}
        for plan in self.tensors:  # every file codebook a config uses is planned (SPEC.md §12.4, §13)
            for name, shape in sorted(file_codebooks(plan.config).items()):
                book = plans.get(name)
                if book is None or book.role != CODEBOOK_ROLE or book.config.scheme != "fp16" or \
                        tuple(book.shape) != shape:
                    raise ValueError(f"tensor {plan.name!r} uses the shared codebook {name!r}: plan it as an fp16 "
                                     f"tensor of shape {list(shape)} and role {CODEBOOK_ROLE!r}")
        vocab_size = self.model.get("vocab_size") if isinstance(self.model, dict) else None
        self._tokenizer_stored, self._tokenizer_blob = tokenizer_blob.pack(self.tokenizer, self.tokenizer_data)
        check_tokenizer(self._tokenizer_stored, vocab_size)
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._entries: dict[str, dict] = {}  # tensor name -> its JSON entry
        self._document, self._tokenizer_slot = self._layout()
        self._next = 0
        self._file = None
        self._tmp_path = None
        self._signals = None

    # -- layout ---------------------------------------------------------------------------------
    def _layout(self):
        """Place every blob; iterate because offsets (digits in the JSON) move the data start."""
        data_offset = align_up(HEADER_NBYTES, self.alignment)
        while True:
            document, tokenizer_slot, slots = self._document_for(data_offset)
            json_nbytes = len(_json_bytes(document))
            needed = align_up(HEADER_NBYTES + json_nbytes, self.alignment)
            if needed <= data_offset:
                self._slots = slots
                self._data_offset = data_offset
                self.file_nbytes = self._end
                return document, tokenizer_slot
            data_offset = needed

    def _document_for(self, data_offset: int):
        cursor = data_offset

        def place(dtype: str, shape: tuple, nbytes: int) -> _Slot:
            nonlocal cursor
            offset = align_up(cursor, self.alignment)
            cursor = offset + nbytes
            entry = {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes,
                     "crc32": CRC_PLACEHOLDER}
            return _Slot(entry, dtype, tuple(shape))

        tokenizer_slot = place("uint8", (len(self._tokenizer_blob),), len(self._tokenizer_blob))
        slots, entries = {}, {}
        for plan in self.tensors:
            specs = blob_specs(plan.shape, plan.config)
            slots[plan.name] = {name: place(spec.dtype, spec.shape, spec.nbytes) for name, spec in specs.items()}
            entry = {"name": plan.name, "shape": [int(d) for d in plan.shape], "role": plan.role,
                     "scheme": plan.config.scheme, "config": plan.config.to_json()}
            if self.blob_table:
                entry["blobs"] = {name: slot.entry for name, slot in slots[plan.name].items()}
            else:  # packed (SPEC §4.1): the blobs follow each other from here, one crc32 over their bytes
                entry.update(offset=next(iter(slots[plan.name].values())).entry["offset"], crc32=CRC_PLACEHOLDER)
            entries[plan.name] = entry
        self._end = cursor
        self._entries = entries
        document = {
            "format": "mxq",
            "alignment": self.alignment,
            "model": self.model,
            "tokenizer": {**self._tokenizer_stored, "blob": tokenizer_slot.entry},
            "quantization": self.quantization,
            "provenance": self.provenance,
            "tensors": list(entries.values()),
        }
        return document, tokenizer_slot, slots

    # -- writing --------------------------------------------------------------------------------
    def __enter__(self):
        check_output_path(self.path)
        remove_stale_temporaries(self.path)
        self._signals = terminate_as_exception()
        self._signals.__enter__()
        try:
            self._tmp_path = temp_path(self.path)
            self._file = create_exclusive(self._tmp_path)
            self._file.write(b"\0" * self._data_offset)  # header and JSON are written last
            self._put(self._tokenizer_slot, np.frombuffer(self._tokenizer_blob, dtype=np.uint8))
        except BaseException:
            self._discard()
            raise
        return self

    def _put(self, slot: _Slot, array: np.ndarray, crc: int = 0) -> int:
        """Write one blob at its offset; returns zlib.crc32 of its bytes continued from `crc` (a packed
        entry's running checksum), or of its bytes alone, recorded in its blob object (blob_table=True;
        the tokenizer blob: crc 0). The bytes are checksummed once either way."""
        array = np.ascontiguousarray(array, dtype=np.dtype(slot.dtype).newbyteorder("<"))  # a view when it is
        data = memoryview(array.reshape(-1).view(np.uint8))  # already that: no copy of a GiB-sized blob
        assert len(data) == slot.entry["nbytes"]
        position = self._file.tell()
        self._file.write(b"\0" * (slot.entry["offset"] - position))
        self._file.write(data)
        crc = zlib.crc32(data, crc)
        slot.entry["crc32"] = f"{crc:08x}"  # a blob object's (meaningful when crc started at 0)
        return crc

    def write(self, name: str, blobs: dict) -> None:
        """Write one tensor's blobs; tensors must come in plan order."""
        if self._file is None:
            raise RuntimeError("MxqWriter.write outside its with-block")
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            expected = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise ValueError(f"tensor {name!r} written out of order (expected {expected})")
        plan = self.tensors[self._next]
        try:
            blobs = stored_blobs(blobs, plan.shape, plan.config)  # 6-bit metadata codes bit-packed
            check_blobs(blobs, plan.shape, plan.config)
        except ValueError as error:
            raise ValueError(f"tensor {name!r}: {error}") from None
        if plan.config.scheme == "rows":
            problem = row_order_problem(blobs["row_order"], plan.shape[0])
            if problem:
                raise ValueError(f"tensor {name!r}: {problem}")
        crc = 0
        for blob_name, slot in self._slots[name].items():
            crc = self._put(slot, blobs[blob_name], 0 if self.blob_table else crc)
        if not self.blob_table:
            self._entries[name]["crc32"] = f"{crc:08x}"
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self._next != len(self.tensors):
                    raise ValueError(f"only {self._next} of {len(self.tensors)} tensors were written")
                json_data = _json_bytes(self._document)
                minor = minor_version((plan.config for plan in self.tensors), self._tokenizer_stored["kind"],
                                      packed=not self.blob_table and bool(self.tensors))
                header = HEADER_STRUCT.pack(MAGIC, MAJOR_VERSION, minor, zlib.crc32(json_data),
                                            len(json_data), self._data_offset)
                self._file.seek(0)
                self._file.write(header + json_data)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp_path, self.path)
                self._tmp_path = None
                fsync_directory(self.path.parent)
                self._discard()
                return False
        except BaseException:
            self._discard()
            raise
        self._discard()
        return False

    def _discard(self):
        """Close and delete the temporary (if any) and restore the SIGTERM handler."""
        try:
            if self._file is not None and not self._file.closed:
                self._file.close()
            if self._tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp_path)
                self._tmp_path = None
        finally:
            if self._signals is not None:
                signals, self._signals = self._signals, None
                signals.__exit__(None, None, None)
