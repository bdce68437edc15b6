"""--quantizer gptq: error-compensating rounding onto exactly the stored grid, layer-sequential conversion."""
import numpy as np
import pytest
import torch

import fixtures
from mxq.converter import convert
from mxq.converter.calibrate import default_text, encode
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.gptq import compensated_blobs, gptq_round
from mxq.converter.quantize import quantize
from mxq.format_spec import MxqFile, StorageConfig, dequantize
from mxq.format_spec.affine import check_blobs, stored_blobs

# few candidates and a data-free allocation keep these quick; gptq still calibrates its Hessians
FAST = dict(calib_tokens=1024, cache_dir=None, configs="b2g64,b3g64,b4g64", objective="frobenius")


def correlated(n_in=96, n_out=40, tokens=512, seed=0):
    """A weight matrix and the Hessian XᵀX of strongly correlated inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) * torch.linspace(0.05, 2.0, n_in)[None, :]
    x = torch.randn(tokens, n_in, generator=g) @ mixing  # (tokens, in)
    return torch.randn(n_out, n_in, generator=g), x.T @ x


def output_error(weight, stored, hessian):
    delta = (weight - stored).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", delta, hessian.to(torch.float64), delta))


@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_plain_rounding(act_order):
    """With uncorrelated inputs there is nothing to compensate: the codes are wls's, bit for bit."""
    weight, _ = correlated()
    hessian = torch.diag(torch.linspace(0.5, 3.0, weight.shape[1]))
    config = StorageConfig.affine(3, 32)
    blobs, _ = compensated_blobs(weight, hessian, config, act_order=act_order)
    plain = quantize(weight, config, "wls").blobs
    assert set(blobs) == set(plain)
    for name in plain:
        assert np.array_equal(blobs[name], plain[name]), name


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32)])
def test_compensation_lowers_the_output_error_of_what_is_stored(bits, group_size):
    weight, hessian = correlated(n_in=100)  # 100 columns: the last group is padded
    config = StorageConfig.affine(bits, group_size)
    blobs, stored = compensated_blobs(weight, hessian, config)
    check_blobs(stored_blobs(blobs, weight.shape, config), weight.shape, config)
    assert torch.equal(stored, torch.from_numpy(dequantize(blobs, weight.shape, config)))
    plain = quantize(weight, config, "wls").blobs
    for name in ("scale_codes", "scale_meta", "zero_codes", "zero_meta"):  # the same stored grid
        assert np.array_equal(blobs[name], plain[name]), name
    plain_stored = torch.from_numpy(dequantize(plain, weight.shape, config))
    assert output_error(weight, stored, hessian) < 0.7 * output_error(weight, plain_stored, hessian)


def test_outliers_store_the_updated_weights_residual():
    weight, hessian = correlated()
    weight[3, 5] = 40.0  # a clear outlier
    config = StorageConfig.affine(3, 32, outliers=20)
    blobs, stored = compensated_blobs(weight, hessian, config)
    check_blobs(stored_blobs(blobs, weight.shape, config), weight.shape, config)
    assert torch.equal(stored, torch.from_numpy(dequantize(blobs, weight.shape, config)))
    # kept: the fp16 residual of its compensated value (the grid alone reaches about ±3 here)
    assert abs(float(stored[3, 5]) - 40.0) < 0.5
    plain = torch.from_numpy(dequantize(quantize(weight, config, "wls").blobs, weight.shape, config))
    assert output_error(weight, stored, hessian) < output_error(weight, plain, hessian)


def test_gptq_round_follows_the_grid_it_is_given():
    weight, hessian = correlated(n_in=64, n_out=8)
    scale, zero = torch.full((8, 2), 0.5), torch.full((8, 2), 1.5)
    scale[0, 1] = 0.0  # a group whose scale is 0 stores zeros (as kernels.round_groups)
    codes, stored, residual = gptq_round(weight, hessian, scale, zero, 32, 2)
    assert codes.max() <= 3 and not residual.any()
    group = torch.arange(64) // 32
    assert torch.equal(stored, (codes.to(torch.float32) - zero[:, group]) * scale[:, group])
    assert not stored[0, 32:].any()


@pytest.fixture(scope="module")
def tiny_llama():
    return fixtures.ensure("tiny-llama")


def logits_error(path, reference, ids):
    import mxq

    with mxq.load(path) as model:
        return float(((model.logits(ids) - reference) ** 2).mean())


