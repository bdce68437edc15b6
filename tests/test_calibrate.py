"""Calibration: the layer-streamed statistics equal transformers' whole-model autograd (the reference:
no second mxq forward pass exists); the cache stores them compactly, reads them per matrix and rebuilds
a damaged entry; importance-weighted rounding does what it claims."""
import pytest
import torch

import fixtures
from mxq.converter import calibrate as calibration
from mxq.converter import convert
from mxq.converter.calibrate import calibrate, calibration_chunks, default_text, load_or_calibrate
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.errors import ConversionError
from mxq.converter.quantize import quantize
from mxq.format_spec import MxqFile, StorageConfig


def whole_model_reference(path, checkpoint, tokens):
    """Today's definition with transformers' model and autograd: per chunk c, L_c = summed next-token
    CE; Fisher = Σ_c (∂L_c/∂W)², input_sq = Σ_tokens x² of every decoder linear's input; loss = mean CE."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and getattr(checkpoint.tensors.get(f"{n}.weight"), "role", "") == "linear"}
    assert len(linears) == len(checkpoint.linears)
    fisher = {name: torch.zeros_like(m.weight) for name, m in linears.items()}
    input_sq = {name: 0 for name in linears}

    def hook(name):
        def record(module, inputs, output):
            input_sq[name] = input_sq[name] + inputs[0].detach()[0].pow(2).sum(0)
        return record

    for name, m in linears.items():
        m.register_forward_hook(hook(name))
    chunks, total = calibration_chunks(checkpoint, default_text(), tokens), 0.0
    head = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)  # the head's use alone
    vocab, hidden = head.shape
    head_fisher, embedding_fisher = torch.zeros(vocab, hidden), torch.zeros(vocab, hidden)
    scale = checkpoint.config.embed_scale or 1.0
    for chunk in chunks:
        embedded = model.get_input_embeddings()(chunk[None]).detach().requires_grad_(True)  # (1, T, H), scaled
        states = model.model(inputs_embeds=embedded).last_hidden_state[0]
        loss = torch.nn.functional.cross_entropy((states @ head.T)[:-1], chunk[1:], reduction="sum")
        grads = torch.autograd.grad(loss, [m.weight for m in linears.values()] + [head, embedded])
        for name, grad in zip(linears, grads):
            fisher[name] += grad.pow(2)
        head_fisher += grads[-2].pow(2)
        embedding_fisher += torch.zeros(vocab, hidden).index_add_(0, chunk, grads[-1][0] * scale).pow(2)
        total += loss.item()
    fisher["head use"], fisher["embedding use"] = head_fisher, embedding_fisher
    return fisher, input_sq, total / (chunks.numel() - len(chunks))


def assert_matrices_equal_reference(ours, checkpoint, chunks, head_fisher, embedding_fisher):
    """The embedding's and lm_head's Fisher: a tied matrix sums both uses; rows the text never uses share
    n1 (ids seen once) occurrences, each worth the mean Fisher of one occurrence of the rows it does use."""
    embedding = next(n for n, t in checkpoint.tensors.items() if t.role == "embedding")
    lm_head = next((n for n, t in checkpoint.tensors.items() if t.role == "lm_head"), embedding)
    seen = torch.zeros(head_fisher.shape[0], dtype=torch.bool)
    seen[chunks.reshape(-1)] = True
    _, counts = torch.unique(chunks, return_counts=True)
    floor = embedding_fisher.sum(0) / chunks.numel() * int((counts == 1).sum()) / int((~seen).sum())
    expected_embedding = torch.where(seen[:, None], embedding_fisher, floor)
    expected = {lm_head: head_fisher}
    expected[embedding] = expected.get(embedding, 0) + expected_embedding
    assert set(ours.matrices) == set(expected)
    for name, reference in expected.items():
        assert (ours.matrices[name] - reference).abs().max() <= 2e-3 * reference.max(), name


def assert_streamed_equals_reference(name, tmp_path, tokens, fisher_max=1e-4, fisher_norm=1e-4, **options):
    """The streamed statistics against whole-model autograd: the Fisher within fisher_max · its max element-wise and
    fisher_norm of its norm overall (fp32 rounding of two summation orders), the input moments within 1e-5."""
    path = fixtures.ensure(name)
    checkpoint = read_checkpoint(path)
    ours = calibrate(checkpoint, tmp_path / "stats", tokens=tokens, fisher_dtype=torch.float32, **options)
    fisher, input_sq, loss = whole_model_reference(path, checkpoint, tokens)
    assert_matrices_equal_reference(ours, checkpoint, calibration_chunks(checkpoint, default_text(), tokens),
                                    fisher.pop("head use"), fisher.pop("embedding use"))
    assert ours.tokens == tokens and ours.loss == pytest.approx(loss, rel=1e-5)
    assert set(ours.fisher) == set(fisher) == set(ours.input_sq)
    for n in fisher:
        assert ours.fisher[n].shape == fisher[n].shape and fisher[n].max() > 0
        assert (ours.fisher[n] - fisher[n]).abs().max() <= fisher_max * fisher[n].max(), n
        assert torch.linalg.norm(ours.fisher[n] - fisher[n]) <= fisher_norm * torch.linalg.norm(fisher[n]), n
        assert torch.allclose(ours.input_sq[n], input_sq[n], rtol=1e-5, atol=1e-5 * float(input_sq[n].max())), n


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-gemma3"])
def test_streamed_statistics_equal_whole_model_autograd(name, tmp_path):
    assert_streamed_equals_reference(name, tmp_path, 1024)


def test_spilled_activations_and_small_vocabulary_slices_change_nothing(tmp_path, monkeypatch):
    """Every boundary in the memory-mapped file, the lm_head in slices of a few rows."""
    monkeypatch.setattr(calibration, "HEAD_SLICE_BYTES", 4 * 512 * 37)  # 37 vocabulary rows per slice
    assert_streamed_equals_reference("tiny-qwen2", tmp_path, 512, activation_ram_bytes=0)


@pytest.mark.slow
def test_streamed_statistics_equal_whole_model_autograd_on_smollm2(tmp_path):
    """30 layers of backprop in fp32 in two orders, with BLAS kernels that differ by CPU: the largest element-wise
    gap was ~1e-3 of the max on an AVX512 CPU, 2.0-2.4e-3 on an AVX2 one (Zen 1), where the gap's norm was
    1.3e-3 of the Fisher's (the tiny fixtures: ≤ 2.6e-5 and ≤ 1.7e-5)."""
    assert_streamed_equals_reference("smollm2", tmp_path, 1024, fisher_max=5e-3, fisher_norm=3e-3)


