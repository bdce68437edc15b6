"""Where calibration keeps its data: layer-boundary activations during the run, and the statistics it
produces (on disk, read back one matrix at a time).

Statistics directory (one per checkpoint/text/token count, see calibrate.load_or_calibrate):
    meta.json                 {"version", "loss", "tokens", "fisher_dtype", "files": {file: {"bytes",
                               "sha256"}}, "tensors": {linear name: file}}  — written last
    layer-0000.safetensors    per decoder linear of the layer: "<name>.fisher" (out, in) bfloat16 (the
                              Fisher diagonal; bf16 keeps fp32's exponent range, fp16 would underflow)
                              and "<name>.input_sq" (in,) float32
    matrices.safetensors      the matrices stored once (meta "matrices": {"embedding", "lm_head"} names;
                              lm_head = the embedding when tied): "head_fisher" (vocab, hidden) bfloat16,
                              the Fisher of the head's use; the embedding's use, sparse over the U token
                              ids the text contains: "embedding_rows" (U,) int64, "embedding_fisher"
                              (U, hidden) float32, "embedding_counts" (U,) int64 occurrences
Files are written to a ".partial" sibling, fsynced, and the directory renamed into place at the end,
so a crash never leaves a directory that looks complete. Opening checks every file's size and
sha256 and every tensor's name, shape and dtype (from the headers); reading a tensor checks its header
entry again and reads only its bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import DTYPE_BYTES, TORCH_DTYPES, _safetensors_header
from .errors import ConversionError

FORMAT_VERSION = 3  # 3: the embedding's and lm_head's Fisher (matrices.safetensors)
MATRICES_FILE = "matrices.safetensors"
FISHER_DTYPE = torch.bfloat16  # default; float32 is there for exact comparisons (tests)
INPUT_SQ_DTYPE = torch.float32
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
DTYPES_BY_NAME = {"BF16": torch.bfloat16, "F32": torch.float32}
STORED_DTYPES = {**DTYPES_BY_NAME, "I64": torch.int64}  # what a statistics file may hold


# -- checkpoint rows ---------------------------------------------------------------------------------

class CheckpointRows:
    """Rows of one 2-D checkpoint tensor read on demand as float32 (the embedding and the lm_head of
    a 128k-vocabulary model are 2 GiB each in float32: never loaded whole). `rows[ids]` gathers rows
    (what TorchBackend.embedding asks for), `rows.slice(r0, r1)` reads a contiguous block."""

    def __init__(self, checkpoint, name: str):
        self.info = info = checkpoint.tensors[name]
        self.shape = info.shape
        self.row_bytes = DTYPE_BYTES[info.dtype] * info.shape[1]
        start, end = info.span
        if end - start != self.row_bytes * info.shape[0] or end > info.file.stat().st_size:
            raise ConversionError(f"{info.file.name}: tensor '{name}' data offsets are inconsistent with its "
                                  f"shape and dtype or lie past the end of the file")

    def _decode(self, data: bytearray, n_rows: int) -> torch.Tensor:
        dtype = getattr(torch, TORCH_DTYPES[self.info.dtype])
        rows = torch.frombuffer(data, dtype=dtype).reshape(n_rows, self.shape[1]).to(torch.float32)
        if not torch.isfinite(rows).all():
            raise ConversionError(f"{self.info.file.name}: tensor '{self.info.name}' contains NaN or Inf")
        return rows

    def slice(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1-1 → (r1 - r0, cols) float32."""
        with open(self.info.file, "rb") as handle:
            handle.seek(self.info.span[0] + r0 * self.row_bytes)
            data = bytearray(handle.read((r1 - r0) * self.row_bytes))
        return self._decode(data, r1 - r0)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) → (T, cols) float32, each distinct row read once."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        data = bytearray(len(unique) * self.row_bytes)
        with open(self.info.file, "rb") as handle:
            for k, row in enumerate(unique.tolist()):
                handle.seek(self.info.span[0] + row * self.row_bytes)
                data[k * self.row_bytes:(k + 1) * self.row_bytes] = handle.read(self.row_bytes)
        return self._decode(data, len(unique))[inverse]


# -- layer-boundary activations ----------------------------------------------------------------------

