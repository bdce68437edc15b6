"""Calibration: the converter's torch forward equals transformers; Fisher and input statistics are sane;
importance-weighted rounding does what it claims."""
import pytest
import torch

import fixtures
from mxq.converter import convert
from mxq.converter.calibrate import calibrate, chunk_loss, default_text, encode, load_or_calibrate
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.quantize import quantize
from mxq.format_spec import MxqFile, StorageConfig


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-llama3"])
def test_calibration_forward_matches_transformers(name):
    from transformers import AutoModelForCausalLM
    path = fixtures.ensure(name)
    checkpoint = read_checkpoint(path)
    ids = torch.tensor(encode(checkpoint, default_text())[:150])
    params = {n: checkpoint.load(n) for n in checkpoint.tensors}
    ours = float(chunk_loss(params, checkpoint.model, ids))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        reference = float(model(ids[None], labels=ids[None]).loss) * (len(ids) - 1)
    assert ours == pytest.approx(reference, rel=1e-5)


def test_fisher_and_input_moments(tmp_path):
    checkpoint = read_checkpoint(fixtures.ensure("tiny-llama"))
    result = calibrate(checkpoint, tokens=1024)
    assert result.tokens == 1024
    for info in checkpoint.linears:
        fisher, moments = result.fisher[info.name], result.input_sq[info.name]
        assert fisher.shape == info.shape and (fisher >= 0).all() and fisher.sum() > 0
        assert moments.shape == (info.shape[1],) and (moments > 0).all()
    cached = load_or_calibrate(checkpoint, "h", None, 1024, tmp_path)
    again = load_or_calibrate(checkpoint, "h", None, 1024, tmp_path)  # from the .npy cache
    name = checkpoint.linears[0].name
    assert torch.equal(cached.fisher[name], again.fisher[name]) and cached.loss == again.loss


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
