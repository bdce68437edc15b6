"""Checkpoint reading: config spellings, shards, dtypes, tokenizers."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter.checkpoint import model_spec, read_checkpoint
from mxq.format_spec import MxqFile


def test_rope_config_spellings_agree(tmp_path):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
            "intermediate_size": 96, "num_hidden_layers": 1, "max_position_embeddings": 128}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    old, _ = model_spec({**base, "rope_theta": 5e5, "rope_scaling": scaling}, tmp_path)
    new, _ = model_spec({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}}, tmp_path)
    legacy, _ = model_spec({**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "type": "llama3"}}, tmp_path)
    assert old == new == legacy and old["rope_scaling"]["rope_type"] == "llama3" and old["rope_theta"] == 5e5
    default, _ = model_spec({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, tmp_path)
    assert default["rope_scaling"] is None and default["head_dim"] == 16 and default["num_key_value_heads"] == 4
    with pytest.raises(ConversionError, match="yarn"):
        model_spec({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, tmp_path)


def test_mistral_sliding_window_applies_to_every_layer(tmp_path):
    config = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
              "intermediate_size": 96, "num_hidden_layers": 2, "max_position_embeddings": 32768, "sliding_window": 4096}
    spec, _ = model_spec(config, tmp_path)
    assert spec["max_position_embeddings"] == 32768 and spec["sliding_window"] == 4096
    assert spec["layer_types"] == ["sliding_attention"] * 2


def test_sharded_bf16_checkpoint_converts_like_the_single_file(tmp_path):
    source = fixtures.ensure("tiny-llama")
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    (sharded / "model.safetensors").unlink()
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: tensors[n].to(torch.bfloat16) for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checkpoint = read_checkpoint(sharded)
    assert {t.dtype for t in checkpoint.tensors.values()} == {"BF16"}
    convert(sharded, tmp_path / "s.mxq", bpw=16, configs="fp16", cache_dir=None)
    with MxqFile.open(tmp_path / "s.mxq") as f:
        q = f.blobs("model.layers.1.self_attn.q_proj.weight")["data"]
        expected = tensors["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16).to(torch.float16).numpy()
        assert (q == expected).all()


def test_qwen2_biases_and_byte_level_tokenizer():
    checkpoint = read_checkpoint(fixtures.ensure("tiny-qwen2"))
    assert checkpoint.model["attention_bias"] and checkpoint.model["tie_word_embeddings"]
    roles = {t.name: t.role for t in checkpoint.tensors.values()}
    assert roles["model.layers.0.self_attn.k_proj.bias"] == "bias" and "lm_head.weight" not in roles
    assert checkpoint.tokenizer["kind"] == "hf-tokenizers" and checkpoint.tokenizer["chat_template"]


def test_llama3_fixture_reads_rope_parameters():
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama3"))
    assert checkpoint.model["rope_scaling"]["rope_type"] == "llama3"
    assert checkpoint.model["rope_scaling"]["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_in_blocks_equals_the_whole_tensor_and_checks_every_block(tmp_path, monkeypatch, dtype):
    """Checkpoint.load decodes block by block into one float32 tensor: the same values as decoding
    the whole tensor, and a NaN or an out-of-fp16-range value in any block (not just the first) is
    named."""
    from mxq.converter import checkpoint as checkpoint_module

    source = fixtures.ensure("tiny-llama")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    tensors = {n: t.to(dtype) for n, t in load_file(str(source / "model.safetensors")).items()}
    name = "model.layers.0.mlp.down_proj.weight"
    save_file(tensors, str(copy / "model.safetensors"))
    monkeypatch.setattr(checkpoint_module, "LOAD_BLOCK_BYTES", 1000)  # many blocks, the last one partial
    checkpoint = read_checkpoint(copy)
    assert torch.equal(checkpoint.load(name), tensors[name].to(torch.float32))
    for bad, message in ((float("nan"), "NaN or Inf"), (float("-inf"), "NaN or Inf"), (-7e4, "beyond fp16")):
        if dtype == torch.float16 and bad == -7e4:
            continue  # not representable in fp16
        broken = tensors[name].clone()
        broken.view(-1)[-3] = bad  # in the last block
        save_file({**tensors, name: broken}, str(copy / "model.safetensors"))
        with pytest.raises(ConversionError, match=f"'{name}'.*{message}"):
            read_checkpoint(copy).load(name)


def test_content_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    from mxq.converter import checkpoint as checkpoint_module

    copy = tmp_path / "copy"
    shutil.copytree(fixtures.ensure("tiny-llama"), copy)
    cache = tmp_path / "cache"
    exact = read_checkpoint(copy).content_hash()
    assert read_checkpoint(copy).content_hash(cache) == exact
    assert not (cache / "hashes").exists() or not list((cache / "hashes").iterdir())  # files just written: racy
    monkeypatch.setattr(checkpoint_module, "RACY_NS", 0)
    assert read_checkpoint(copy).content_hash(cache) == exact
    (remembered,) = (cache / "hashes").iterdir()
    remembered.write_text("f" * 64)  # what is remembered is what is returned: no file is read
    assert read_checkpoint(copy).content_hash(cache) == "f" * 64
    tensors = load_file(str(copy / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 2  # same size, new bytes: a new inode time stamp, so hashed again
    save_file(tensors, str(copy / "model.safetensors"))
    changed = read_checkpoint(copy).content_hash(cache)
    assert changed not in (exact, "f" * 64) and changed == read_checkpoint(copy).content_hash()
    (newer,) = set((cache / "hashes").iterdir()) - {remembered}
    newer.write_text("not a digest")  # a damaged entry is recomputed
    assert read_checkpoint(copy).content_hash(cache) == changed and newer.read_text() == changed
