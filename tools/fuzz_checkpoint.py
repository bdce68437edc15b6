"""Fuzz `mxq convert` with hostile Hugging Face checkpoints; report crashes, hangs, leftovers, memory.

    python tools/fuzz_checkpoint.py --cases 2000 [--seed 0] [--fixtures tiny-qwen3 tiny-gemma3 ...]

Each case copies a tiny real checkpoint (tools/fixtures.py), damages one or a few things in it and runs
`mxq convert` in this process, exactly as the command line does (same click command, same error
classification as cli.py), fast settings: `--bpw 16 --configs fp16` for most cases, a real data-free
quantization (rtn or hqq, outliers, quantized embeddings: OPTION_SETS) for the rest.
  - config.json: one value at any depth replaced (wrong type, huge/negative/NaN numbers as text,
    nested lists, ...), deleted, or a duplicate key; or a known field added with a plausible or
    hostile value (rope_scaling, rope_parameters, layer_types, sliding windows, architectures, ...);
  - tokenizer_config.json / generation_config.json: the same, with their fields (special tokens,
    add_bos_token, eos_token_id, chat templates);
  - tokenizer files: tokenizer.json values mutated, bytes flipped or truncated (tokenizer.model too);
  - safetensors: a header entry's dtype/shape/data_offsets mutated, the length prefix, flipped
    header bytes, truncated or extended data, a NaN/Inf/beyond-fp16 value poked into a tensor;
  - file kinds: any file the converter opens replaced by a FIFO, a directory, a dangling symlink,
    a symlink outside the folder, an empty / non-UTF-8 / sparse 1 GiB file;
  - a shard index with hostile weight_map entries (climbing paths, missing shards, wrong types);
  - a consistent checkpoint of unusual shape (sizes no group divides, head_dim apart from
    hidden_size / heads, 1 layer, a padded vocabulary), so cases reach quantization and the runtime.
Outcomes: ok (the written file must then verify, load and run a forward pass), rejected (a typed
error: what cli.py prints as "mxq: error: ..."), crash ("internal error"), hang (> --timeout s),
leftover (a failed case left something in the output folder), unrunnable (convert succeeded but
the file does not verify or load). Memory: peak resident growth per case (VmHWM).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import fuzz  # noqa: E402 - tools/fuzz.py: hostile values, memory probes, the .mxq exercise

FIXTURES = ("tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-llama")
FAST = ["--bpw", "16", "--configs", "fp16"]
QUANTIZED = ["--bpw", "6", "--objective", "frobenius", "--quantizer", "rtn", "--configs", "b4g64,b8g64"]

CONFIG_ADDITIONS = {
    "architectures": [["LlamaForCausalLM"], ["Qwen3ForCausalLM"], ["Qwen2ForCausalLM"], ["Phi3ForCausalLM"],
                      ["Gemma3ForCausalLM"], ["MistralForCausalLM"], ["Gemma3ForConditionalGeneration"],
                      [["LlamaForCausalLM"]], [], "LlamaForCausalLM", ["Nope"], [None]],
    "rope_scaling": [{"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 4}, {"type": "linear"},
                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
                     {"rope_type": "llama3", "factor": 1e-300, "low_freq_factor": 1e-300, "high_freq_factor": 1e300,
                      "original_max_position_embeddings": 1},
                     "linear", {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "default"}, {"rope_type": ["x"]}],
    "rope_parameters": [{"rope_type": "default", "rope_theta": 10000.0}, {"rope_type": "linear", "factor": 2.0},
                        {"rope_type": "linear"}, {"rope_theta": "x"}, {"partial_rotary_factor": 0.5},
                        {"rope_type": "default", "partial_rotary_factor": 0.3},
                        {"full_attention": {"rope_type": "linear", "factor": 2.0}, "sliding_attention": {}},
                        {"full_attention": [], "sliding_attention": None},
                        {"full_attention": {"rope_theta": 1e-300}, "sliding_attention": {"rope_theta": 1e300}},
                        {"sliding_attention": {"rope_type": "linear"}}, []],
    "layer_types": [["sliding_attention", "sliding_attention"], ["full_attention"], ["x", "y"], "sliding_attention",
                    ["sliding_attention", "full_attention"]],
    "sliding_window": [1, 4, 0, -1, 2**40, 4.0],
    "sliding_window_pattern": [1, 2, 0, True, 10**20, -3],
    "use_sliding_window": [True, "true", 1],
    "max_window_layers": [0, 1, -1, 10**30],
    "partial_rotary_factor": [0.5, 0.25, 0.0, 0.01, 1.5, 0.3, 1e-300],
    "query_pre_attn_scalar": [1e-300, 256, 0.5, 10**400],
    "rope_local_base_freq": [1e-300, 1e300, 1.0],
    "rope_theta": [1e-300, 1e300, 1.0, 0.5, 10**30],
    "rms_norm_eps": [1e-300, 1e300, 1e-45, 10**30],
    "hidden_act": ["gelu", None, 1], "hidden_activation": ["gelu", "gelu_pytorch_tanh"],
    "tie_word_embeddings": ["false", 0, True, False],
    "head_dim": [1, 3, 7, 2**16, 2**20, 16.0],
    "num_key_value_heads": [3, 0, 1], "num_hidden_layers": [0, 1, 3, 4097, 10**9],
    "vocab_size": [1, 2**31 - 1, 2**31],
    "bos_token_id": [0, -1, 2**53, 1.0, "1"], "eos_token_id": [[1, 2.0], 2.5, [], [10**20], [[1]], True],
    "final_logit_softcapping": [30.0, None], "attn_logit_softcapping": [50.0],
    "attention_bias": [True, "false"], "mlp_bias": [True, "false"], "use_bidirectional_attention": [True],
    "_name_or_path": ["\u0000" * 5, "a" * 100_000, 5],
}
TOKENIZER_CONFIG_ADDITIONS = {
    "bos_token": ["<s>", {"content": "<s>"}, {"content": 5}, "<never-a-token>", 5, [], None],
    "eos_token": ["</s>", {"content": "</s>"}, {"content": None}, "<never-a-token>", 7, {}],
    "add_bos_token": [True, False, "false", 1, None],
    "chat_template": fuzz.TEMPLATES + [5, [{"name": "default", "template": "{{ messages[0].content }}"}],
                                       [{"name": "x"}], [1], "{% if %}", {"a": 1}, "{{ bos_token }}" * 10,
                                       "x" * 300_000, "{{" + "(" * 5000 + "}}", "{% if 1 %}" * 2000],
}
GENERATION_ADDITIONS = {"eos_token_id": [2, [1, 2], 2.0, "2", [True], 10**20, -1, [[]], [0] * 5000],
                        "bos_token_id": [1, "x"]}
OPTIONAL_FILES = ("generation_config.json", "README.md", "chat_template.jinja", "model.safetensors.index.json")
FILE_KINDS = ("fifo", "directory", "dangling", "outside", "empty", "garbage", "sparse")


class Hang(BaseException):  # BaseException: no `except Exception` in the code under test swallows it
    pass


# -- mutations: each takes the case folder and the rng and returns a description -------------------
def _json_mutation(document, rng: random.Random, additions: dict) -> tuple[str, str]:
    """(new JSON text, description): one value replaced/deleted/duplicated or a known key added."""
    if additions and rng.random() < 0.45:
        key = rng.choice(sorted(additions))
        value = rng.choice(additions[key]) if rng.random() < 0.8 else rng.choice(fuzz.HOSTILE_VALUES)
        document[key] = value
        return json.dumps(document, ensure_ascii=False), f"add {key}={str(value)[:40]!r}"
    paths = [p for p in fuzz._paths(document) if p]
    if not paths:
        return json.dumps(rng.choice(fuzz.HOSTILE_VALUES)), "replace whole document"
    path = rng.choice(paths)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    where = ".".join(map(str, path))[:60]
    kind = rng.random()
    if kind < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return json.dumps(document), f"{where}: delete"
    if kind < 0.35:
        parent[path[-1]] = "__FUZZ__"
        value = rng.choice(fuzz.TEXT_VALUES)
        return json.dumps(document).replace('"__FUZZ__"', value, 1), f"{where}: text {value[:20]}"
    if kind < 0.42 and isinstance(parent, dict):
        text, key = json.dumps(document), json.dumps(path[-1])
        position = text.find(key + ":")
        return (text[:position] + key + ": 0, " + text[position:] if position >= 0 else text), f"{where}: dup key"
    value = rng.choice(fuzz.HOSTILE_VALUES)
    parent[path[-1]] = value
    return json.dumps(document, ensure_ascii=False), f"{where}: value {str(value)[:30]!r}"


def _load_json(path: Path):
    """A file's JSON object as an earlier mutation of the same case may have left it: {} when it is
    gone, not regular, large, or not a JSON object any more."""
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return {}
        value = json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def mutate_config(folder: Path, rng: random.Random) -> str:
    file = folder / "config.json"
    text, what = _json_mutation(_load_json(file), rng, CONFIG_ADDITIONS)
    _write_text(file, text)
    return f"config.json {what}"


def mutate_tokenizer_config(folder: Path, rng: random.Random) -> str:
    name = rng.choice(["tokenizer_config.json", "generation_config.json"])
    file = folder / name
    document = _load_json(file)
    additions = TOKENIZER_CONFIG_ADDITIONS if name == "tokenizer_config.json" else GENERATION_ADDITIONS
    text, what = _json_mutation(document, rng, additions)
    _write_text(file, text)
    return f"{name} {what}"


def _damage_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(data)
    position = rng.randrange(max(len(data), 1))
    kind = rng.choice(["flip", "overwrite", "delete", "truncate", "insert"])
    if kind == "flip" and data:
        data[position] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        data[position: position + 8] = bytes(rng.randrange(256) for _ in range(8))
    elif kind == "delete":
        del data[position: position + rng.randrange(1, 64)]
    elif kind == "truncate":
        del data[position:]
    else:
        data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return bytes(data), f"{kind} @{position}"


def mutate_tokenizer(folder: Path, rng: random.Random) -> str:
    file = folder / "tokenizer.json"
    if not file.exists():
        file = folder / "tokenizer.model"
        if not file.is_file() or file.stat().st_size > 16 << 20:
            return "tokenizer.model (left as an earlier mutation made it)"
        data, what = _damage_bytes(file.read_bytes(), rng)
        file.write_bytes(data)
        return f"tokenizer.model {what}"
    if rng.random() < 0.5 and file.is_file() and file.stat().st_size < 16 << 20:
        data, what = _damage_bytes(file.read_bytes(), rng)
        file.write_bytes(data)
        return f"tokenizer.json bytes {what}"
    text, what = _json_mutation(_load_json(file), rng, {})
    _write_text(file, text)
    return f"tokenizer.json {what}"


def _safetensors(file: Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file an earlier mutation left intact, else ValueError."""
    if not file.is_file() or file.stat().st_size > 1 << 28:
        raise ValueError("not a readable safetensors file any more")
    raw = file.read_bytes()
    try:
        n = struct.unpack_from("<Q", raw)[0]
        header = json.loads(raw[8: 8 + n])
    except (struct.error, ValueError):
        raise ValueError("the header no longer parses") from None
    if not isinstance(header, dict) or any(not isinstance(v, dict) or not isinstance(v.get("data_offsets"), list)
                                           for k, v in header.items() if k != "__metadata__"):
        raise ValueError("the header no longer has tensor entries")
    return header, raw[8 + n:]