class ActivationStore:
    """Activations at the layer boundaries, each (chunks, T, hidden) float32: kept in RAM up to
    `ram_bytes` in total, the rest in a memory-mapped file under `spill_dir` (mapped only while a
    boundary is being written or read, so resident memory stays one boundary)."""

    def __init__(self, shape: tuple, ram_bytes: int, spill_dir: Path):
        self.shape = tuple(shape)
        self.nbytes = 4 * math.prod(self.shape)
        self.ram_bytes, self.spill_dir = ram_bytes, Path(spill_dir)
        self.in_ram: dict[int, torch.Tensor] = {}
        self.on_disk: dict[int, Path] = {}

    def put(self, index: int, x: torch.Tensor) -> None:
        """Store boundary `index` (kept by reference in RAM: the caller does not modify x afterwards)."""
        if (len(self.in_ram) + 1) * self.nbytes <= self.ram_bytes:
            self.in_ram[index] = x.detach()
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"boundary-{index:04d}.f32"
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=self.shape)
        mapped[...] = x.detach().numpy()
        mapped.flush()
        del mapped
        self.on_disk[index] = path

    def get(self, index: int) -> torch.Tensor:
        """(chunks, T, hidden) float32 — a view of the file for a spilled boundary (do not write to it)."""
        if index in self.in_ram:
            return self.in_ram[index]
        return torch.from_numpy(np.load(self.on_disk[index], mmap_mode="c"))  # copy-on-write: never written

    def drop(self, index: int) -> None:
        self.in_ram.pop(index, None)
        path = self.on_disk.pop(index, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for index in list(self.in_ram) + list(self.on_disk):
            self.drop(index)


# -- statistics on disk -------------------------------------------------------------------------------

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class StatsWriter:
    """Writes a statistics directory layer by layer into `<directory>.partial`; `commit` makes it
    appear at `directory` atomically."""

    def __init__(self, directory: Path, fisher_dtype=FISHER_DTYPE):
        self.directory, self.fisher_dtype = Path(directory), fisher_dtype
        self.partial = self.directory.with_name(self.directory.name + ".partial")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.files: dict[str, dict] = {}
        self.tensors: dict[str, str] = {}
        self.matrices: dict[str, str] = {}

    def write_layer(self, index: int, fisher: dict, input_sq: dict) -> None:
        """fisher: name → float32 (out, in); input_sq: name → float32 (in,)."""
        file = f"layer-{index:04d}.safetensors"
        tensors = {}
        for name in fisher:
            tensors[f"{name}.fisher"] = fisher[name].detach().to(self.fisher_dtype).contiguous()
            tensors[f"{name}.input_sq"] = input_sq[name].detach().to(INPUT_SQ_DTYPE).contiguous()
            if not (torch.isfinite(tensors[f"{name}.fisher"]).all() and torch.isfinite(input_sq[name]).all()):
                raise ConversionError(f"calibration: the statistics of '{name}' are not finite "
                                      "(the model overflows in float32 on the calibration text)")
            self.tensors[name] = file
        path = self.partial / file
        save_file(tensors, path)
        _fsync_file(path)
        self.files[file] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}

    def write_matrices(self, embedding: str, lm_head: str, head_fisher: torch.Tensor, rows: torch.Tensor,
                       embedding_fisher: torch.Tensor, counts: torch.Tensor) -> None:
        """The stored-once matrices' Fisher: the head's use (vocab, hidden) and the embedding's use over
        the rows seen (U,), (U, hidden), with their occurrence counts (U,)."""
        tensors = {"head_fisher": head_fisher.to(self.fisher_dtype).contiguous(),
                   "embedding_rows": rows.to(torch.int64).contiguous(),
                   "embedding_fisher": embedding_fisher.to(torch.float32).contiguous(),
                   "embedding_counts": counts.to(torch.int64).contiguous()}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ConversionError("calibration: the Fisher of the embedding or lm_head is not finite "
                                  "(the model overflows in float32 on the calibration text)")
        path = self.partial / MATRICES_FILE
        save_file(tensors, path)
        _fsync_file(path)
        self.files[MATRICES_FILE] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        self.matrices = {"embedding": embedding, "lm_head": lm_head}

    def commit(self, loss: float, tokens: int) -> dict:
        """Finish the directory; returns its meta.json content."""
        meta = {"version": FORMAT_VERSION, "loss": loss, "tokens": tokens,
                "fisher_dtype": SAFETENSORS_DTYPES[self.fisher_dtype], "files": self.files,
                "tensors": self.tensors, "matrices": self.matrices}
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_file(self.partial / "meta.json")
        _fsync_file(self.partial)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.partial.rename(self.directory)
        _fsync_file(self.directory.parent)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