def test_cache_is_compact_read_per_matrix_and_rebuilt_when_damaged(tmp_path, capsys):
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))
    exact = calibrate(checkpoint, tmp_path / "exact", tokens=512, fisher_dtype=torch.float32)
    cached = load_or_calibrate(checkpoint, "h", None, 512, tmp_path / "cache")
    name = checkpoint.linears[0].name
    assert torch.equal(cached.fisher[name], exact.fisher[name].to(torch.bfloat16).float())  # bf16 on disk
    assert torch.equal(cached.input_sq[name], exact.input_sq[name]) and cached.loss == exact.loss
    again = load_or_calibrate(checkpoint, "h", None, 512, tmp_path / "cache")  # from the cache: no notice
    assert torch.equal(again.fisher[name], cached.fisher[name]) and capsys.readouterr().err == ""
    layer_file = next(cached.directory.glob("layer-*.safetensors"))
    data = bytearray(layer_file.read_bytes())
    data[-3] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    rebuilt = load_or_calibrate(checkpoint, "h", None, 512, tmp_path / "cache")
    notice = capsys.readouterr().err.strip()
    assert "damaged" in notice and layer_file.name in notice and len(notice.splitlines()) == 1
    assert torch.equal(rebuilt.fisher[name], cached.fisher[name])
    (rebuilt.directory / "meta.json").write_text("{not json")
    load_or_calibrate(checkpoint, "h", None, 512, tmp_path / "cache")
    assert "damaged" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("*.partial")) and not list((tmp_path / "cache").glob("*.activations"))