def _pack_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def mutate_safetensors(folder: Path, rng: random.Random) -> str:
    file = folder / "model.safetensors"
    try:
        header, data = _safetensors(file)
    except ValueError as error:
        return f"model.safetensors ({error})"
    names = sorted(k for k in header if k != "__metadata__")
    if not names:
        return "model.safetensors (no tensors left)"
    name = rng.choice(names)
    kind = rng.choice(["dtype", "shape", "offsets", "entry", "metadata", "prefix", "header bytes", "data size",
                       "value", "value", "rename", "drop"])
    if kind == "dtype":
        header[name]["dtype"] = value = rng.choice(["F32", "F16", "BF16", "I8", "F64", "U8", "X", 5, None, ["F16"]])
    elif kind == "shape":
        header[name]["shape"] = value = rng.choice([[], [0], [-1, 2], [2**40, 2**40], "x", [1.5], [True],
                                                    list(reversed(header[name]["shape"])), [1] * 100])
    elif kind == "offsets":
        start, end = header[name]["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        header[name]["data_offsets"] = value = rng.choice([[end, start], other, [0, 0], [-1, end], [start, 2**64],
                                                           ["0", end], [start], [start + 1, end + 1], None])
    elif kind == "entry":
        header[name] = value = rng.choice(fuzz.HOSTILE_VALUES)
    elif kind == "metadata":
        header["__metadata__"] = value = rng.choice([{"format": "pt"}, {"format": 5}, [], "x", {"a": {"b": 1}}])
    elif kind == "rename":
        header[value := name + ".extra"] = header.pop(name)
    elif kind == "drop":  # the tensor's bytes become a gap
        del header[name]
        value = name
    if kind in ("dtype", "shape", "offsets", "entry", "metadata", "rename", "drop"):
        file.write_bytes(_pack_safetensors(header, data))
        return f"model.safetensors {kind} of {name[:60]}: {str(value)[:40]!r}"
    raw = bytearray(file.read_bytes())
    n = struct.unpack_from("<Q", raw)[0]
    if kind == "prefix":
        value = rng.choice([0, 1, n - 1, n + 1, len(raw), len(raw) - 8, 2**63, 2**64 - 1, (100 << 20) + 1])
        struct.pack_into("<Q", raw, 0, value)
    elif kind == "header bytes":
        position = rng.randrange(8, 8 + n)
        raw[position] ^= 1 << rng.randrange(8)
        value = position
    elif kind == "data size":
        value = rng.choice([-1, -2, -4096, 1, 2, 4096])
        raw = raw[:value] if value < 0 else raw + bytes(value)
    else:  # a non-finite or beyond-fp16 value in a float tensor
        dtype, (start, end) = header[name]["dtype"], header[name]["data_offsets"]
        number = rng.choice([math.nan, math.inf, -math.inf, 1e6, 65520.0, -7e4])
        item = {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 0)
        if not item or end == start:
            return f"model.safetensors value (no float data in {name[:60]})"
        position = 8 + n + start + item * rng.randrange((end - start) // item)
        packed = struct.pack("<f", number) if dtype != "F16" else struct.pack("<e", number if abs(number) < 65520 or
                                                                              not math.isfinite(number) else math.inf)
        raw[position: position + item] = packed if dtype != "BF16" else packed[2:]
        value = number
    file.write_bytes(bytes(raw))
    return f"model.safetensors {kind} {name[:60]}: {value!r}"


def mutate_file_kind(folder: Path, rng: random.Random, outside: Path) -> str:
    present = sorted(p.name for p in folder.iterdir())
    name = rng.choice(present + list(OPTIONAL_FILES))
    file, kind = folder / name, rng.choice(FILE_KINDS)
    original = file.read_bytes() if file.is_file() and file.stat().st_size < 1 << 28 else b"{}"
    if file.is_dir() and not file.is_symlink():  # an earlier mutation of this case made it a directory
        shutil.rmtree(file)
    elif file.exists() or file.is_symlink():
        file.unlink()
    if kind == "fifo":
        os.mkfifo(file)
    elif kind == "directory":
        file.mkdir()
    elif kind == "dangling":
        file.symlink_to(outside / "does-not-exist")
    elif kind == "outside":
        (outside / name).write_bytes(original)
        file.symlink_to(outside / name)
    elif kind == "empty":
        file.write_bytes(b"")
    elif kind == "garbage":
        file.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
    else:
        with open(file, "wb") as handle:
            handle.write(original)
            handle.truncate(1 << 30)
    return f"{name} is {kind}"


def mutate_index(folder: Path, rng: random.Random) -> str:
    try:
        header, _ = _safetensors(folder / "model.safetensors")
    except ValueError:
        header = {}
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"} or {"x": "model.safetensors"}
    kind = rng.choice(["valid", "climb", "absolute", "missing", "type", "no map", "map type", "extra", "renamed"])
    name = rng.choice(sorted(weight_map))
    if kind == "climb":
        weight_map[name] = "../" + folder.name + "/model.safetensors"
    elif kind == "absolute":
        weight_map[name] = str((folder / "model.safetensors").resolve())
    elif kind == "missing":
        weight_map[name] = "model-00002-of-00002.safetensors"
    elif kind == "type":
        weight_map[name] = rng.choice([5, None, ["model.safetensors"], "", "a\u0000b"])
    elif kind == "extra":
        weight_map["model.layers.999.mlp.up_proj.weight"] = "model.safetensors"
    elif kind == "renamed":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        weight_map = {n: "model-00001-of-00001.safetensors" for n in weight_map}
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    if kind == "no map":
        index = {"metadata": {}}
    elif kind == "map type":
        index["weight_map"] = rng.choice([[], "x", 5, None])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"index {kind} ({name[:50]})"


def mutate_dims(folder: Path, rng: random.Random) -> str:
    """A consistent checkpoint of unusual shape: sizes that no group size divides, head_dim apart
    from hidden_size / heads, grouped-query ratios, 1 layer, an odd intermediate size, a padded
    vocabulary; tensors of random values written for exactly what the contract expects (so the
    case reaches measurement, quantization, writing and the runtime)."""
    import numpy as np
    from safetensors.numpy import save_file

    from mxq.converter.checkpoint import expected_tensors
    from mxq.runtime.config import ModelConfig
    from mxq.runtime.errors import ModelError

    config = _load_json(folder / "config.json")
    heads = rng.choice([1, 2, 3, 4, 6])
    config.update(hidden_size=rng.choice([8, 24, 40, 72, 100, 136]),
                  intermediate_size=rng.choice([1, 17, 33, 96, 130, 200]),
                  num_attention_heads=heads,
                  num_key_value_heads=rng.choice([k for k in (1, 2, 3, heads) if heads % k == 0]),
                  head_dim=rng.choice([2, 4, 6, 10, 16, 34, 66]), num_hidden_layers=rng.choice([1, 2, 3]),
                  vocab_size=config.get("vocab_size", 512) + rng.choice([0, 0, 1, 13, 100]))
    if rng.random() < 0.3:
        config["tie_word_embeddings"] = not config.get("tie_word_embeddings", False)
    config.pop("layer_types", None)
    what = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "num_hidden_layers")}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        shapes = expected_tensors(ModelConfig.from_hf(config))
    except ModelError as error:
        return f"dims {what} (config refused: {str(error)[:60]})"
    generator = np.random.default_rng(rng.randrange(1 << 30))
    dtype = rng.choice([np.float32, np.float16])
    tensors = {name: (np.ones(shape) if role == "norm" else generator.normal(0, 0.05, shape)).astype(dtype)
               for name, (shape, role) in shapes.items()}
    for name in [p.name for p in folder.glob("*.safetensors*")]:
        (folder / name).unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    return f"dims {what} {np.dtype(dtype).name}"


