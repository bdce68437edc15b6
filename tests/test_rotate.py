"""--rotate: the rotated model computes the same function (parity with transformers' fp32 logits as
close as the unrotated fp16 file's), tied embeddings become untied, refused families fail in one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter.rotate import rotation_matrix
from mxq.format_spec import MxqFile

ROTATABLE = ["tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-phi3"]
IDS = list(range(5, 70))


@pytest.mark.parametrize("n", [64, 48])
def test_rotation_is_orthogonal_and_seeded(n):
    q, kind = rotation_matrix(n, 7)
    assert kind == ("hadamard" if n == 64 else "orthogonal")
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(n, 7)[0])
    assert not torch.allclose(q, rotation_matrix(n, 8)[0])


def fp16_logits(hf_dir, path, rotate):
    import mxq

    convert(hf_dir, path, bpw=16, configs="fp16", objective="frobenius", cache_dir=None, rotate=rotate, rotate_seed=3)
    with mxq.load(path) as model:
        return model.logits(IDS)


@pytest.mark.parametrize("name", ROTATABLE)
def test_rotated_fp16_file_computes_the_same_logits(name, tmp_path):
    import transformers

    hf_dir = fixtures.ensure(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = hf(torch.tensor([IDS])).logits[0].numpy()
    plain = np.abs(fp16_logits(hf_dir, tmp_path / "plain.mxq", False) - reference).max()
    rotated = np.abs(fp16_logits(hf_dir, tmp_path / "rotated.mxq", True) - reference).max()
    assert rotated <= 2 * plain + 1e-3, (rotated, plain)  # fp16 rounding of differently rotated weights
    with MxqFile.open(tmp_path / "rotated.mxq") as file:
        rotation = file.provenance["rotation"]
        assert rotation["seed"] == 3 and rotation["kind"] in ("hadamard", "orthogonal")
        assert file.model["tie_word_embeddings"] is False and "lm_head.weight" in file.tensors
        assert rotation["untied"] == hf.config.tie_word_embeddings


def test_rotation_changes_the_linears_and_costs_an_lm_head_when_tied(tmp_path):
    hf_dir = fixtures.ensure("tiny-qwen2")  # tied embeddings
    sizes = {}
    for rotate in (False, True):
        report = convert(hf_dir, tmp_path / f"{rotate}.mxq", bpw=4.5, configs="b4g64", objective="frobenius",
                         cache_dir=None, rotate=rotate)
        sizes[rotate] = report.file_bytes
    with MxqFile.open(tmp_path / "True.mxq") as file:
        vocab, hidden = file.tensors["lm_head.weight"].shape
    assert sizes[True] - sizes[False] >= 2 * vocab * hidden  # the untied fp16 lm_head


def test_size_budget_counts_the_untied_head(tmp_path):
    hf_dir = fixtures.ensure("tiny-qwen2")
    size = convert(hf_dir, tmp_path / "a.mxq", bpw=4.0, configs="b3g64,b4g64", objective="frobenius",
                   cache_dir=None, rotate=True).file_bytes
    report = convert(hf_dir, tmp_path / "b.mxq", size=size, configs="b3g64,b4g64", objective="frobenius",
                     cache_dir=None, rotate=True)
    assert report.file_bytes <= size == (tmp_path / "a.mxq").stat().st_size


def test_gemma3_is_refused_in_one_line(tmp_path):
    hf_dir = fixtures.ensure("tiny-gemma3")
    with pytest.raises(ConversionError, match="post_attention_layernorm.*does not commute"):
        convert(hf_dir, tmp_path / "g.mxq", bpw=16, configs="fp16", cache_dir=None, rotate=True)
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "convert", str(hf_dir), "-o", str(tmp_path / "g.mxq"),
                             "--bpw", "16", "--configs", "fp16", "--rotate", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--rotate" in result.stderr
    assert not (tmp_path / "g.mxq").exists()
