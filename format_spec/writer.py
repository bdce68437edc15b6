"""Streaming writer for .mxq files (SPEC.md).

The plan (every tensor's name, shape and storage config) is known before any data is written,
so the layout and the JSON document are fixed up front; tensors are then streamed one at a
time in plan order, and only the crc32 fields (fixed-width hex) are filled in at the end.
Output goes to a hidden temporary file in the destination directory, renamed into place on
success and deleted on any failure: an interrupted write never leaves a .mxq file behind.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .affine import check_blobs
from .header import DEFAULT_ALIGNMENT, HEADER_NBYTES, HEADER_STRUCT, MAGIC, MAJOR_VERSION, MINOR_VERSION
from .layout import StorageConfig, align_up, blob_specs

CRC_PLACEHOLDER = "00000000"


@dataclass
class TensorPlan:
    name: str
    shape: tuple
    config: StorageConfig
    role: str = "other"  # linear | embedding | lm_head | norm | bias | other (SPEC.md §4.3)


@dataclass
class _Slot:
    entry: dict  # the blob's JSON object (offset, nbytes, crc32 ...)
    dtype: str
    shape: tuple


def _json_bytes(document: dict) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass
class MxqWriter:
    """with MxqWriter(path, model=..., tokenizer=..., tokenizer_data=..., tensors=[...]) as w:
           for plan in tensors: w.write(plan.name, blobs)"""

    path: Path
    model: dict
    tokenizer: dict
    tokenizer_data: bytes
    tensors: list
    quantization: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT

    def __post_init__(self):
        self.path = Path(self.path)
        names = [plan.name for plan in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in plan")
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._document, self._tokenizer_slot = self._layout()
        self._next = 0
        self._file = None
        self._tmp_path = None

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

        tokenizer_slot = place("uint8", (len(self.tokenizer_data),), len(self.tokenizer_data))
        slots, tensor_entries = {}, []
        for plan in self.tensors:
            specs = blob_specs(plan.shape, plan.config)
            slots[plan.name] = {name: place(spec.dtype, spec.shape, spec.nbytes) for name, spec in specs.items()}
            tensor_entries.append({
                "name": plan.name, "shape": [int(d) for d in plan.shape], "role": plan.role,
                "scheme": plan.config.scheme, "config": plan.config.to_json(),
                "blobs": {name: slot.entry for name, slot in slots[plan.name].items()},
            })
        self._end = cursor
        document = {
            "format": "mxq",
            "alignment": self.alignment,
            "model": self.model,
            "tokenizer": {**self.tokenizer, "blob": tokenizer_slot.entry},
            "quantization": self.quantization,
            "provenance": self.provenance,
            "tensors": tensor_entries,
        }
        return document, tokenizer_slot, slots

    # -- writing --------------------------------------------------------------------------------
    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_path = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        self._file = open(self._tmp_path, "wb")
        self._file.write(b"\0" * self._data_offset)  # header and JSON are written last
        self._put(self._tokenizer_slot, np.frombuffer(self.tokenizer_data, dtype=np.uint8))
        return self

    def _put(self, slot: _Slot, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=np.dtype(slot.dtype).newbyteorder("<")).tobytes()
        assert len(data) == slot.entry["nbytes"]
        position = self._file.tell()
        self._file.write(b"\0" * (slot.entry["offset"] - position))
        self._file.write(data)
        slot.entry["crc32"] = f"{zlib.crc32(data):08x}"

    def write(self, name: str, blobs: dict) -> None:
        """Write one tensor's blobs; tensors must come in plan order."""
        if self._file is None:
            raise RuntimeError("MxqWriter.write outside its with-block")
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            expected = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise ValueError(f"tensor {name!r} written out of order (expected {expected})")
        plan = self.tensors[self._next]
        check_blobs(blobs, plan.shape, plan.config)
        for blob_name, slot in self._slots[name].items():
            self._put(slot, blobs[blob_name])
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self._next != len(self.tensors):
                    raise ValueError(f"only {self._next} of {len(self.tensors)} tensors were written")
                json_data = _json_bytes(self._document)
                header = HEADER_STRUCT.pack(MAGIC, MAJOR_VERSION, MINOR_VERSION, zlib.crc32(json_data),
                                            len(json_data), self._data_offset)
                self._file.seek(0)
                self._file.write(header + json_data)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp_path, self.path)
                return False
        except BaseException:
            self._discard()
            raise
        self._discard()
        return False

    def _discard(self):
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