MUTATIONS = [(mutate_config, 28), (mutate_tokenizer_config, 16), (mutate_tokenizer, 9), (mutate_safetensors, 20),
             (mutate_file_kind, 11), (mutate_index, 7), (mutate_dims, 12)]
OPTION_SETS = [FAST, QUANTIZED,
               ["--bpw", "3.5", "--objective", "frobenius", "--quantizer", "hqq", "--configs", "paper"],
               ["--bpw", "4.5", "--objective", "frobenius_sq", "--quantizer", "rtn", "--outliers", "1%"],
               ["--bpw", "5", "--objective", "frobenius", "--quantizer", "rtn", "--configs", "b4g32,b8g128,fp16",
                "--quantize-embeddings", "4"]]


# -- running one case --------------------------------------------------------------------------------
def convert(folder: Path, out: Path, options: list) -> str:
    """Run `mxq convert` in this process; 'ok', 'rejected:Type' or 'crash:...' as cli.py would print
    it ("mxq: error" vs "mxq: internal error")."""
    from mxq import cli

    debug = os.environ.get("MXQ_DEBUG")
    os.environ["MXQ_DEBUG"] = "1"  # cli.py re-raises instead of printing: we classify with its own rule
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main.main(args=["convert", str(folder), "-o", str(out), "-q", "--no-cache", *options],
                          prog_name="mxq", standalone_mode=False)
        return "ok"
    except SystemExit as error:
        return "ok" if not error.code else f"rejected:exit {error.code}"
    except MemoryError:
        return "rejected:MemoryError"
    except Exception as error:  # noqa: BLE001 - classifying is the point
        if isinstance(error, cli.EXPECTED_ERRORS) or cli._is_known(error):
            message = " ".join(str(error).replace(str(folder.parent), "").split())
            return f"rejected:{type(error).__name__}: {message[:70]}"
        frames = traceback.extract_tb(error.__traceback__)
        where = next((f for f in reversed(frames) if "/mxq/" in f.filename), frames[-1])
        return (f"crash:{type(error).__name__}: {' '.join(str(error).split())[:120]} "
                f"[{Path(where.filename).parent.name}/{Path(where.filename).name}:{where.lineno}]")
    finally:  # the caller's environment (e.g. a pytest run) must not keep the debug switch
        if debug is None:
            del os.environ["MXQ_DEBUG"]
        else:
            os.environ["MXQ_DEBUG"] = debug


