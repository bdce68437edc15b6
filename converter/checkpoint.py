"""Reading a Hugging Face checkpoint directory: config → model spec, tensors streamed one at a time,
tokenizer files, content hash, license fields. Everything is validated before any heavy work."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.errors import ModelError
from .errors import ConversionError

SUPPORTED_DTYPES = ("F32", "F16", "BF16")
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass
class TensorInfo:
    name: str
    shape: tuple
    dtype: str  # safetensors dtype string
    file: Path
    role: str  # linear | embedding | lm_head | norm | bias
    span: tuple = (0, 0)  # absolute byte range of the tensor's data in `file`


@dataclass
class Checkpoint:
    path: Path
    model: dict  # the .mxq `model` object (SPEC §3.1)
    config: ModelConfig  # the same, validated (what the runtime will read)
    tensors: dict  # name -> TensorInfo, in a canonical order
    tokenizer: dict  # the .mxq `tokenizer` object without its blob
    tokenizer_data: bytes
    license: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def linears(self) -> list:
        return [t for t in self.tensors.values() if t.role == "linear"]

    def content_hash(self) -> str:
        """sha256 over config.json and the tensor files (names and bytes), in a fixed order."""
        digest = hashlib.sha256()
        files = [self.path / "config.json"] + sorted({t.file for t in self.tensors.values()})
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()

    def load(self, name: str):
        """One tensor as float32 torch, read with plain bounds-checked file reads (no mmap: mapped
        pages would stay resident and make peak memory track the whole model, not its largest tensor)."""
        import torch

        info = self.tensors[name]
        start, end = info.span
        if end - start != DTYPE_BYTES[info.dtype] * math.prod(info.shape) or end > info.file.stat().st_size:
            raise ConversionError(f"{info.file.name}: tensor '{name}' data offsets are inconsistent with its "
                                  f"shape and dtype or lie past the end of the file")
        with open(info.file, "rb") as handle:
            handle.seek(start)
            data = bytearray(handle.read(end - start))
        tensor = torch.frombuffer(data, dtype=getattr(torch, TORCH_DTYPES[info.dtype])).reshape(info.shape)
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise ConversionError(f"{info.file.name}: tensor '{name}' contains NaN or Inf")
        return tensor


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{path}: cannot read {what}: {str(error)[:100]}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: {what} is not a JSON object")
    return value


def model_config(config: dict, config_path: Path) -> ModelConfig:
    """The validated model config of an HF config.json, through the family contract
    (runtime/architectures): unsupported families, features and bad values fail here, in one line
    naming the field, before any heavy work."""
    try:
        return ModelConfig.from_hf(config)
    except ModelError as error:
        raise ConversionError(f"{config_path}: {error}") from None


def model_spec(config: dict, path: Path) -> tuple[dict, list]:
    """The .mxq `model` object (SPEC §3.1) of an HF config.json, and notes for the report."""
    return model_config(config, Path(path) / "config.json").to_json(), []


def expected_tensors(config: ModelConfig) -> dict:
    """name -> (shape, role) of every tensor the model stores, in file order (from the contract)."""
    return {name: (tuple(getattr(config, d) for d in spec.shape), spec.role)
            for name, spec in config.family.all_tensors(config)}


def _fused_parts(config: ModelConfig, expected: dict, index: dict) -> dict:
    """canonical name -> (checkpoint name, first row, end row, rows of the fused tensor) for tensors
    the checkpoint stores fused (Phi-3's qkv_proj, gate_up_proj: see runtime/architectures/phi3.py)."""
    parts = {}
    for fused in config.family.fused:
        for i in range(config.num_hidden_layers):
            source = fused.source.format(i=i)
            if source not in index:
                continue
            names = [part.format(i=i) for part in fused.parts]
            total, row = sum(expected[name][0][0] for name in names), 0
            for name in names:
                rows = expected[name][0][0]
                parts[name] = (source, row, row + rows, total)
                row += rows
    return parts


def _index_tensors(path: Path) -> dict:
    """name -> (file, dtype, shape) from the safetensors headers (no tensor data read)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = _read_json(index_file, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_file}: missing 'weight_map'")
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise ConversionError(f"{path}: no model.safetensors (or shards with an index) found; "
                                  f"only safetensors checkpoints are read (no pickle)")
        files = [path / name for name in found]
    index = {}
    for file in files:
        header, data_start = _safetensors_header(file)
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            offsets = meta.get("data_offsets")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1]):
                raise ConversionError(f"{file.name}: tensor '{name}' has invalid data_offsets")
            shape = meta.get("shape", ())
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ConversionError(f"{file.name}: tensor '{name}' has an invalid shape")
            span = (data_start + offsets[0], data_start + offsets[1])
            index[name] = (file, meta.get("dtype"), tuple(shape), span)
    return index


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(header JSON, absolute offset where tensor data starts) of a safetensors file."""
    try:
        with open(file, "rb") as handle:
            raw_len = handle.read(8)
            size = file.stat().st_size
            if len(raw_len) < 8 or int.from_bytes(raw_len, "little") > min(size - 8, 100 << 20):
                raise ConversionError(f"{file}: not a safetensors file (bad header length)")
            header_len = int.from_bytes(raw_len, "little")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise ConversionError(f"{file}: shard listed in the index is missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConversionError(f"{file}: not a safetensors file (header does not parse)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: not a safetensors file")
    return header, 8 + header_len


def _tokenizer(path: Path, config: dict) -> tuple[dict, bytes]:
    """Prefer tokenizer.json (what transformers loads by default), else tokenizer.model."""
    tok_config = {}
    if (path / "tokenizer_config.json").exists():
        tok_config = _read_json(path / "tokenizer_config.json", "tokenizer_config.json")
    generation = {}
    if (path / "generation_config.json").exists():
        generation = _read_json(path / "generation_config.json", "generation_config.json")
    if (path / "tokenizer.json").exists():
        kind, data = "hf-tokenizers", (path / "tokenizer.json").read_bytes()
    elif (path / "tokenizer.model").exists():
        kind, data = "sentencepiece", (path / "tokenizer.model").read_bytes()
    else:
        raise ConversionError(f"{path}: no tokenizer.json or tokenizer.model found")

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return _token_to_id(kind, data, value, path)
        return None

    bos = config.get("bos_token_id")
    if bos is None:
        bos = token_id(tok_config.get("bos_token"))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        eos = token_id(tok_config.get("eos_token"))
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    if kind == "sentencepiece":
        add_bos = bool(tok_config.get("add_bos_token", True))
    else:
        add_bos = _post_processor_adds_bos(data, bos, path)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return {"kind": kind, "bos_token_id": bos if isinstance(bos, int) else None, "eos_token_ids": eos_ids,
            "add_bos_token": add_bos and isinstance(bos, int), "chat_template": template}, data


def _token_to_id(kind, data, token, path):
    if kind == "hf-tokenizers":
        from tokenizers import Tokenizer
        return Tokenizer.from_str(data.decode("utf-8")).token_to_id(token)
    import sentencepiece
    processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    piece_id = processor.piece_to_id(token)
    return piece_id if processor.id_to_piece(piece_id) == token else None


def _post_processor_adds_bos(data: bytes, bos, path: Path) -> bool:
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # noqa: BLE001 - the library raises plain Exception
        raise ConversionError(f"{path / 'tokenizer.json'}: does not load: {str(error)[:100]}") from None
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    return isinstance(bos, int) and bool(with_special) and with_special[0] == bos


def _license(path: Path, config: dict) -> dict:
    """license / model-card fields from README.md front matter, when the checkpoint has them."""
    fields = {}
    readme = path / "README.md"
    if readme.exists():
        text = readme.read_text(encoding="utf-8", errors="replace")
        match = re.match(r"---\n(.*?)\n---", text, re.S)
        if match:
            for line in match.group(1).splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("license", "license_name", "license_link", "base_model", "language",
                                   "pipeline_tag") and value.strip():
                    fields[key.strip()] = value.strip()
    for key in ("_name_or_path",):
        if isinstance(config.get(key), str) and config[key]:
            fields["name_or_path"] = config[key]
    return fields


def read_checkpoint(path) -> Checkpoint:
    """Validate an HF directory completely (config, every tensor's presence, shape, dtype; no tensor
    the family's contract does not know)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    raw_config = _read_json(path / "config.json", "config.json")
    config = model_config(raw_config, path / "config.json")
    index = _index_tensors(path)
    expected = expected_tensors(config)
    fused = _fused_parts(config, expected, index)
    tensors = {}
    for name, (shape, role) in expected.items():
        source, rows = (name, None) if name in index or name not in fused else (fused[name][0], fused[name][1:])
        # rows: (first, end, total) when `name` is a row block of the fused checkpoint tensor `source`
        if source not in index:
            if name == "lm_head.weight":
                raise ConversionError(f"{path}: tensor 'lm_head.weight' is missing "
                                      "(config says embeddings are not tied)")
            raise ConversionError(f"{path}: tensor '{name}' is missing from the checkpoint")
        file, dtype, actual, span = index[source]
        if dtype not in SUPPORTED_DTYPES:
            raise ConversionError(f"{file.name}: tensor '{source}' has dtype {dtype}, supported: {SUPPORTED_DTYPES}")
        if rows is not None:  # a row block of a fused tensor: rows of a row-major tensor are one byte range
            first, end, total = rows
            if actual != (total, shape[1]):
                raise ConversionError(f"{file.name}: tensor '{source}' has shape {list(actual)}, "
                                      f"expected {[total, shape[1]]}")
            row_bytes = DTYPE_BYTES[dtype] * shape[1]
            span = (span[0] + first * row_bytes, span[0] + end * row_bytes)
        elif tuple(actual) != tuple(shape):
            raise ConversionError(f"{file.name}: tensor '{name}' has shape {list(actual)}, expected {list(shape)}")
        tensors[name] = TensorInfo(name, tuple(shape), dtype, file, role, span)
    notes = _check_unknown(config, index, set(tensors) | {fused[n][0] for n in tensors if n in fused}, path)
    tokenizer, tokenizer_data = _tokenizer(path, raw_config)
    spec = config.to_json()
    if spec["bos_token_id"] is None:
        spec["bos_token_id"] = tokenizer["bos_token_id"]
    if not spec["eos_token_id"] and tokenizer["eos_token_ids"]:
        spec["eos_token_id"] = tokenizer["eos_token_ids"]
    try:
        config = ModelConfig.from_json(spec, where="")
    except ModelError as error:
        raise ConversionError(f"{path}: token ids from the tokenizer files: {error}") from None
    return Checkpoint(path, config.to_json(), config, tensors, tokenizer, tokenizer_data,
                      _license(path, raw_config), notes)


def _check_unknown(config: ModelConfig, index: dict, used: set, path: Path) -> list:
    """A checkpoint tensor the contract does not know is an error, never silently dropped. Known
    but unused: the family's `unused` buffers, and lm_head.weight when the embeddings are tied
    (transformers ignores it too). Returns notes for the report."""
    fam, notes = config.family, []
    unused = {pattern.format(i=i) for pattern in fam.unused for i in range(config.num_hidden_layers)}
    for name in index:
        if name in used or name in unused:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            notes.append("lm_head.weight ignored: the config ties it to the embeddings")
            continue
        raise ConversionError(f"{path}: tensor '{name}' is not part of the {fam.name} model contract "
                              f"({config.hf_architecture}); refusing to drop it silently")
    return notes
