"""`mxq export-hf`: a .mxq file → a Hugging Face checkpoint of its DEQUANTIZED weights.

Writes config.json, generation_config.json, model.safetensors (float32, written by hand: the format
is an 8-byte little-endian header length, a JSON header, then raw little-endian data), and the
tokenizer (tokenizer.model or tokenizer.json, plus tokenizer_config.json with BOS/EOS and the chat
template). transformers loads the result with AutoModelForCausalLM/AutoTokenizer.from_pretrained,
so quantized files can be compared in any tool. Weights are dequantized with the format's
reference `dequantize` (SPEC.md §6), one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..format_spec import MxqFile, dequantize
from .config import ModelConfig
from .errors import ModelError
from .tokenizer import Tokenizer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(c: ModelConfig) -> dict:
    """config.json, with rope settings in both spellings (transformers 4: rope_theta/rope_scaling,
    transformers 5: rope_parameters)."""
    scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_position_embeddings)
    eos = list(c.eos_token_ids)
    config = {
        "architectures": [c.hf_architecture or HF_ARCHITECTURES[c.architecture]],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": c.rope_theta, **(scaling or {"rope_type": "default"})},
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
    }
    if c.architecture == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_hidden_layers)
    else:
        config.update(attention_bias=c.attention_bias, mlp_bias=False)
    if c.architecture == "mistral":
        config.update(sliding_window=None)  # the runtime attends over the whole context
    return config


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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in (progress(tensors) if progress else tensors):
            array = np.ascontiguousarray(produce(name), dtype="<f4")
            if array.shape != tuple(shape):
                raise ModelError(f"tensor '{name}': produced shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())


def export_hf(path, out_dir, progress=None) -> Path:
    """Write the HF checkpoint of .mxq `path` into `out_dir` (created; existing files replaced)."""
    out_dir = Path(out_dir)
    with MxqFile.open(path) as f:
        config = ModelConfig.from_json(f.model)
        tokenizer = Tokenizer.from_file(f, config)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = [(e.name, e.shape) for e in f.tensors.values()]
        extra = []  # zero biases HF expects but the file does not store
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}.self_attn."
            q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            wanted = {"q": q_dim, "k": kv_dim, "v": kv_dim} if (config.attention_bias or config.architecture == "qwen2") else {}
            if config.attention_bias and config.architecture != "qwen2":
                wanted["o"] = config.hidden_size  # LlamaAttention gives o_proj a bias too
            extra += [(p + f"{x}_proj.bias", (n,)) for x, n in wanted.items() if p + f"{x}_proj.bias" not in f.tensors]
        if config.tie_word_embeddings and "lm_head.weight" in f.tensors:
            raise ModelError("the file stores lm_head.weight but says the embeddings are tied")

        def produce(name):
            entry = f.tensors.get(name)
            if entry is None:
                return np.zeros(dict(extra)[name], dtype=np.float32)
            return dequantize(f.blobs(name), entry.shape, entry.config)

        write_safetensors(out_dir / "model.safetensors", tensors + extra, produce, progress)
        with open(out_dir / "config.json", "w") as out:
            json.dump(hf_config(config), out, indent=2)
        eos = sorted(tokenizer.eos_ids)
        with open(out_dir / "generation_config.json", "w") as out:
            json.dump({"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}, out, indent=2)
        write_tokenizer_files(f, tokenizer, out_dir)
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
        (out_dir / "tokenizer.model").write_bytes(data)
        tokenizer_config.update(tokenizer_class="LlamaTokenizer", legacy=False, unk_token=tokenizer.unk_string)
    else:
        (out_dir / "tokenizer.json").write_bytes(data)
        tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast")
    if tokenizer_config["chat_template"] is None:
        del tokenizer_config["chat_template"]
    with open(out_dir / "tokenizer_config.json", "w") as out:
        json.dump(tokenizer_config, out, indent=2, ensure_ascii=False)
    for stale in ("tokenizer.json", "tokenizer.model"):  # a re-export over another kind's files
        other = out_dir / stale
        if other.exists() and stale != ("tokenizer.model" if tokenizer.kind == "sentencepiece" else "tokenizer.json"):
            os.remove(other)