def test_every_calibration_chunk_starts_like_a_sequence():
    """A tokenizer that adds BOS: every chunk is [BOS] + the next CHUNK_TOKENS − 1 text tokens, the text
    contiguous across chunks; held-out chunks (--max-loss) continue where calibration stopped, the same
    way. Without BOS the chunks are the plain token stream."""
    import dataclasses
    from types import SimpleNamespace
    from mxq.converter import prediction
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))
    assert checkpoint.tokenizer["add_bos_token"]
    text, T, bos = default_text(), calibration.CHUNK_TOKENS, checkpoint.tokenizer["bos_token_id"]
    ids = calibration.text_ids(checkpoint, text)
    chunks = calibration_chunks(checkpoint, text, 4 * T + 100)
    assert chunks.shape == (4, T) and (chunks[:, 0] == bos).all()
    assert chunks[:, 1:].reshape(-1).tolist() == ids[:4 * (T - 1)]
    stand_in = SimpleNamespace(checkpoint=checkpoint, text=text, calibration=SimpleNamespace(tokens=4 * T))
    heldout = prediction.heldout_ids(stand_in).reshape(-1, T)
    assert (heldout[:, 0] == bos).all()
    assert heldout[:, 1:].reshape(-1).tolist() == ids[4 * (T - 1):(4 + len(heldout)) * (T - 1)]
    plain = dataclasses.replace(checkpoint, tokenizer={**checkpoint.tokenizer, "add_bos_token": False})
    assert calibration_chunks(plain, text, 4 * T).reshape(-1).tolist() == ids[:4 * T]
    with pytest.raises(ConversionError, match="at least 2 are needed"):
        calibration_chunks(checkpoint, "a few words", 4 * T)


def test_the_cache_key_covers_the_tokenizer(tmp_path):
    """Same weights and text, another tokenizer: other token ids, so other statistics — never the cached ones."""
    import dataclasses
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))
    first = load_or_calibrate(checkpoint, "h", None, 256, tmp_path / "cache")
    other = dataclasses.replace(checkpoint, tokenizer={**checkpoint.tokenizer, "add_bos_token": not checkpoint.tokenizer.get("add_bos_token")})
    second = load_or_calibrate(other, "h", None, 256, tmp_path / "cache")
    assert first.directory != second.directory
    assert load_or_calibrate(checkpoint, "h", None, 256, tmp_path / "cache").directory == first.directory


def test_a_matrix_damaged_after_opening_fails_with_its_name(tmp_path):
    checkpoint = read_checkpoint(fixtures.ensure("tiny-qwen2"))
    result = load_or_calibrate(checkpoint, "h", None, 512, None)  # no cache: a temporary directory
    name = checkpoint.linears[-1].name
    file = result.directory / result.fisher.tensors[name]
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ConversionError, match="cannot read"):
        result.fisher[name]


def test_a_damaged_matrices_file_fails_with_its_name(tmp_path):
    """The embedding/lm_head statistics are read like the layers' (one header, one read per tensor):
    a cut-short file or a header that lies is a one-line error naming the file and the tensor."""
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))  # untied: embedding and lm_head
    result = load_or_calibrate(checkpoint, "h", None, 256, None)
    file = result.directory / "matrices.safetensors"
    intact = file.read_bytes()
    for name in result.matrices:
        assert result.matrices[name].shape == checkpoint.tensors[name].shape
    damages = {"lm_head.weight": (intact[:-64], "'head_fisher' is cut short"),  # stored last
               "model.embed_tokens.weight": (intact.replace(b'"I64"', b'"I32"', 1), "'embedding_counts' is damaged")}
    for name, (damaged, message) in damages.items():
        file.write_bytes(damaged)
        result.matrices.file._header = None  # a header is read once per reader
        with pytest.raises(ConversionError, match=f"matrices.safetensors: {message}; delete"):
            result.matrices[name]


def test_weighted_rounding_lowers_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g) * 0.02
    importance = torch.rand(64, 256, generator=g) ** 4  # very uneven importance
    for bits in (2, 3, 4):
        config = StorageConfig.affine(bits, 64)
        plain = quantize(weight, config, "hqq", importance=importance)
        weighted = quantize(weight, config, "wls", importance=importance)
        assert weighted.weighted_error < plain.weighted_error


def test_error_outliers_target_the_weighted_error():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 256, generator=g) * 0.02
    importance = torch.rand(64, 256, generator=g) ** 6
    config = StorageConfig.affine(3, 64, 300)
    by_error = quantize(weight, config, "wls", importance=importance, outlier_mode="error")
    by_magnitude = quantize(weight, config, "wls", importance=importance, outlier_mode="magnitude")
    assert by_error.weighted_error < by_magnitude.weighted_error


def test_fisher_conversion_records_calibration(tmp_path):
    out = tmp_path / "f.mxq"
    report = convert(fixtures.ensure("tiny-qwen2"), out, bpw=4.0, objective="fisher", quantizer="wls",
                     configs="all", calib_tokens=1024, cache_dir=str(tmp_path / "cache"))
    assert report.achieved_bpw <= 4.0 and "calibrate" in report.seconds
    with MxqFile.open(out) as f:
        assert f.provenance["calibration"]["tokens"] == 1024
        assert f.quantization["objective"] == "fisher"