def check_written(path: Path) -> str | None:
    """What is wrong with a file convert wrote (None: nothing): it must verify, load, and give finite
    logits. A chat template may still fail when rendered (a clean ModelError at run time, as
    transformers fails on it): the converter only checks that it parses."""
    import numpy as np

    from mxq.format_spec import MxqFile
    from mxq.runtime import load
    from mxq.runtime.errors import ModelError

    with MxqFile.open(path) as f:
        if f.verify():
            return "the written file fails verify"
    with load(path) as model:
        ids = model.tokenizer.encode("Hello world")[: min(4, model.config.max_position_embeddings)] or [0]
        if not np.isfinite(model.logits(np.asarray(ids))).all():
            return "non-finite logits"
        if model.tokenizer.chat_template is not None:
            try:
                model.tokenizer.encode_chat("hi")
            except ModelError:
                pass
    return None


def run_case(seed_dir: Path, work: Path, mutations: list, rng: random.Random, options: list, timeout: float):
    """Apply `mutations` to a copy of `seed_dir` and convert it: (description, outcome, seconds, peak
    memory growth)."""
    folder, out_dir, outside = work / "ckpt", work / "out", work / "outside"
    for path in (folder, out_dir, outside):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(seed_dir, folder)
    out_dir.mkdir()
    outside.mkdir()
    order = {mutate_dims: 0, mutate_file_kind: 2}  # rebuilt checkpoints first, files swapped for FIFOs & co last
    mutations = sorted(mutations, key=lambda m: order.get(m, 1))
    what = "; ".join(m(folder, rng, outside) if m is mutate_file_kind else m(folder, rng) for m in mutations)
    out = out_dir / "model.mxq"
    before, measured = fuzz._rss_now(), fuzz._peak_reset()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome = convert(folder, out, options)
        if outcome == "ok":
            try:
                problem = check_written(out)
            except Exception as error:  # noqa: BLE001 - any failure to run a written file is the finding
                problem = f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
            if problem:
                outcome = f"unrunnable: {problem}"
    except Hang:
        outcome = "hang"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - start
    growth = max(fuzz._peak() - before, 0) if measured else 0
    left = sorted(p.name for p in out_dir.iterdir())
    if left != (["model.mxq"] if outcome == "ok" else []) and outcome != "hang":
        outcome = f"leftover {left} after {outcome}"
    return what, outcome, seconds, growth


