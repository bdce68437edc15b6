"""The model contract (runtime/architectures): every family converts, runs on the numpy backend
and matches transformers, exports back to a checkpoint transformers loads; checkpoints and configs
outside the contract are refused in one line naming the tensor or field."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mxq
from mxq.converter import ConversionError, convert
from mxq.converter.checkpoint import read_checkpoint
from mxq.runtime import ModelError
from mxq.runtime.backends.numpy_backend import NumpyBackend
from mxq.runtime.config import ModelConfig
from conftest import hf_greedy
from mxq.runtime.export_hf import export_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
fixtures = pytest.importorskip("fixtures")  # tools/fixtures.py (conftest puts tools/ on sys.path)

FAMILIES = ("tiny-qwen3", "tiny-gemma3", "tiny-phi3")


def hf_model(path, round_to_fp16=False):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    if round_to_fp16:  # the weights an fp16 .mxq file holds, in float32
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model.eval()


def mxq_greedy(lm, prompt, n):
    """Greedy decode one token at a time through the KV cache (sliding windows act at every step)."""
    cache = lm.model.new_cache(len(prompt) + n)
    tokens = [int(np.argmax(lm.model.forward(prompt, cache, last_only=True)[-1]))]
    for _ in range(n - 1):
        tokens.append(int(np.argmax(lm.model.forward([tokens[-1]], cache)[-1])))
    return tokens


def check_parity(path, hf):
    """Logits of 80 tokens within 1e-3 (relative to the largest) and 32 greedy tokens identical."""
    ids = np.random.default_rng(7).integers(0, hf.config.vocab_size, size=80)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()  # (80, vocab)
    prompt = ids[:20].tolist()
    with mxq.load(path) as lm:
        logits = lm.logits(ids)
        assert logits.shape == ref.shape
        assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max()
        assert mxq_greedy(lm, prompt, 32) == hf_greedy(hf, prompt, 32)


@pytest.mark.parametrize("name", FAMILIES)
def test_fp16_file_matches_transformers(tmp_path, name):
    source = fixtures.ensure(name)
    convert(source, tmp_path / "m.mxq", bpw=16, configs="fp16", cache_dir=None)
    check_parity(tmp_path / "m.mxq", hf_model(source, round_to_fp16=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_file_exports_and_matches_its_export(tmp_path, name):
    source = fixtures.ensure(name)
    report = convert(source, tmp_path / "q.mxq", bpw=4.5, objective="frobenius", quantizer="hqq", cache_dir=None)
    assert report.achieved_bpw <= 4.5
    export_hf(tmp_path / "q.mxq", tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]
    check_parity(tmp_path / "q.mxq", hf.eval())


def test_phi3_fused_tensors_are_split_and_refused_when_malformed(tmp_path):
    from safetensors.torch import load_file, save_file

    source = fixtures.ensure("tiny-phi3")
    checkpoint = read_checkpoint(source)
    c = checkpoint.config
    assert c.rotary_dim == c.head_dim // 2 and c.layer_window(0) == 12
    tensors = load_file(str(source / "model.safetensors"))
    qkv = tensors["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(checkpoint.load("model.layers.1.self_attn.k_proj.weight"), qkv[c.q_dim:c.q_dim + c.kv_dim])
    gate_up = tensors["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(checkpoint.load("model.layers.0.mlp.up_proj.weight"), gate_up[c.intermediate_size:])
    assert "model.layers.0.self_attn.qkv_proj.weight" not in checkpoint.tensors
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = gate_up[1:]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConversionError, match="gate_up_proj.weight' has shape"):
        read_checkpoint(broken)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_unknown_checkpoint_tensor_is_refused(tmp_path, name):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / name
    shutil.copytree(fixtures.ensure(name), copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor 'model.layers.0.mlp.extra_proj.weight' is not part of"):
        read_checkpoint(copy)


# -- hostile and unsupported configs: one line naming the field, from the converter and the reader -------

HOSTILE = [  # (field, raw JSON value, message)
    ("eos_token_id", "2.0", "eos_token_id must be a token id"),
    ("rms_norm_eps", "1" + "0" * 400, "rms_norm_eps must be a positive number"),
    ("rope_theta", "1" + "0" * 400, "rope_theta must be a positive number"),
    # NaN/Infinity: config.json is parsed strictly (SPEC §3: not JSON); a .mxq `model` object names the field
    ("rms_norm_eps", "NaN", "rms_norm_eps must be a positive number|config.json contains NaN"),
    ("rope_theta", "Infinity", "rope_theta must be a positive number|config.json contains Infinity"),
    ("bos_token_id", str(2 ** 53), "bos_token_id must be a token id"),
    ("bos_token_id", "-1", "bos_token_id must be a token id"),
    ("rms_norm_eps", "0", "rms_norm_eps must be a positive number"),
    ("rope_scaling", '"linear"', "rope_scaling must be null or an object"),
    ("rope_scaling", '{"rope_type": "linear"}', "rope_scaling.factor is missing"),
    ("rope_scaling", '{"rope_type": "linear", "factor": 1' + "0" * 400 + "}", "rope_scaling.factor must be"),
    ("rope_scaling", '{"rope_type": "yarn", "factor": 2}', "rope_type 'yarn' is not supported"),
    ("architectures", '[["LlamaForCausalLM"]]', "architectures must be a list of strings"),
    ("architectures", '["GPT2LMHeadModel"]', "'GPT2LMHeadModel' is not supported"),
    ("tie_word_embeddings", '"false"', "tie_word_embeddings must be true or false"),
    ("num_key_value_heads", "3", "is not a multiple of"),
    ("hidden_size", "true", "hidden_size must be a positive integer"),
    ("vocab_size", str(2 ** 40), r"vocab_size must be a positive integer below 2\^31"),
    ("num_hidden_layers", str(2 ** 30), "num_hidden_layers = 1073741824 is beyond the supported"),
    ("head_dim", str(2 ** 30), "head_dim = 1073741824 is beyond the supported"),
    ("mlp_bias", "true", "mlp_bias = True is not supported"),
    ("hidden_act", '"gelu"', "hidden_act = 'gelu' is not supported"),
]


def llama_config() -> dict:
    """tiny-llama's config.json with RoPE in the older top-level spelling (rope_theta, rope_scaling)."""
    config = json.loads((fixtures.ensure("tiny-llama") / "config.json").read_text())
    config.pop("rope_parameters", None)
    return {**config, "rope_theta": 10000.0, "rope_scaling": None}