def test_gptq_conversion_keeps_the_plan_and_is_closer_to_the_model(tiny_llama, tmp_path):
    """Same budget, same plan, same bytes as wls; the logits on text it was not calibrated on are
    closer to the fp16 model's (the tiny fixture is random-weight: the gain is small there)."""
    results = {}
    for quantizer in ("fp16", "wls", "gptq"):
        options = {**FAST, **(dict(bpw=16, configs="fp16") if quantizer == "fp16" else dict(bpw=3.0, quantizer=quantizer))}
        report = convert(tiny_llama, tmp_path / f"{quantizer}.mxq", **options)
        results[quantizer] = report
    assert results["gptq"].file_bytes == results["wls"].file_bytes
    assert results["gptq"].config_counts == results["wls"].config_counts
    with MxqFile.open(tmp_path / "gptq.mxq") as file:
        assert file.quantization["quantizer"] == "gptq"
    import mxq

    held_out = encode(read_checkpoint(tiny_llama), default_text())[4096:4096 + 200]  # after the 1024 calibrated
    with mxq.load(tmp_path / "fp16.mxq") as model:
        reference = model.logits(held_out)
    wls, gptq = (logits_error(tmp_path / f"{q}.mxq", reference, held_out) for q in ("wls", "gptq"))
    assert gptq < 0.97 * wls


def test_gptq_conversion_is_deterministic(tiny_llama, tmp_path):
    for name in ("a", "b"):
        convert(tiny_llama, tmp_path / f"{name}.mxq", **{**FAST, "configs": "b2g64,b3g64", "calib_tokens": 512},
                bpw=4.0, quantizer="gptq", outliers=0.5)
    assert (tmp_path / "a.mxq").read_bytes() == (tmp_path / "b.mxq").read_bytes()


def test_compensation_gains_scale_the_proxy_errors_down(tiny_llama):
    """The per-matrix factor the MILP's wls-measured errors are scaled by: GPTQ's output error over
    wls's on the same stored grid, measured on held-out chunks. The tiny model's weights are random and
    its inputs nearly uncorrelated, so compensation fitted to 256 tokens gains little or loses on other
    tokens (in-sample every gain was below 0.95); it differs between matrices."""
    from mxq.converter.candidates import parse_candidates
    from mxq.converter.gptq import compensation_gains

    checkpoint = read_checkpoint(tiny_llama)
    names = [t.name for t in checkpoint.linears]
    gains = compensation_gains(checkpoint, names, parse_candidates("b3g64")[0], lambda name: None, "magnitude",
                               None, 512)
    assert gains.shape == (len(names),) and (gains > 0).all() and gains.min() < 1.0 < gains.max()
    assert gains.max() > 1.5 * gains.min()


def test_held_out_gain_does_not_flatter_compensation_fitted_to_few_tokens():
    """With fewer tokens than inputs GPTQ pushes its error into directions the sample Hessian has not
    seen: measured on that same sample the gain looks large, on other tokens of the same distribution it
    is much smaller. The MILP's gains are the held-out kind."""
    from mxq.converter.gptq import held_out_gain

    weight, _ = correlated()
    g = torch.Generator().manual_seed(1)
    mixing = torch.randn(96, 96, generator=g) * torch.linspace(0.05, 2.0, 96)[None, :]
    fit_x, held_x = (torch.randn(64, 96, generator=g) @ mixing for _ in range(2))  # 64 tokens < 96 inputs
    fit, held = fit_x.T @ fit_x, held_x.T @ held_x
    config = StorageConfig.affine(3, 32)
    in_sample, held_out = held_out_gain(weight, fit, fit, config), held_out_gain(weight, fit, held, config)
    assert in_sample < 0.5 * held_out
    assert held_out_gain(weight, held, held, config) < 1.0


def test_gptq_with_lut_configs_fails_before_any_measurement(tiny_llama, tmp_path):
    """gptq compensates affine rounding only: asking it to round lut configs is a one-line error at once,
    not after calibration and measurement."""
    from mxq.converter import ConversionError
    with pytest.raises(ConversionError, match=r"--quantizer gptq rounds the affine scheme only.*'all\+lut'"):
        convert(tiny_llama, tmp_path / "x.mxq", bpw=3.0, quantizer="gptq", configs="all+lut", cache_dir=None)
    assert not (tmp_path / "x.mxq").exists()
