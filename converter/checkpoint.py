"""Reading a Hugging Face checkpoint directory: config → model spec, tensors streamed one at a time,
tokenizer files, content hash, license fields. Everything is validated before any heavy work."""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.errors import ModelError
from .errors import ConversionError

SUPPORTED_DTYPES = ("F32", "F16", "BF16")
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
FP16_MAX = 65504.0
RACY_NS = 2_000_000_000  # content_hash does not remember files modified this recently
LOAD_BLOCK_BYTES = 4 << 20  # Checkpoint.load reads and checks a tensor in blocks of this many source bytes


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

    def layer_names(self, i: int) -> dict:
        """Decoder layer i's tensors in this checkpoint: contract key (q, attn_norm, …) → tensor name."""
        names = {spec.key: spec.for_layer(i) for spec in self.config.family.layer_tensors}
        return {key: name for key, name in names.items() if name in self.tensors}

    def content_hash(self, cache_dir=None) -> str:
        """sha256 over config.json and the tensor files (names and bytes), in a fixed order.

        With `cache_dir`, the digest is remembered in cache_dir/hashes/, keyed by every file's path,
        size, inode, mtime and ctime (the kernel sets ctime on any write; make, git's index and ccache
        judge a file unchanged the same way; files changed within the last RACY_NS are not remembered):
        converting the same checkpoint again does not re-read all of it (16 GB for an 8B model) only to
        name it."""
        from ..format_spec.reader import open_regular

        files = [self.path / "config.json"] + sorted({t.file for t in self.tensors.values()})
        remembered = None
        if cache_dir is not None:
            try:
                signature = [(str(f.resolve()), *(getattr(os.stat(f), k) for k in ("st_size", "st_ino", "st_dev",
                                                                                   "st_mtime_ns", "st_ctime_ns")))
                             for f in files]
            except OSError as error:
                raise ConversionError(f"cannot stat a checkpoint file: {error}") from None
            remembered = Path(cache_dir) / "hashes" / hashlib.sha256(repr(signature).encode()).hexdigest()
            try:
                digest = remembered.read_text().strip()
                if re.fullmatch(r"[0-9a-f]{64}", digest):
                    return digest
            except (OSError, UnicodeDecodeError):
                pass
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            try:
                with os.fdopen(open_regular(file), "rb") as handle:  # regular files only (never blocks)
                    while chunk := handle.read(1 << 22):
                        digest.update(chunk)
            except OSError as error:
                raise ConversionError(f"{file}: cannot read: {error.strerror or error}") from None
        racy = any(max(entry[-2:]) > time.time_ns() - RACY_NS for entry in signature) if remembered else True
        if not racy:  # a file changed just now could change again within its timestamp's granularity (git's rule)
            try:  # best effort: an unwritable cache only costs the next run the hashing again
                remembered.parent.mkdir(parents=True, exist_ok=True)
                partial = remembered.with_name(f"{remembered.name}.tmp{os.getpid()}")
                partial.write_text(digest.hexdigest())
                os.replace(partial, remembered)
            except OSError:
                pass
        return digest.hexdigest()

    def load(self, name: str):
        """One tensor as float32 torch, read with plain bounds-checked file reads (no mmap: mapped
        pages would stay resident and make peak memory track the whole model, not its largest tensor),
        in blocks of LOAD_BLOCK_BYTES decoded straight into the result: resident memory is the float32
        tensor plus one block (a 128k×4096 bf16 embedding costs 2 GiB, not 2 + 1 + 2 for its bytes,
        its float32 copy and a temporary of the range check).

        Values must be finite and within fp16 range (|x| <= 65504): fp16 tensors (norms, biases,
        embeddings) would silently become inf, and affine tensors store their scales, zeros and
        outliers in fp16 too. Such a tensor is rejected by name rather than clamped: clamping would
        change what the model computes without the user knowing."""
        import torch

        from ..format_spec.reader import open_regular

        info = self.tensors[name]
        start, end = info.span
        source = getattr(torch, TORCH_DTYPES[info.dtype])
        item = DTYPE_BYTES[info.dtype]
        result = torch.empty(info.shape, dtype=torch.float32)
        flat = result.view(-1)  # (numel,)
        block = max(1, LOAD_BLOCK_BYTES // item)  # elements per read
        buffer = bytearray(min(block, flat.numel()) * item) if info.dtype != "F32" else None
        peak = 0.0  # max |x| so far
        try:
            with open(open_regular(info.file), "rb") as handle:
                if end - start != item * math.prod(info.shape) or end > os.fstat(handle.fileno()).st_size:
                    raise ConversionError(f"{info.file.name}: tensor '{name}' data offsets are inconsistent with "
                                          f"its shape and dtype or lie past the end of the file")
                handle.seek(start)
                for e0 in range(0, flat.numel(), block):
                    out = flat[e0:e0 + block]  # (n,) float32 view of the result
                    n_bytes = out.numel() * item
                    target = memoryview(out.numpy()).cast("B") if buffer is None else memoryview(buffer)[:n_bytes]
                    if handle.readinto(target) != n_bytes:
                        raise ConversionError(f"{info.file.name}: tensor '{name}' is cut short (the file shrank)")
                    if buffer is not None:
                        out.copy_(torch.frombuffer(buffer, dtype=source, count=out.numel()))
                    low, high = (float(v) for v in torch.aminmax(out))  # NaN propagates into both
                    if not (math.isfinite(low) and math.isfinite(high)):
                        raise ConversionError(f"{info.file.name}: tensor '{name}' contains NaN or Inf")
                    peak = max(peak, -low, high)
        except OSError as error:
            raise ConversionError(f"{info.file}: cannot read tensor '{name}': {error.strerror or error}") from None
        if peak > FP16_MAX:
            raise ConversionError(f"{info.file.name}: tensor '{name}' has values up to {peak:.6g}, beyond fp16's "
                                  f"range (±{FP16_MAX:g}) that .mxq tensors and their scales are stored in")
        return result


@dataclass
class DerivedCheckpoint(Checkpoint):
    """A checkpoint computed from another (rotated: converter/rotate.py, input-scaled:
    converter/input_scaling.py). Its content hash derives from the source's hash and the transformation's
    parameters (`key`), so caches keyed by it never mix the two and nothing needs re-reading to name it."""
    derived_hash: str = ""

    def content_hash(self, cache_dir=None) -> str:
        return self.derived_hash

    @classmethod
    def of(cls, source: Checkpoint, key: str, **extra):
        """`source`'s checkpoint fields, the hash of `key`, and this class's own `extra` fields."""
        base = {f.name: getattr(source, f.name) for f in fields(Checkpoint)}
        return cls(**base, derived_hash=hashlib.sha256(key.encode()).hexdigest(), **extra)


MAX_JSON_BYTES = 64 << 20  # config.json, tokenizer_config.json, generation_config.json, the shard index
MAX_TOKENIZER_BYTES = 512 << 20  # tokenizer.json / tokenizer.model (the largest released are ~35 MB)
MAX_README_BYTES = 1 << 20  # only the front matter at the start of README.md is read


def _read_file(path: Path, what: str, limit: int, head: bool = False) -> bytes:
    """The bytes of a regular file in the checkpoint (never a FIFO or device, which could block the
    converter forever), at most `limit` of them: a larger file is an error, or cut when `head`."""
    from ..format_spec.reader import open_regular

    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit and not head:
                raise ConversionError(f"{path}: {what} is {size:,} bytes (cap {limit:,})")
            return handle.read(limit)
    except FileNotFoundError:
        raise ConversionError(f"{path}: {what} not found") from None
    except OSError as error:  # open_regular's own errors start with the path: not repeated
        reason = error.strerror or str(error).removeprefix(f"{path}: ")
        raise ConversionError(f"{path}: cannot read {what}: {reason}") from None


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from the checkpoint, parsed strictly (no NaN/Infinity, duplicate keys or lone
    surrogates; nesting and element counts bounded: format_spec/strict_json.py)."""
    from ..format_spec.strict_json import JsonError, loads

    try:
        value = loads(_read_file(path, what, MAX_JSON_BYTES))
    except JsonError as error:
        raise ConversionError(f"{path}: {what} {error}") from None
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
    """name -> (file, dtype, shape, span) from the safetensors headers (no tensor data read).

    Shard files must lie inside the checkpoint folder: index entries that are absolute or climb out
    with `..`, and symlinks that resolve outside, are rejected (except the Hugging Face cache layout,
    snapshots/REV/FILE -> ../../blobs/HASH). Within a file, tensors must tile the data region exactly
    as safetensors requires (no overlapping or aliased offsets, no gaps, nbytes = dtype x shape)."""
    item_bytes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                  "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    root = path.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])

    def inside(file: Path, shown: str) -> Path:
        target = file.resolve()
        if not any(target == r or r in target.parents for r in roots):
            raise ConversionError(f"{path}: shard '{shown}' resolves to {target}, outside the checkpoint folder")
        return file

    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = _read_json(index_file, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_file}: missing 'weight_map'")
        files = set()
        for name, shard in weight_map.items():
            if (not isinstance(shard, str) or not shard or "\0" in shard or Path(shard).is_absolute()
                    or ".." in Path(shard).parts):
                raise ConversionError(f"{index_file}: tensor '{str(name)[:100]}' maps to {str(shard)[:100]!r}, "
                                      f"not a file name inside the checkpoint folder")
            files.add(path / shard)
        files = sorted(files)
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
        inside(file, file.name)
        header, data_start = _safetensors_header(file)
        data_nbytes = file.stat().st_size - data_start
        spans = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict):
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' entry is not an object")
            offsets = meta.get("data_offsets")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data_nbytes):
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' has invalid data_offsets "
                                      f"(the data region is {data_nbytes} bytes)")
            shape = meta.get("shape", ())
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' has an invalid shape")
            dtype = meta.get("dtype")
            if not isinstance(dtype, str):
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' has an invalid dtype {dtype!r:.40}")
            if dtype in item_bytes and offsets[1] - offsets[0] != item_bytes[dtype] * math.prod(shape):
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' data_offsets span "
                                      f"{offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs "
                                      f"{item_bytes[dtype] * math.prod(shape)}")
            if name in index:
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' is also in {index[name][0].name}")
            spans.append((offsets[0], offsets[1], name))
            index[name] = (file, dtype, tuple(shape), (data_start + offsets[0], data_start + offsets[1]))
        end, previous = 0, None
        for start, stop, name in sorted(spans):
            if start != end:
                what = f"overlaps tensor '{previous}'" if start < end else f"leaves a gap after byte {end}"
                raise ConversionError(f"{file.name}: tensor '{name[:100]}' at data offset {start} {what} "
                                      f"(safetensors requires tensors to tile the data region)")
            end, previous = stop, name[:100]
        if end != data_nbytes:
            raise ConversionError(f"{file.name}: tensors cover {end} of the {data_nbytes} data bytes")
    return index


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(header JSON, absolute offset where tensor data starts) of a safetensors file: a regular file
    (never a FIFO or device that could block), parsed strictly (no duplicate keys, no NaN) with its
    cost bounded (format_spec.strict_json)."""
    from ..format_spec.reader import open_regular
    from ..format_spec.strict_json import JsonError, loads

    try:
        with open(open_regular(file), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw_len = handle.read(8)
            if len(raw_len) < 8 or int.from_bytes(raw_len, "little") > min(size - 8, 100 << 20):
                raise ConversionError(f"{file}: not a safetensors file (bad header length)")
            header_len = int.from_bytes(raw_len, "little")
            header = loads(handle.read(header_len))
    except FileNotFoundError:
        raise ConversionError(f"{file}: shard listed in the index is missing") from None
    except JsonError as error:
        raise ConversionError(f"{file}: not a safetensors file (header {error})") from None
    except OSError as error:
        raise ConversionError(f"{file}: cannot read: {error.strerror or error}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: not a safetensors file")
    return header, 8 + header_len


def _tokenizer(path: Path, config: ModelConfig) -> tuple[dict, bytes]:
    """The .mxq `tokenizer` object (SPEC §3.2, blob aside) and its blob, from tokenizer.json (what
    transformers loads by default) or tokenizer.model, with tokenizer_config.json,
    generation_config.json and chat_template.jinja. Checked here, before any heavy work, against the
    schema every .mxq file is read with (format_spec/tokenizer_schema.py), and loaded the way the
    runtime will load it: a bad value fails in one line naming its file and field."""
    from ..format_spec.tokenizer_schema import MetadataError, check_tokenizer
    from ..runtime.tokenizer import Tokenizer, tokenizer_errors

    tok_config_file, generation_file = path / "tokenizer_config.json", path / "generation_config.json"
    tok_config = _read_json(tok_config_file, "tokenizer_config.json") if tok_config_file.exists() else {}
    generation = _read_json(generation_file, "generation_config.json") if generation_file.exists() else {}
    if (path / "tokenizer.json").exists():
        kind, file = "hf-tokenizers", path / "tokenizer.json"
    elif (path / "tokenizer.model").exists():
        kind, file = "sentencepiece", path / "tokenizer.model"
    else:
        raise ConversionError(f"{path}: no tokenizer.json or tokenizer.model found")
    data = _read_file(file, file.name, MAX_TOKENIZER_BYTES)
    library = _library_tokenizer(kind, data, file)
    sources = {}  # tokenizer field -> the file its value came from (for error messages)

    bos, sources["bos_token_id"] = config.bos_token_id, path / "config.json"
    if bos is None:
        bos, sources["bos_token_id"] = _token_id(kind, library, tok_config.get("bos_token")), tok_config_file
    if generation.get("eos_token_id") is not None:
        eos = _token_ids(generation["eos_token_id"], generation_file, "eos_token_id")
        sources["eos_token_ids"] = generation_file
    else:
        eos, sources["eos_token_ids"] = list(config.eos_token_ids), path / "config.json"
    if not eos:
        eos = [i for i in [_token_id(kind, library, tok_config.get("eos_token"))] if i is not None]
        sources["eos_token_ids"] = tok_config_file
    if kind == "sentencepiece":
        add_bos = tok_config.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise ConversionError(f"{tok_config_file}: add_bos_token must be true or false, got {add_bos!r:.40}")
    else:  # tokenizer.json says it in its post-processor
        try:
            with tokenizer_errors(f"{file}: its post-processor fails"):  # a Rust panic too
                with_special = library.encode("a", add_special_tokens=True).ids
        except ModelError as error:
            raise ConversionError(str(error)) from None
        add_bos = bos is not None and bool(with_special) and with_special[0] == bos
    template, sources["chat_template"] = _chat_template(path, tok_config), tok_config_file
    if template is None and (path / "chat_template.jinja").exists():
        template_file = path / "chat_template.jinja"
        try:
            template = _read_file(template_file, "chat template", MAX_JSON_BYTES).decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{template_file}: not UTF-8 text") from None
        sources["chat_template"] = template_file
    meta = {"kind": kind, "bos_token_id": bos, "eos_token_ids": eos, "add_bos_token": add_bos and bos is not None,
            "chat_template": template}
    for name in sources:  # one field at a time, so the error names the file it came from
        try:
            check_tokenizer({"kind": kind, name: meta[name]}, config.vocab_size)
        except MetadataError as error:
            raise ConversionError(f"{sources[name]}: {error}") from None
    try:
        check_tokenizer(meta, config.vocab_size)
        Tokenizer(meta, data, config.bos_token_id, config.eos_token_ids)  # exactly as the runtime loads it
    except (MetadataError, ModelError) as error:
        raise ConversionError(f"{file}: {error}") from None
    if template is not None:
        _check_template_syntax(template, sources["chat_template"])
    return meta, data


def _check_template_syntax(template: str, file: Path) -> None:
    """A chat template that does not parse fails now, not at the first --chat after conversion."""
    import jinja2

    from ..runtime.chat_template import BoundedEnvironment

    try:
        BoundedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ConversionError(f"{file}: chat_template does not parse: line {error.lineno}: "
                              f"{' '.join(str(error.message).split())[:100]}") from None
    except RecursionError:
        raise ConversionError(f"{file}: chat_template does not parse: nested too deeply") from None


def _library_tokenizer(kind: str, data: bytes, file: Path):
    """The tokenizers / sentencepiece object of the tokenizer file; one-line error if it does not load."""
    from ..runtime.tokenizer import load_hf_tokenizer

    try:
        if kind == "hf-tokenizers":
            return load_hf_tokenizer(data, str(file))  # padding and truncation off; a panic is a ModelError
        import sentencepiece
        return sentencepiece.SentencePieceProcessor(model_proto=data)
    except ModelError as error:
        raise ConversionError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - sentencepiece raises plain RuntimeError / OSError
        raise ConversionError(f"{file}: does not load: {' '.join(str(error).split())[:100]}") from None


def _token_id(kind: str, library, token) -> int | None:
    """The id of a special token given as tokenizer_config.json spells it (a string or an
    AddedToken object), or None when it is absent or not in the vocabulary."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    if kind == "hf-tokenizers":
        return library.token_to_id(token)
    piece_id = library.piece_to_id(token)
    return piece_id if library.id_to_piece(piece_id) == token else None


def _token_ids(value, file: Path, key: str) -> list:
    """A token id or a list of them, as generation_config.json spells eos_token_id (range checked later)."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConversionError(f"{file}: {key} must be a token id or a list of them, got {value!r:.60}")
    return values


def _chat_template(path: Path, tok_config: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates (the default one is kept)."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) for t in template):
            raise ConversionError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                                  f"{{\"name\", \"template\"}} objects")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise ConversionError(f"{path / 'tokenizer_config.json'}: chat_template must be a string, "
                              f"got {type(template).__name__}")
    return template


def _license(path: Path, config: dict) -> dict:
    """license / model-card fields from README.md front matter, when the checkpoint has them."""
    fields = {}
    readme = path / "README.md"
    if readme.exists():
        text = _read_file(readme, "README.md", MAX_README_BYTES, head=True).decode("utf-8", errors="replace")
        match = re.match(r"---\r?\n(.*?)\r?\n---", text, re.S)
        if match:
            for line in match.group(1).splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("license", "license_name", "license_link", "base_model", "language",
                                   "pipeline_tag") and value.strip():
                    fields[key.strip()] = value.strip()[:200]
    for key in ("_name_or_path",):
        if isinstance(config.get(key), str) and config[key]:
            fields["name_or_path"] = config[key][:200]
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
    tokenizer, tokenizer_data = _tokenizer(path, config)
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
