"""The CPU runtime against transformers (the reference, tests only) on the tiny fixtures, plus its
tokenizer, sampler, perplexity, CLI and error paths."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mxq
from mxq.format_spec import StorageConfig
from mxq.runtime import ModelError
from mxq.runtime.backends.numpy_backend import AffineWeight, DenseWeight, NumpyBackend
from mxq.runtime.backends.cpu_weights import KERNEL_MAX_TOKENS, activation_low_part, quantize_activations
from mxq.runtime.export_hf import export_hf
from mxq.runtime.perplexity import perplexity
from mxq.runtime.sampler import Sampler
from conftest import hf_greedy
from test_runtime_files import write_test_mxq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
fixtures = pytest.importorskip("fixtures")  # tools/fixtures.py (conftest puts tools/ on sys.path)

TINY = ("tiny-llama", "tiny-qwen2", "tiny-llama3")
MIX = [(4, 64, 0), (3, 32, 1), (5, 64, 1), (8, 128, 0), (2, 128, 1), (6, 32, 0), (4, 128, 1), "fp16"]
TEXT = ("Botchan's father never cared for him, and his mother favoured his elder brother; only Kiyo, "
        "the old maid, believed in him. Héllo wörld — 日本語のテキスト 🙂 and some more words. ")


def mixed_plan(fixture):
    """RTN configs cycling through MIX (3/5/6-bit, outliers, padded last groups); embeddings quantized
    too, except tiny-llama3's (a tied fp16 embedding)."""
    counter = iter(range(10_000))

    def choose(name, shape, role):
        if role == "embedding" and fixture == "tiny-llama3":
            return "fp16"
        if role in ("embedding", "lm_head"):
            return (4, 32, 5) if role == "embedding" else (8, 64, 3)
        choice = MIX[next(counter) % len(MIX)]
        if choice == "fp16":
            return choice
        bits, group, outliers = choice
        return bits, group, outliers * max(1, shape[0] * shape[1] // 200)

    return choose


VQ_MIX = [("v2d4g32", 0), ("v3d2g64", 1), ("v4d2g128m8", 0), ("v2d2g32", 1), ("v2d2g128m8", 0), ("v3d2g32", 0),
          ("v4d2g64", 1), (4, 64, 0), ("v3d4g64s", 1), ("v2d4g32s", 0), ("v3d4g128m8s", 0)]  # shared codebooks (1.7)


def vq_plan(fixture):
    """RTN vq configs cycling through VQ_MIX (every (bits, dim), group size and metadata width, outliers; an
    affine matrix among them); the embedding and lm_head vq too (tiny-qwen2's tied one), except tiny-llama3's
    embedding (a tied fp16 one)."""
    counter = iter(range(10_000))

    def choose(name, shape, role):
        if role == "embedding" and fixture == "tiny-llama3":
            return "fp16"
        choice = VQ_MIX[next(counter) % len(VQ_MIX)] if role == "linear" else ("v4d2g64", 1)
        if len(choice) == 3:
            return choice
        label, outliers = choice
        n = outliers * max(1, shape[0] * shape[1] // 200)
        return StorageConfig.parse(label + (f"+o{n}" if n else ""))

    return choose


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{(fixture, kind): (mxq path, transformers model of its export-hf output)}, built lazily."""
    cache = {}

    def get(fixture, kind):
        if (fixture, kind) not in cache:
            root = tmp_path_factory.mktemp(f"{fixture}-{kind}")
            plans = {"fp16": lambda _: (lambda name, shape, role: "fp16"), "mixed": mixed_plan, "vq": vq_plan}
            choose = plans[kind](fixture)
            path = write_test_mxq(fixtures.ensure(fixture), root / "model.mxq", choose)
            export_hf(path, root / "hf")
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(
                root / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            cache[(fixture, kind)] = path, hf.eval()
        return cache[(fixture, kind)]

    return get


def mxq_greedy(lm, prompt, n):
    """Greedy decode through the KV cache, ignoring EOS (like hf_greedy)."""
    cache = lm.model.new_cache(len(prompt) + n)
    logits = lm.model.forward(prompt, cache, last_only=True)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(n - 1):
        tokens.append(int(np.argmax(lm.model.forward([tokens[-1]], cache)[-1])))
    return tokens


# -- parity with transformers ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp16", "mixed", "vq"])
@pytest.mark.parametrize("fixture", TINY)
def test_parity_with_transformers(built, fixture, kind):
    path, hf = built(fixture, kind)
    ids = np.random.default_rng(7).integers(0, hf.config.vocab_size, size=128)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()  # (128, vocab)
    prompt = ids[:12].tolist()
    ref_tokens = hf_greedy(hf, prompt, 64)
    for cache_dequantized in (False, True):
        with mxq.load(path, cache_dequantized=cache_dequantized) as lm:
            logits = lm.logits(ids)
            assert logits.shape == ref.shape and logits.dtype == np.float32
            assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max()
            tokens = mxq_greedy(lm, prompt, 64)
            assert tokens == ref_tokens
            generated = list(lm.generate_ids(prompt, max_new_tokens=64))  # stops at EOS, which it never yields
            assert generated == tokens[:len(generated)]
            assert len(generated) == 64 or tokens[len(generated)] in lm.tokenizer.eos_ids


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_parity_head_dim_and_linear_rope(tmp_path, architecture):
    """head_dim ≠ hidden / heads (q/o projections are not square), linear RoPE scaling; mistral."""
    import shutil

    config_class = transformers.LlamaConfig if architecture == "llama" else transformers.MistralConfig
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                          rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fixtures.init_random_(model, seed=5)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fixtures.ensure("tiny-qwen2") / name, tmp_path / "src" / name)
    path = write_test_mxq(tmp_path / "src", tmp_path / "model.mxq", mixed_plan(architecture))
    export_hf(path, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == type(model).__name__
    ids = np.random.default_rng(3).integers(0, 512, size=96)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    with mxq.load(path) as lm:
        assert lm.config.head_dim == 32 and lm.config.rope_scaling.rope_type == "linear"
        assert np.abs(lm.logits(ids) - ref).max() <= 1e-3 * np.abs(ref).max()
        assert mxq_greedy(lm, ids[:8].tolist(), 32) == hf_greedy(hf, ids[:8].tolist(), 32)


def test_export_hf_config_round_trip(built):
    path, hf = built("tiny-llama3", "fp16")
    config = json.loads((Path(path).parent / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 64


# -- kernels: the fast lean paths against the format's reference dequantization -------------------

class _Entry:
    def __init__(self, name, shape, config, role="linear"):
        self.name, self.shape, self.config, self.role = name, shape, config, role


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_products_match_reference(bits):
    from conftest import random_affine_blobs
    from mxq.format_spec import dequantize

    rng = np.random.default_rng(bits)
    backend = NumpyBackend()
    for group in (32, 64, 128):
        for shape, nnz in (((37, 70), 6), ((20, 256), 0), ((3, 200), 2)):
            config = StorageConfig.affine(bits, group, nnz)
            blobs = random_affine_blobs(rng, shape, config)
            ref = dequantize(blobs, shape, config)
            weight = AffineWeight(_Entry("w", shape, config), blobs, backend)
            np.testing.assert_allclose(weight.dequantize_rows(slice(None)), ref, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(weight.rows(np.array([2, 0, 2])), ref[[2, 0, 2]], rtol=1e-6, atol=1e-6)
            for tokens in (1, 5, 40):  # decode path (per-group products) and prefill path (dequantize + sgemm)
                x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
                kernel = backend.kernels is not None and tokens <= KERNEL_MAX_TOKENS  # W·x̂: x rounded to ~16 or 8 bits
                y, y_ref = weight.matmul(x), (quantize_activations(x, activation_low_part()) if kernel else x) @ ref.T
                assert np.abs(y - y_ref).max() <= (2e-5 if kernel else 1e-5) * np.abs(y_ref).max()  # as test_cpu_kernels


@pytest.mark.parametrize("cache_dequantized", [False, True])
def test_threaded_products_match_single_threaded(cache_dequantized):
    """Big enough matrices are split over worker threads by output rows: same numbers."""
    from conftest import random_affine_blobs

    rng = np.random.default_rng(1)
    shape = (600, 520)  # above the parallel thresholds; 520 = a padded last group for g=64/128
    threaded = NumpyBackend(cache_dequantized=cache_dequantized, threads=3)
    single = NumpyBackend(cache_dequantized=cache_dequantized, threads=1)
    for config in (StorageConfig.affine(4, 64, 50), StorageConfig.affine(3, 128, 0), StorageConfig.fp16()):
        blobs = (random_affine_blobs(rng, shape, config) if config.scheme == "affine"
                 else {"data": rng.standard_normal(shape).astype(np.float16)})
        a, b = (backend.prepare(_Entry("w", shape, config), blobs) for backend in (threaded, single))
        for tokens in (1, 40):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            np.testing.assert_allclose(threaded.linear(x, a), single.linear(x, b), rtol=1e-5, atol=1e-4)
    threaded.close()


def test_fp16_products_match_reference():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 33)).astype(np.float16)
    data[0, :6] = [0.0, -0.0, 6e-8, -6e-5, 65504, -1e-7]  # zeros, subnormals, max
    weight = DenseWeight("w", data, NumpyBackend(kernels=False))  # the NumPy path: exact
    x = rng.standard_normal((3, 33)).astype(np.float32)
    np.testing.assert_array_equal(weight.matmul(x), x @ data.astype(np.float32).T)


def test_bad_outliers_raise_model_error_naming_tensor():
    from conftest import random_affine_blobs

    config = StorageConfig.affine(4, 32, 3)
    blobs = random_affine_blobs(np.random.default_rng(0), (4, 64), config)
    blobs["outlier_cols"] = np.array([5, 3, 1], dtype=np.uint16)
    blobs["outlier_row_ptr"] = np.array([0, 3, 3, 3, 3], dtype=np.uint32)  # decreasing columns in row 0
    with pytest.raises(ModelError, match="model.layers.0.mlp.up_proj.weight"):
        NumpyBackend().prepare(_Entry("model.layers.0.mlp.up_proj.weight", (4, 64), config), blobs)


# -- config --------------------------------------------------------------------------------------

def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mxq.runtime.config import ModelConfig

    base = {"architecture": "llama", "vocab_size": 10, "hidden_size": 96, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    for scaling in (None, {"type": "linear", "factor": 2.0}, llama3):
        ours = ModelConfig.from_json({**base, "rope_scaling": scaling}).inv_freq()
        hf_config = LlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=24, rope_theta=10000.0,
                                rope_scaling=scaling and {"rope_type": scaling.get("rope_type", scaling.get("type")),
                                                          **{k: v for k, v in scaling.items() if "type" not in k}})
        rope_type = hf_config.rope_parameters["rope_type"]
        if rope_type == "default":
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
            theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
        else:
            theirs, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", None, "model.hidden_size is missing"),
    ("num_key_value_heads", 3, "not a multiple"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type 'yarn'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor is missing"),
    ("rms_norm_eps", "small", "model.rms_norm_eps must be a positive number"),
])
def test_bad_model_config_names_the_field(field, value, message):
    from mxq.runtime.config import ModelConfig

    model = {"architecture": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
             "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 1e4, field: value}
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_json(model)


# -- tokenizer, streaming, chat, sampling ------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen2"])
def test_stream_never_emits_broken_utf8(built, fixture):
    path, _ = built(fixture, "fp16")
    with mxq.load(path) as lm:
        tok = lm.tokenizer
        ids = tok.encode(TEXT * 2, add_bos=False)
        assert tok.decode(ids) == TEXT * 2
        assert len(ids) > len(TEXT.encode("utf-8")) / 8  # multi-byte characters span several tokens
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == TEXT * 2
        # after a prompt, a continuation keeps its leading space
        prompt, rest = ids[:5], ids[5:]
        stream = tok.stream(prompt)
        assert "".join([stream.push(i) for i in rest] + [stream.flush()]) == tok.decode(ids)[len(tok.decode(prompt)):]


def test_chat_template_matches_transformers(built):
    path, _ = built("tiny-qwen2", "fp16")
    hf_tok = transformers.AutoTokenizer.from_pretrained(Path(path).parent / "hf")
    with mxq.load(path) as lm:
        messages = [{"role": "user", "content": "Hello there, how are you?"}]
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert lm.tokenizer.encode_chat("Hello there, how are you?") == list(expected)
        assert lm.tokenizer.encode(TEXT) == hf_tok(TEXT, add_special_tokens=False)["input_ids"]
        assert "".join(lm.generate("Hi", max_new_tokens=5, chat=True)) is not None


def test_sentencepiece_chat_splits_special_tokens(built):
    path, _ = built("tiny-llama", "fp16")
    with mxq.load(path) as lm:
        tok = lm.tokenizer
        ids = tok.encode_chat("Hi")  # template: "<s>[INST] Hi [/INST]"
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.decode(ids) == "[INST] Hi [/INST]"
        assert tok.encode("Hello") == [tok.bos_id] + tok.encode("Hello", add_bos=False)


def test_sampling_is_reproducible(built):
    path, _ = built("tiny-llama", "fp16")
    with mxq.load(path) as lm:
        run = lambda seed, **kw: list(lm.generate_ids([1, 450, 4996], 24, temperature=1.0, seed=seed, **kw))
        assert run(1) == run(1) and run(5, top_k=40, top_p=0.9) == run(5, top_k=40, top_p=0.9)
        assert run(1) != run(2)
        greedy = list(lm.generate_ids([1, 450, 4996], 24))
        assert run(3, top_k=1) == greedy and run(4, top_p=1e-6) == greedy


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda **kw: {Sampler(1.0, seed=s, **kw)(logits) for s in range(200)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.79) == {0, 1} and draws(top_p=0.81) == {0, 1, 2}
    assert Sampler(0.0)(logits) == 0
    with pytest.raises(ModelError):
        Sampler(-1.0)


# -- limits and errors ---------------------------------------------------------------------------

def test_prompt_longer_than_context_is_a_model_error(built):
    path, _ = built("tiny-qwen2", "fp16")  # context 256
    with mxq.load(path) as lm:
        with pytest.raises(ModelError, match="context is 256"):
            next(lm.generate("word " * 400))
        with pytest.raises(ModelError, match="context"):
            lm.logits(np.zeros(257, dtype=np.int64))
        with pytest.raises(ModelError, match="vocabulary"):
            lm.logits([1, 10_000])
        assert len(list(lm.generate_ids(list(range(250)), max_new_tokens=50))) <= 6  # stops at the context end
    with pytest.raises(ModelError, match="cuda"):
        mxq.load(path, device="cuda")


def test_cli_errors_are_one_line(built, tmp_path):
    from click.testing import CliRunner

    from mxq.cli import main

    path, _ = built("tiny-qwen2", "fp16")
    runner = CliRunner()
    cases = [["generate", str(tmp_path / "missing.mxq"), "hi"],
             ["generate", str(path), "word " * 400],
             ["generate", str(path), "hi", "--device", "cuda"],
             ["generate", str(path), "hi", "--top-p", "1.5"],
             ["eval", str(path), "--text", str(tmp_path / "none.txt")],
             ["eval", str(path), "--ctx", "100000", "--text", __file__],
             ["export-hf", str(tmp_path / "missing.mxq"), str(tmp_path / "out")]]
    for args in cases:
        result = runner.invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("mxq: error: "), (args, result.stderr)
    result = runner.invoke(main, ["generate", str(path), "Once upon", "-n", "4", "--temperature", "0.7", "--seed", "1"])
    assert result.exit_code == 0 and "decode:" in result.stderr and "tok/s" in result.stderr


def test_runtime_imports_neither_torch_nor_transformers(built):
    path, _ = built("tiny-llama", "mixed")
    script = (
        "import sys, mxq\n"
        f"m = mxq.load({str(path)!r})\n"
        "text = ''.join(m.generate('Once upon a time', max_new_tokens=4))\n"
        "bad = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok', m.last_stats.new_tokens)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr


def test_cli_generate_imports_neither_torch_nor_transformers(built):
    """`mxq generate` must work where torch is not installed: registering the converter's commands
    may not import it either."""
    path, _ = built("tiny-llama", "mixed")
    script = (
        "import sys\n"
        "from mxq.cli import main\n"
        f"sys.argv = ['mxq', 'generate', {str(path)!r}, 'Once upon a time', '-n', '4']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "assert not bad, f'imported {bad}'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# -- perplexity ------------------------------------------------------------------------------------

def test_perplexity_matches_transformers(built):
    path, hf = built("tiny-llama", "mixed")
    text = (Path(fixtures.DATA_DIR) / "botchan.txt").read_text()[:3000]
    with mxq.load(path) as lm:
        ids = lm.tokenizer.encode(text)[:400]
        chunks = perplexity(lm, ids, ctx=96, max_chunks=3, progress=False)
        stride = perplexity(lm, ids, ctx=96, stride=40, progress=False)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        # GPTQ-style: non-overlapping chunks, loss over positions 1..ctx-1 of each
        nlls = [hf(input_ids[:, i * 96:(i + 1) * 96], labels=input_ids[:, i * 96:(i + 1) * 96]).loss * 96
                for i in range(3)]
        gptq = math.exp(float(torch.stack(nlls).sum() / (3 * 96)))
        # transformers' sliding-window recipe, verbatim
        nll_sum, n_tokens, prev_end_loc, seq_len = 0.0, 0, 0, input_ids.size(1)
        for begin_loc in range(0, seq_len, 40):
            end_loc = min(begin_loc + 96, seq_len)
            trg_len = end_loc - prev_end_loc
            window = input_ids[:, begin_loc:end_loc]
            target_ids = window.clone()
            target_ids[:, :-trg_len] = -100
            loss = hf(window, labels=target_ids).loss
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
            nll_sum += loss * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
        sliding = math.exp(float(nll_sum / n_tokens))
    assert chunks["chunks"] == 3 and chunks["scored_tokens"] == 3 * 95
    assert abs(chunks["ppl"] / gptq - 1) < 1e-3
    assert abs(stride["ppl"] / sliding - 1) < 1e-3 and stride["tokens"] == len(ids)


def test_mean_and_se_is_the_standard_error_over_units():
    from mxq.runtime.perplexity import mean_and_se

    rng = np.random.default_rng(3)
    means = rng.normal(3.0, 0.2, size=9)
    mean, se = mean_and_se(means * 50, [50] * 9)  # equal units: the usual standard error of their means
    assert mean == pytest.approx(means.mean()) and se == pytest.approx(means.std(ddof=1) / 3)
    mean, se = mean_and_se([10.0, 30.0], [10, 10])
    assert (mean, se) == (2.0, 1.0)
    assert mean_and_se([5.0], [4]) == (1.25, None)  # one unit: no spread to estimate
    mean, se = mean_and_se([2.0, 40.0], [1, 20])  # unequal units weigh by size: Σ/Σ, not the means' mean
    assert mean == pytest.approx(42 / 21) and se == pytest.approx(0.0)


def test_perplexity_reference_matches_transformers(built):
    """--reference: both perplexities as each model alone gives them, KL(ref ‖ model) and top-1 agreement
    as computed from transformers' logits of the two export-hf copies, the ratio's interval from the
    paired chunk differences; a model against itself: ratio 1, KL 0, agreement 1."""
    path, hf = built("tiny-llama", "mixed")
    ref_path, ref_hf = built("tiny-llama", "fp16")
    text = (Path(fixtures.DATA_DIR) / "botchan.txt").read_text()[:3000]
    with mxq.load(path) as lm, mxq.load(ref_path) as ref:
        ids = lm.tokenizer.encode(text)[:400]
        alone = perplexity(lm, ids, ctx=96, max_chunks=3, progress=False)
        ref_alone = perplexity(ref, ids, ctx=96, max_chunks=3, progress=False)
        both = perplexity(lm, ids, ctx=96, max_chunks=3, progress=False, reference=ref)
        itself = perplexity(lm, ids, ctx=96, max_chunks=3, progress=False, reference=lm)
        stride = perplexity(lm, ids, ctx=96, stride=40, progress=False, reference=ref)
        stride_alone = perplexity(lm, ids, ctx=96, stride=40, progress=False)
        one = perplexity(lm, ids[:96], ctx=96, stride=96, progress=False, reference=ref)
        last_counts_zero = perplexity(lm, ids[:97], ctx=96, stride=1, progress=False, reference=ref)  # new − 1 = 0
    assert last_counts_zero["chunks"] == 2 and last_counts_zero["ppl"] == pytest.approx(one["ppl"])
    assert last_counts_zero["kl_divergence"] == pytest.approx(one["kl_divergence"]) and one["ppl_95"] is None
    assert both["ppl"] == pytest.approx(alone["ppl"], rel=1e-5)
    assert both["reference"]["ppl"] == pytest.approx(ref_alone["ppl"], rel=1e-5)
    assert both["ppl_ratio"] == pytest.approx(alone["ppl"] / ref_alone["ppl"], rel=1e-5)
    assert stride["ppl"] == pytest.approx(stride_alone["ppl"], rel=1e-5) and stride["chunks"] == stride_alone["chunks"]
    kl, agree = [], []
    with torch.no_grad():
        for i in range(3):
            x = torch.tensor([ids[i * 96:(i + 1) * 96]])
            lq = torch.log_softmax(hf(x).logits[0, :-1].double(), -1)
            lr = torch.log_softmax(ref_hf(x).logits[0, :-1].double(), -1)
            kl.append((lr.exp() * (lr - lq)).sum(-1))
            agree.append((lq.argmax(-1) == lr.argmax(-1)).double())
    assert both["kl_divergence"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-3)
    assert both["kl_divergence"] > 1e-4  # mixed bits differ from fp16
    assert both["top1_agreement"] == pytest.approx(float(torch.cat(agree).mean()), abs=1 / 285)
    low, high = both["ppl_ratio_95"]
    assert low < both["ppl_ratio"] < high
    diffs = np.subtract(both["chunk_nll"], both["reference"]["chunk_nll"])
    assert np.log(high / low) / 2 == pytest.approx(1.959964 * diffs.std(ddof=1) / np.sqrt(3), rel=1e-6)
    assert itself["ppl_ratio"] == pytest.approx(1.0, abs=1e-9) and itself["ppl_ratio_95"] == [1.0, 1.0]
    assert abs(itself["kl_divergence"]) < 1e-6 and itself["top1_agreement"] == 1.0
    low, high = alone["ppl_95"]
    assert low < alone["ppl"] < high and np.mean(alone["chunk_nll"]) == pytest.approx(alone["nll"])


def test_eval_command_reference(built, tmp_path):
    from click.testing import CliRunner

    from mxq.cli import main

    path, _ = built("tiny-qwen2", "mixed")
    ref_path, _ = built("tiny-qwen2", "fp16")
    other, _ = built("tiny-llama", "fp16")  # 32,000 tokens against tiny-qwen2's 512
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    args = ["eval", str(path), "--text", str(text), "--ctx", "64", "--max-chunks", "2", "--no-progress"]
    result = CliRunner().invoke(main, args + ["--reference", str(ref_path)])
    assert result.exit_code == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("perplexity ") and "(95%: " in first
    assert second.startswith("reference ") and "ratio " in second and "KL divergence " in second
    report = json.loads(CliRunner().invoke(main, args + ["--reference", str(ref_path), "--json"]).stdout)
    assert report["reference"]["file"] == str(ref_path) and report["top1_agreement"] <= 1.0
    result = CliRunner().invoke(main, args + ["--reference", str(other)])
    assert result.exit_code != 0 and "vocabulary of 32000 tokens" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    truncated = tmp_path / "truncated.mxq"
    truncated.write_bytes(Path(ref_path).read_bytes()[:5000])
    for bad in (truncated, tmp_path):  # a damaged reference, a directory: one line naming it
        result = CliRunner().invoke(main, args + ["--reference", str(bad)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and str(bad) in lines[0], result.stderr


def test_eval_command_finds_text_through_environment(built, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mxq.cli import main

    path, _ = built("tiny-qwen2", "fp16")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    monkeypatch.setenv("MXQ_EVAL_TEXT", str(text))
    result = CliRunner().invoke(main, ["eval", str(path), "--ctx", "64", "--max-chunks", "2", "--json", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["text"] == str(text) and report["method"] == "chunks" and report["chunks"] == 2
    assert report["ppl"] > 1