class StatsFile:
    """One statistics file (safetensors) read a tensor at a time: the header parsed once (on first use),
    then each tensor's bytes with one plain file read (no mapping of the whole file per access), checked
    against the header and, when given, the dtype and shape the caller expects. Values are not scanned:
    StatsWriter wrote only finite ones and open_stats checked the file's sha256 against meta.json."""

    def __init__(self, path: Path, directory: Path):
        self.path, self.directory = Path(path), Path(directory)
        self._header: tuple[dict, int, int] | None = None  # (header, data start, file size)

    def _fail(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path}: {what}; delete {self.directory}")

    def read(self, key: str, dtype: torch.dtype | None = None, shape: tuple | None = None) -> torch.Tensor:
        """The tensor `key` in its stored dtype."""
        try:
            if self._header is None:
                self._header = (*_safetensors_header(self.path), self.path.stat().st_size)
        except (ConversionError, OSError) as error:  # a damaged file; the message starts with its path
            raise self._fail(f"cannot read '{key}' ({str(error).removeprefix(f'{self.path}: ')[:80]})") from None
        header, data_start, file_size = self._header
        entry = header.get(key)
        try:
            stored, stored_shape = STORED_DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            stored = None
        expected = f" (not {SAFETENSORS_DTYPES[dtype]} {list(shape)})" if dtype is not None else ""
        if (stored is None or (dtype is not None and stored != dtype)
                or (shape is not None and stored_shape != tuple(shape))
                or not 0 <= begin <= end or end - begin != stored.itemsize * math.prod(stored_shape)):
            raise self._fail(f"'{key}' is damaged{expected}")
        if data_start + end > file_size:
            raise self._fail(f"'{key}' is cut short")
        raw = bytearray(end - begin)
        try:
            with open(self.path, "rb") as handle:
                handle.seek(data_start + begin)
                if handle.readinto(raw) != len(raw):
                    raise self._fail(f"'{key}' is cut short")
        except OSError as error:
            raise self._fail(f"cannot read '{key}' ({str(error)[:80]})") from None
        if not raw:
            return torch.empty(stored_shape, dtype=stored)
        return torch.frombuffer(raw, dtype=stored).reshape(stored_shape)


class LazyStats(Mapping):
    """name → float32 tensor read from the statistics directory on access (never all at once).
    kind "fisher": shaped like W (out, in); kind "input_sq": (in,). Each layer file is a StatsFile."""

    def __init__(self, directory: Path, meta: dict, shapes: dict, kind: str):
        self.directory, self.tensors, self.shapes, self.kind = Path(directory), meta["tensors"], shapes, kind
        self.dtype = DTYPES_BY_NAME[meta["fisher_dtype"]] if kind == "fisher" else INPUT_SQ_DTYPE
        self.files: dict[str, StatsFile] = {}  # layer file name → its reader

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.tensors[name]  # KeyError for a name that is not a decoder linear
        if file not in self.files:
            self.files[file] = StatsFile(self.directory / file, self.directory)
        shape = _stat_shape(self.shapes[name], self.kind)
        return self.files[file].read(f"{name}.{self.kind}", self.dtype, shape).to(torch.float32)  # a copy for bf16

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