def _config_with(base: dict, field: str, raw: str) -> str:
    text = json.dumps({k: v for k, v in base.items() if k != field})
    return text[:-1] + f', "{field}": {raw}}}'


@pytest.mark.parametrize("field, raw, message", HOSTILE)
def test_hostile_config_is_one_line_from_the_converter_and_the_reader(tmp_path, field, raw, message):
    (tmp_path / "config.json").write_text(_config_with(llama_config(), field, raw))
    with pytest.raises(ConversionError, match=message) as error:  # before any tensor is looked at
        read_checkpoint(tmp_path)
    assert "\n" not in str(error.value) and "config.json" in str(error.value)
    if field == "architectures":
        return
    good = read_checkpoint(fixtures.ensure("tiny-llama")).model  # the .mxq model object
    model = json.loads(_config_with(good, field, raw))
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_json(model)


@pytest.mark.parametrize("name, field, value, message", [
    ("tiny-gemma3", "final_logit_softcapping", 30.0, "final_logit_softcapping = 30.0 is not supported"),
    ("tiny-gemma3", "attn_logit_softcapping", 50.0, "attn_logit_softcapping = 50.0 is not supported"),
    ("tiny-gemma3", "architectures", ["Gemma3ForConditionalGeneration"], "vision-language Gemma 3"),
    ("tiny-gemma3", "layer_types", ["sliding_attention"], "layer_types must be a list of 3"),
    ("tiny-phi3", "rope_parameters", {"rope_type": "longrope", "short_factor": [1.0] * 6,
                                      "long_factor": [1.0] * 6, "rope_theta": 1e4}, "rope_type 'longrope'"),
    ("tiny-phi3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5},
     "partial_rotary_factor must be a number in"),
    ("tiny-qwen3", "hidden_act", "relu", "hidden_act = 'relu' is not supported"),
])
def test_unsupported_family_features_are_refused(tmp_path, name, field, value, message):
    config = json.loads((fixtures.ensure(name) / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        read_checkpoint(tmp_path)


def test_cli_convert_reports_a_bad_config_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(_config_with(llama_config(), "tie_word_embeddings", '"false"'))
    run = subprocess.run([sys.executable, "-c", "from mxq.cli import main; main()", "convert", str(tmp_path),
                          "-o", str(tmp_path / "o.mxq"), "--bpw", "4"], capture_output=True, text=True)
    assert run.returncode != 0 and not (tmp_path / "o.mxq").exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "tie_word_embeddings must be true or false" in lines[0], run.stderr


def test_written_model_object_reads_back_identically():
    for name in ("tiny-llama", "tiny-qwen2", "tiny-llama3") + FAMILIES:
        checkpoint = read_checkpoint(fixtures.ensure(name))
        again = ModelConfig.from_json(json.loads(json.dumps(checkpoint.model)))
        assert again == checkpoint.config and again.to_json() == checkpoint.model


def test_gemma3_layers_follow_the_contract():
    c = read_checkpoint(fixtures.ensure("tiny-gemma3")).config
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert [c.layer_window(i) for i in range(3)] == [8, None, 8]
    assert c.attention_scale == pytest.approx(20 ** -0.5) and c.embed_scale == pytest.approx(8.0)
    # local layers: base 1e4 unscaled; the global layer: base 1e6 with linear factor 2
    dims = np.arange(0, c.head_dim, 2) / c.head_dim
    np.testing.assert_allclose(c.inv_freq(0), 1e4 ** -dims, rtol=1e-6)
    np.testing.assert_allclose(c.inv_freq(1), 1e6 ** -dims / 2, rtol=1e-6)


# -- the new backend ops against direct formulas -------------------------------------------------------

def test_rope_partial_rotates_only_the_leading_dims():
    rng = np.random.default_rng(0)
    backend = NumpyBackend(threads=1)
    T, n, head_dim, rotary = 5, 3, 16, 8
    x = rng.standard_normal((T, n * head_dim)).astype(np.float32)
    positions = np.arange(4, 4 + T)
    inv_freq = (1.0 / 1e4 ** (np.arange(0, rotary, 2) / rotary)).astype(np.float32)
    out = backend.rope(x, positions, inv_freq, head_dim).reshape(T, n, head_dim)
    xh = x.reshape(T, n, head_dim)
    np.testing.assert_array_equal(out[..., rotary:], xh[..., rotary:])
    a = positions[:, None, None] * inv_freq.astype(np.float64)[None, None]  # (T, 1, rotary/2)
    x1, x2 = xh[..., :rotary // 2], xh[..., rotary // 2:rotary]
    np.testing.assert_allclose(out[..., :rotary // 2], x1 * np.cos(a) - x2 * np.sin(a), atol=1e-5)
    np.testing.assert_allclose(out[..., rotary // 2:rotary], x2 * np.cos(a) + x1 * np.sin(a), atol=1e-5)
    full = backend.rope(x, positions, inv_freq)  # head_dim defaults to 2 * len(inv_freq): 8-dim heads
    assert full.shape == x.shape and not np.allclose(full[:, 8:16], x[:, 8:16])


@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_attention_window_and_scale(window):
    rng = np.random.default_rng(1)
    backend = NumpyBackend(threads=2)
    n_heads, n_kv, hd, T = 4, 2, 8, 9
    q = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    k = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    expected = np.zeros((T, n_heads, hd))
    for h in range(n_heads):
        kh, vh = k.reshape(T, n_kv, hd)[:, h // 2], v.reshape(T, n_kv, hd)[:, h // 2]
        for p in range(T):
            seen = [j for j in range(T) if j <= p and (window is None or j > p - window)]
            scores = 0.3 * kh[seen] @ q.reshape(T, n_heads, hd)[p, h]
            weights = np.exp(scores - scores.max())
            expected[p, h] = weights / weights.sum() @ vh[seen]
    whole = backend.attention(q, k, v, backend.new_cache(1, n_kv, hd, T).layers[0], 0, scale=0.3, window=window)
    np.testing.assert_allclose(whole, expected.reshape(T, -1), atol=1e-5)
    cache = backend.new_cache(1, n_kv, hd, T).layers[0]  # prefill 4, then one token at a time
    parts = [backend.attention(q[:4], k[:4], v[:4], cache, 0, scale=0.3, window=window)]
    parts += [backend.attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], cache, t, scale=0.3, window=window)
              for t in range(4, T)]
    np.testing.assert_allclose(np.concatenate(parts), expected.reshape(T, -1), atol=1e-5)


def test_gelu_mul_and_scale():
    backend = NumpyBackend(threads=1)
    g = np.linspace(-12, 12, 97, dtype=np.float32).reshape(1, -1)
    u = np.random.default_rng(2).standard_normal(g.shape).astype(np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(g), approximate="tanh").numpy() * u
    np.testing.assert_allclose(backend.gelu_mul(g, u), expected, rtol=1e-5, atol=1e-6)
    x = np.ones((2, 3), np.float32)
    y = backend.scale(x, math.sqrt(640))
    assert y.dtype == np.float32 and y is not x and np.all(y == np.float32(math.sqrt(640))) and np.all(x == 1)


def test_one_layer_builds_alone_with_gemma_norms_folded(tmp_path):
    """model_layer_weights: what the converter streams layer by layer; Gemma's (1 + w) folded at load."""
    from mxq.format_spec import MxqFile
    from mxq.runtime.model import model_layer_weights

    convert(fixtures.ensure("tiny-gemma3"), tmp_path / "g.mxq", bpw=16, configs="fp16", cache_dir=None)
    backend = NumpyBackend(threads=1)
    asked = []
    with MxqFile.open(tmp_path / "g.mxq") as f:
        config = ModelConfig.from_json(f.model)

        def tensor(name, shape, required=True):
            asked.append(name)
            assert tuple(f.tensors[name].shape) == shape
            return backend.prepare(f.tensors[name], f.blobs(name))

        layer = model_layer_weights(config, 2, tensor)
        stored = f.blobs("model.layers.2.post_feedforward_layernorm.weight")["data"].astype(np.float32)
        np.testing.assert_array_equal(layer.mlp_out_norm, stored + 1)
    assert all(name.startswith("model.layers.2.") for name in asked) and len(asked) == 13
    assert layer.o_bias is None and layer.q_norm.shape == (config.head_dim,)


@pytest.mark.parametrize("name", FAMILIES)
def test_fixture_build_is_deterministic(name, tmp_path):
    built = fixtures.build(name, tmp_path / name)
    cached = fixtures.ensure(name)
    for file in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (built / file).read_bytes() == (cached / file).read_bytes(), file


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_sliding_window_variants_match_transformers(tmp_path, kind):
    """Mistral's window over every layer; Qwen2/3's from max_window_layers on (use_sliding_window)."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, sliding_window=6, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "mistral":
        config = transformers.MistralConfig(**common)
    else:
        cls = transformers.Qwen2Config if kind == "qwen2" else transformers.Qwen3Config
        config = cls(**common, use_sliding_window=True, max_window_layers=1)
    source = tmp_path / "src"
    source.mkdir()
    fixtures.build_tiny(source, config, seed=9)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fixtures.ensure("tiny-qwen2") / name, source / name)
    checkpoint = read_checkpoint(source)
    windows = [checkpoint.config.layer_window(i) for i in range(3)]
    assert windows == ([6, 6, 6] if kind == "mistral" else [None, 6, 6])
    convert(source, tmp_path / "m.mxq", bpw=16, configs="fp16", cache_dir=None)
    check_parity(tmp_path / "m.mxq", hf_model(source, round_to_fp16=True))
