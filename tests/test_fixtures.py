"""Tests for tools/fixtures.py: the fixtures load in transformers, are deterministic, and the
SmolLM2 channel permutation keeps the function while taking the weights off the Q4_1 grid."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, AutoConfig  # noqa: E402

FIXTURES_PY = Path(__file__).resolve().parent.parent / "tools" / "fixtures.py"
_spec = importlib.util.spec_from_file_location("mxq_tools_fixtures", FIXTURES_PY)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

TINY = ["tiny-llama", "tiny-qwen2", "tiny-llama3"]
PROMPT = "Once upon a time, there was a little girl named"
TEXT = (
    "The old schoolmaster walked slowly along the river in the early morning, thinking about the "
    "boys who had thrown stones at his window the night before. He did not know their names, but "
    "he remembered their laughter, and he resolved that he would find them before the week was out, "
    "whatever it cost him in patience. The headmaster, a thin man with a loud voice, only smiled "
    "and told him that boys will be boys."
)


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def rtn_rel_error(w, bits=4, group=32):
    """‖W − Ŵ‖/‖W‖ for round-to-nearest min-max (asymmetric) quantization in groups along the input dim."""
    w = np.asarray(w, np.float64)
    g = w.reshape(w.shape[0], -1, group)  # (out, in/group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    q = np.clip(np.round((g - lo) / scale), 0, 2**bits - 1)
    return np.linalg.norm(w - (q * scale + lo).reshape(w.shape)) / np.linalg.norm(w)


# -----------------------------------------------------------------------------
# tiny fixtures (fast)


@pytest.mark.parametrize("name", TINY)
def test_tiny_loads_with_finite_logits(name):
    path = fixtures.ensure(name)
    assert path.name == f"{name}-v{fixtures.FIXTURES[name][1]}"
    config = AutoConfig.from_pretrained(path)
    model = load(path)
    ids = torch.randint(3, config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, vocab)
    assert logits.shape == (1, 48, config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std(-1).mean() > 0.5  # not flat
    if name == "tiny-llama":
        assert (path / "tokenizer.model").is_file()
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        assert tok_config["bos_token"] == "<s>" and tok_config["eos_token"] == "</s>" and tok_config["chat_template"]
        assert not config.tie_word_embeddings and config.head_dim == 24
        sentencepiece = pytest.importorskip("sentencepiece")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        assert sp.vocab_size() == config.vocab_size == 32000 and sp.bos_id() == 1 and sp.eos_id() == 2
    else:
        tok = AutoTokenizer.from_pretrained(path)
        assert len(tok) == config.vocab_size
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == config.eos_token_id
        text = "Hello, Botchan! ü 😀"
        assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    if name == "tiny-llama3":
        rope = config.rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        assert rope["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("name", TINY)
def test_tiny_build_is_deterministic(name, tmp_path):
    a = fixtures.build(name, tmp_path / "a")
    b = fixtures.build(name, tmp_path / "b")
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() == (fixtures.ensure(name) / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", TINY)
def test_permute_channels_preserves_function(name):
    """The permutation on the tiny models: GQA, head_dim 24, untied lm_head (tiny-llama), v bias (tiny-qwen2)."""
    model = load(fixtures.ensure(name))
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        sd = fixtures.permute_channels(fixtures.hf_state_dict(model), model.config, seed=0)
        assert any(not torch.equal(sd[k], v) for k, v in model.state_dict().items() if k in sd)
        model.load_state_dict(sd, strict=False)  # strict=False: a tied lm_head is not in sd
        out = model(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_ensure_cache_and_cli(tmp_path):
    env = dict(os.environ, MXQ_FIXTURE_CACHE=str(tmp_path / "cache"))
    cli = [sys.executable, str(FIXTURES_PY)]
    # NAME alone: prints the cached path, building it atomically (no temp dirs left behind)
    out = subprocess.run(cli + ["tiny-qwen2"], env=env, capture_output=True, text=True, check=True).stdout
    path = Path(out.strip().splitlines()[-1])
    assert path == tmp_path / "cache" / f"tiny-qwen2-v{fixtures.FIXTURES['tiny-qwen2'][1]}"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if "tmp" in p.name) == []
    # NAME OUT_DIR: refuses to overwrite without --force
    dest = tmp_path / "out"
    dest.mkdir()
    assert subprocess.run(cli + ["tiny-qwen2", str(dest)], env=env, capture_output=True).returncode != 0
    subprocess.run(cli + ["tiny-qwen2", str(dest), "--force"], env=env, capture_output=True, check=True)
    assert (dest / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


# -----------------------------------------------------------------------------
# smollm2 (slow: dequantizes the 135M GGUF)


@pytest.fixture(scope="module")
def smollm2():
    return fixtures.ensure("smollm2")


@pytest.fixture(scope="module")
def smollm2_unpermuted():
    return fixtures.ensure("smollm2-unpermuted")


@pytest.mark.slow
def test_smollm2_checkpoint_layout(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9  # embed, final norm, 9 per layer
    assert AutoTokenizer.from_pretrained(smollm2).chat_template


@pytest.mark.slow
def test_smollm2_permutation_preserves_logits(smollm2, smollm2_unpermuted):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]  # (1, 64)
    assert ids.shape[1] == 64
    with torch.no_grad():
        a = load(smollm2)(ids).logits
        b = load(smollm2_unpermuted)(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.slow
def test_smollm2_permutation_leaves_the_q4_grid(smollm2, smollm2_unpermuted):
    names = [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.12.mlp.down_proj.weight",
        "model.layers.21.self_attn.o_proj.weight",  # only the two 32-blocks of each head mix here
    ]
    with safe_open(str(smollm2 / "model.safetensors"), "np") as p, \
            safe_open(str(smollm2_unpermuted / "model.safetensors"), "np") as u:
        for name in names:
            err_u, err_p = rtn_rel_error(u.get_tensor(name)), rtn_rel_error(p.get_tensor(name))
            assert err_u < 1e-4, (name, err_u)  # Q4_1 reproduced ~exactly
            assert err_p > 0.03, (name, err_p)  # an ordinary 4-bit error (~0.07-0.08)


@pytest.mark.slow
def test_smollm2_greedy_continuation(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = load(smollm2)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Emma who loved to play in the sun.")