class MatrixFisher(Mapping):
    """name → float32 Fisher diagonal of a matrix stored once (the embedding, an untied lm_head), read
    on access. A tied matrix serves both uses: its Fisher is the sum of the two (the diagonal
    approximation ignores the cross term, as it does within every matrix).

    The head's use covers every row (every token's logit is in every softmax). The embedding's use
    covers only the token ids the calibration text contains; rows it never touches get a Good–Turing
    share: the N calibration tokens predict that unseen tokens make up n1/N of text like it (n1: ids
    seen exactly once), so the unseen rows share n1 occurrences evenly, each occurrence worth the mean
    Fisher of one seen occurrence (Σ_seen F / N, per column). On SmolLM2 (8192 Botchan tokens, 4% of
    the 49k rows seen) this predicts 15% unseen tokens; held-out Botchan has 19%, WikiText-2 48%. Giving
    every unseen row a whole occurrence instead (add-one) would predict 576% and make the embedding's
    unseen rows outweigh all its seen ones."""

    VERSION = 2  # of the estimate (part of the error cache's key): 2 = Good–Turing for unseen rows

    def __init__(self, directory: Path, meta: dict, shapes: dict):
        self.path, self.names = Path(directory) / MATRICES_FILE, meta["matrices"]
        self.file = StatsFile(self.path, Path(directory))
        self.shapes, self.dtype = shapes, DTYPES_BY_NAME[meta["fisher_dtype"]]

    def _read(self, key: str) -> torch.Tensor:
        value = self.file.read(key)
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConversionError(f"{self.path}: '{key}' is damaged; delete {self.path.parent}")
        return value

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names.values():
            raise KeyError(name)
        fisher = torch.zeros(self.shapes[name], dtype=torch.float32)
        if name == self.names["lm_head"]:
            fisher += self._read("head_fisher").to(torch.float32)
        if name == self.names["embedding"]:
            rows, seen, counts = (self._read(k) for k in ("embedding_rows", "embedding_fisher", "embedding_counts"))
            if rows.numel() and (rows.min() < 0 or rows.max() >= fisher.shape[0]):
                raise ConversionError(f"{self.path}: 'embedding_rows' is damaged; delete {self.path.parent}")
            unseen = torch.ones(fisher.shape[0], dtype=torch.bool)
            unseen[rows] = False
            occurrence = seen.sum(0) / max(int(counts.sum()), 1)  # (hidden,) the mean Fisher of one occurrence
            share = max(int((counts == 1).sum()), 1) / max(int(unseen.sum()), 1)  # Good–Turing occurrences per row
            fisher[unseen] += occurrence * share
            fisher[rows] += seen
        return fisher

    def __iter__(self):
        return iter(dict.fromkeys(self.names.values()))

    def __len__(self):
        return len(set(self.names.values()))


def _stat_shape(weight_shape: tuple, kind: str) -> tuple:
    return tuple(weight_shape) if kind == "fisher" else (weight_shape[1],)


def open_stats(directory: Path, shapes: dict, matrix_shapes: dict) -> tuple[dict, str | None]:
    """(meta, None) for a sound statistics directory covering every linear in `shapes`
    (name → weight shape) and the stored-once matrices in `matrix_shapes`, else (None, why not) —
    an absent directory gives (None, None)."""
    directory = Path(directory)
    if not (directory / "meta.json").exists():
        return None, None
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("version") != FORMAT_VERSION:
            return None, f"format version {meta.get('version')!r}, expected {FORMAT_VERSION}"
        if set(meta["tensors"]) != set(shapes):
            return None, "it does not cover the checkpoint's linears"
        for file, facts in meta["files"].items():
            path = directory / file
            if not path.exists() or path.stat().st_size != facts["bytes"] or _sha256(path) != facts["sha256"]:
                return None, f"{file} is missing or its size/checksum differs"
        fisher_dtype = DTYPES_BY_NAME[meta["fisher_dtype"]]
        headers = {file: _safetensors_header(directory / file)[0] for file in set(meta["tensors"].values())}
        for name, file in meta["tensors"].items():
            for kind, dtype in (("fisher", fisher_dtype), ("input_sq", INPUT_SQ_DTYPE)):
                entry = headers[file][f"{name}.{kind}"]
                if (tuple(entry["shape"]) != _stat_shape(shapes[name], kind)
                        or entry["dtype"] != SAFETENSORS_DTYPES[dtype]):
                    return None, f"{file}: '{name}.{kind}' has the wrong shape or dtype"
        if MATRICES_FILE not in meta["files"] or set(meta["matrices"]) != {"embedding", "lm_head"}:
            return None, "it has no Fisher of the embedding and lm_head"
        head_shape = tuple(_safetensors_header(directory / MATRICES_FILE)[0]["head_fisher"]["shape"])
        if head_shape != tuple(matrix_shapes.get(meta["matrices"]["lm_head"], ())):
            return None, f"{MATRICES_FILE}: 'head_fisher' has the wrong shape"
        float(meta["loss"]), int(meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ConversionError) as error:
        return None, f"unreadable ({str(error)[:80]})"
    return meta, None
