"""`mxq export-hf`: a .mxq file → a Hugging Face checkpoint of its DEQUANTIZED weights.

Writes config.json, generation_config.json, model.safetensors (float32, written by hand: the format
is an 8-byte little-endian header length, a JSON header, then raw little-endian data), and the
tokenizer (tokenizer.model or tokenizer.json, plus tokenizer_config.json with BOS/EOS and the chat
template). transformers loads the result with AutoModelForCausalLM/AutoTokenizer.from_pretrained,
so quantized files can be compared in any tool. Weights are dequantized with the format's
reference `dequantize` (SPEC.md §6–§8; a `rows` tensor in its logical row order), one tensor at a
time, each after the content checks a runtime makes (CSR outliers, row_order).

Safety: the file's checksums are verified first (a damaged file is not exported); everything is
written into a fresh hidden directory next to OUT_DIR, fsynced, then renamed into place, so an
interrupted export leaves either the old OUT_DIR or the new one, never a mix (leftovers of a killed
run are removed by the next). OUT_DIR may not be a symbolic link, and an existing OUT_DIR is only
replaced when it holds nothing but files an export writes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from ..format_spec import MxqFile, MxqFormatError, content_problem, dequantize
from ..format_spec.writer import (check_output_path, create_exclusive, fsync_directory, remove_stale_temporaries,
                                  temp_path, terminate_as_exception)
from .config import ModelConfig
from .errors import ModelError
from .tokenizer import Tokenizer

EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer.model", "tokenizer_config.json"})


def hf_config(c: ModelConfig) -> dict:
    """config.json from the family contract: the family's fields in HF spelling, its constant
    entries, rope settings in both spellings (transformers 4: rope_theta/rope_scaling, transformers 5:
    rope_parameters) unless the family spells them its own way (Gemma 3 per layer kind, Phi-3)."""
    fam = c.family
    config = {"architectures": [c.hf_architecture], "model_type": fam.model_type, **fam.hf_fixed}
    skip = ("architecture", "hf_architecture", *fam.hf_omit)
    config.update({key: value for key, value in c.to_json().items() if key not in skip})
    eos = config.pop("eos_token_id")
    config["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    config["rope_parameters"] = {"rope_theta": c.rope_theta, **(config["rope_scaling"] or {"rope_type": "default"})}
    if fam.hf_spelling is not None:
        config.update(fam.hf_spelling(c))
    # pad_token_id: the file keeps none (HF defaults such as Phi-3's 32000 may lie outside the vocabulary)
    config.update(pad_token_id=None, torch_dtype="float32", dtype="float32", use_cache=True)
    return config


def hf_tensors(f: MxqFile, c: ModelConfig) -> tuple[list, dict]:
    """The HF checkpoint's [(name, shape)] in file order, and {fused HF name: [canonical parts]}
    for tensors the family's checkpoints store fused (re-fused here: Phi-3's qkv_proj, gate_up_proj).
    Every stored tensor must be one the contract lists, with its shape."""
    expected = {name: tuple(getattr(c, d) for d in spec.shape) for name, spec in c.family.all_tensors(c)}
    for name, entry in f.tensors.items():
        if name not in expected:
            raise ModelError(f"tensor '{name}' is not part of the {c.architecture} model contract")
        if tuple(entry.shape) != expected[name]:
            raise ModelError(f"tensor '{name}' has shape {list(entry.shape)}, the model config implies "
                             f"{list(expected[name])}")
    missing = [name for name in expected if name not in f.tensors]
    if missing:
        raise ModelError(f"tensor '{missing[0]}' is missing")
    fused_of = {}  # canonical part name -> fused HF name
    fused = {}
    for spec in c.family.fused:
        for i in range(c.num_hidden_layers):
            parts = [part.format(i=i) for part in spec.parts]
            fused[spec.source.format(i=i)] = parts
            fused_of.update({part: spec.source.format(i=i) for part in parts})
    tensors = []
    for name, shape in expected.items():
        if name not in fused_of:
            tensors.append((name, shape))
        elif fused[fused_of[name]][0] == name:  # the fused tensor takes its first part's place
            parts = fused[fused_of[name]]
            tensors.append((fused_of[name], (sum(expected[p][0] for p in parts), shape[1])))
    return tensors, fused


def write_safetensors(path: Path, tensors: list, produce, progress=None) -> None:
    """tensors: [(name, shape)] in file order; produce(name) → float32 array of that shape, called
    once per tensor while writing (so only one dequantized tensor is in memory at a time)."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with create_exclusive(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in (progress(tensors) if progress else tensors):
            array = np.ascontiguousarray(produce(name), dtype="<f4")
            if array.shape != tuple(shape):
                raise ModelError(f"tensor '{name}': produced shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _write_file(path: Path, data: bytes) -> None:
    with create_exclusive(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value) -> None:
    _write_file(path, json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))