def fuzz_checkpoints(cases: int, seed: int = 0, fixtures=FIXTURES, timeout: float = 60.0, quantized_share: float = 0.2,
                     max_mutations: int = 2, kinds=None, budget_seconds: float | None = None, log=print) -> dict:
    """Run `cases` cases (each 1..max_mutations mutations of one fixture; a share of them quantized
    for real) and report outcomes, problems, the most common rejection messages and peak memory.
    `kinds`: names of the mutations to draw from (e.g. ("config", "dims")), default all."""
    import fixtures as fixture_builder

    chosen = [(m, w) for m, w in MUTATIONS if kinds is None or m.__name__.removeprefix("mutate_") in kinds]

    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(seed)
    started = time.perf_counter()
    outcomes, rejections, problems = Counter(), Counter(), []
    max_growth, slowest = 0, (0.0, "")
    try:
        with tempfile.TemporaryDirectory(prefix="mxq-fuzz-ckpt-") as tmp:
            work = Path(tmp)
            seeds = {name: fixture_builder.ensure(name) for name in fixtures}
            for name, path in seeds.items():  # warm-up (imports, kernels) and a check that the seeds convert
                _, outcome, _, _ = run_case(path, work, [], rng, FAST, 600)
                if outcome != "ok":
                    raise SystemExit(f"fixture {name} does not convert unmutated: {outcome}")
            for done in range(cases):
                if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
                    break
                fixture = rng.choice(list(seeds))
                mutations = rng.choices([m for m, _ in chosen], [w for _, w in chosen],
                                        k=rng.randint(1, max_mutations))
                share = 0.7 if mutate_dims in mutations else quantized_share  # odd shapes: quantize them
                options = rng.choice(OPTION_SETS[1:]) if rng.random() < share else FAST
                what, outcome, seconds, growth = run_case(seeds[fixture], work, mutations, rng, options, timeout)
                label = outcome.split(":")[0].split(" ")[0]
                outcomes[label] += 1
                if label == "rejected":
                    rejections[outcome.split(": ", 1)[-1]] += 1
                if label in ("crash", "hang", "leftover", "unrunnable"):
                    problems.append(f"{fixture} [{' '.join(options)}] {what} -> {outcome}")
                max_growth = max(max_growth, growth)
                if seconds > slowest[0]:
                    slowest = (seconds, f"{fixture} {what} -> {outcome[:80]}")
                if log and (done + 1) % 100 == 0:
                    log(f"{done + 1} cases, {len(problems)} problems, {time.perf_counter() - started:.0f} s")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"cases": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())), "problems": problems,
            "rejections": dict(rejections.most_common(40)),
            "max_growth_mib": round(max_growth / 2**20, 1),
            "slowest_case": {"seconds": round(slowest[0], 2), "case": slowest[1]},
            "seconds": round(time.perf_counter() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixtures", nargs="*", default=list(FIXTURES), help="tools/fixtures.py names")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds after which a case is a hang")
    parser.add_argument("--max-mutations", type=int, default=2, help="mutations per case: 1 to this many")
    parser.add_argument("--kinds", nargs="*", default=None,
                        help="mutations to use (default all): " + " ".join(m.__name__[7:] for m, _ in MUTATIONS))
    parser.add_argument("--json", dest="json_path", help="also write the report here")
    args = parser.parse_args()
    report = fuzz_checkpoints(args.cases, args.seed, tuple(args.fixtures), args.timeout,
                              max_mutations=args.max_mutations, kinds=args.kinds,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    distinct = Counter(p.split(" -> ", 1)[1] for p in report["problems"])
    print(json.dumps({**report, "problems": report["problems"][:60], "distinct": dict(distinct.most_common())},
                     indent=1))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    print(f"\n{report['cases']} cases: {report['outcomes']}; {len(report['problems'])} problems; peak memory growth "
          f"{report['max_growth_mib']} MiB; slowest case {report['slowest_case']['seconds']} s; "
          f"{report['seconds']} s in all", file=sys.stderr)
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