def _check_out_dir(out_dir: Path) -> Path:
    """OUT_DIR must be new, empty, or a previous export (nothing else in it gets deleted), and not the
    current directory or one of its parents: the export replaces the directory itself."""
    if out_dir.name in ("", ".", "..") or Path.cwd().is_relative_to(out_dir.resolve()):
        raise ModelError(f"{out_dir}: is the current directory or holds it; export-hf replaces OUT_DIR "
                         f"whole, so name another directory (e.g. a new one inside it)")
    check_output_path(out_dir, kind="directory")
    if out_dir.exists():
        foreign = sorted(set(os.listdir(out_dir)) - EXPORT_FILES)
        if foreign:
            raise ModelError(f"{out_dir}: holds files export-hf does not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory")
    return out_dir


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished `staging` directory to `out_dir` (rename; an existing export is swapped)."""
    if out_dir.exists() and os.listdir(out_dir):
        old = temp_path(out_dir, "old")
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(staging, out_dir)  # replaces an empty directory
    fsync_directory(out_dir.parent)


def export_hf(path, out_dir, progress=None, verify: bool = True) -> Path:
    """Write the HF checkpoint of .mxq `path` to `out_dir` (atomically; see the module docstring)."""
    out_dir = _check_out_dir(Path(out_dir))
    remove_stale_temporaries(out_dir)
    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        tokenizer = Tokenizer.from_file(f, config)
        tensors, fused = hf_tensors(f, config)
        if verify:
            problems = f.verify()
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise MxqFormatError(path, f"damaged, not exported: {problems[0]}{more}")

        def dequantized(name):
            entry, blobs = f.tensors[name], f.blobs(name)
            problem = content_problem(blobs, entry.shape, entry.config) if len(entry.shape) == 2 else None
            if problem:  # unsound CSR outliers or row_order (SPEC.md §9): checked before use, as a runtime does
                raise MxqFormatError(path, f"tensor '{name}': {problem}")
            return dequantize(blobs, entry.shape, entry.config)  # `rows`: in the logical row order

        def produce(name):
            if name in fused:
                return np.concatenate([dequantized(part) for part in fused[name]], axis=0)
            return dequantized(name)

        staging = temp_path(out_dir)
        with terminate_as_exception():
            os.mkdir(staging, 0o755)
            try:
                write_safetensors(staging / "model.safetensors", tensors, produce, progress)
                _write_json(staging / "config.json", hf_config(config))
                eos = sorted(tokenizer.eos_ids)
                _write_json(staging / "generation_config.json",
                            {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos})
                write_tokenizer_files(f, tokenizer, staging)
                fsync_directory(staging)
                _install(staging, out_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return out_dir


def write_tokenizer_files(f: MxqFile, tokenizer: Tokenizer, out_dir: Path) -> None:
    data = f.tokenizer_data()
    eos = sorted(tokenizer.eos_ids)
    tokenizer_config = {
        "bos_token": tokenizer.token_string(tokenizer.bos_id) or None,
        "eos_token": tokenizer.token_string(tokenizer.eos_id) if eos else None,
        "add_bos_token": tokenizer.add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": f.model.get("max_position_embeddings"),
        "chat_template": tokenizer.chat_template,
    }
    if tokenizer.kind == "sentencepiece":
        _write_file(out_dir / "tokenizer.model", data)
        tokenizer_config.update(tokenizer_class="LlamaTokenizer", legacy=False, unk_token=tokenizer.unk_string)
    else:
        _write_file(out_dir / "tokenizer.json", data)
        tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast")
    if tokenizer_config["chat_template"] is None:
        del tokenizer_config["chat_template"]
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
