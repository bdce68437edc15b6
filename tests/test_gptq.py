"""--quantizer gptq: error-compensating rounding onto exactly the stored grid, layer-sequential conversion."""
import numpy as np
import pytest
import torch

import fixtures
from mxq.converter import convert
from mxq.converter.calibrate import default_text, encode
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.gptq import (_Hessians, asymmetric_target, compensated_blobs, gptq_round, quantized_tensors,
                                ridge_factor)
from mxq.converter.options import AUTO_GPTQ_BELOW, ConvertOptions, write_quantizer
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
    blobs, stored = compensated_blobs(weight, hessian, config, damp=0.01)  # GPTQ paper's dampening
    check_blobs(stored_blobs(blobs, weight.shape, config), weight.shape, config)
    assert torch.equal(stored, torch.from_numpy(dequantize(blobs, weight.shape, config)))
    plain = quantize(weight, config, "wls").blobs
    for name in ("scale_codes", "scale_meta", "zero_codes", "zero_meta"):  # the same stored grid
        assert np.array_equal(blobs[name], plain[name]), name
    plain_stored = torch.from_numpy(dequantize(plain, weight.shape, config))
    plain_error = output_error(weight, plain_stored, hessian)
    assert output_error(weight, stored, hessian) < 0.7 * plain_error
    # the default's strong dampening (gptq.DAMP) gives up part of the in-sample gain, not all of it
    _, damped = compensated_blobs(weight, hessian, config)
    assert output_error(weight, stored, hessian) < output_error(weight, damped, hessian) < 0.95 * plain_error


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


@pytest.mark.parametrize("damp", [1.0, 1e-4])  # float32, and float64 where the condition bound is too large
@pytest.mark.parametrize("act_order", [False, True])
def test_inverse_factor_is_the_cholesky_factor_of_the_dampened_inverse(damp, act_order):
    from mxq.converter.gptq import _inverse_factor

    _, hessian = correlated(n_in=60)
    hessian[7, :] = hessian[:, 7] = 0.0  # a dead input
    diag = torch.diag(hessian).to(torch.float64)
    diag[7] = 1.0
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(60)
    u = _inverse_factor(hessian, diag, order.numpy(), damp)
    h = hessian.to(torch.float64).clone()
    h.diagonal().copy_(diag + damp * float(diag.mean()))
    h = h[order][:, order]
    wanted = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    assert torch.equal(torch.triu(u), u)
    tolerance = 2e-3 if damp == 1.0 else 1e-6  # float64's result is only rounded to float32 at the end
    torch.testing.assert_close(u.to(torch.float64), wanted, rtol=tolerance,
                               atol=tolerance * float(wanted.abs().max()))


def test_gptq_round_follows_the_grid_it_is_given():
    weight, hessian = correlated(n_in=64, n_out=8)
    scale, zero = torch.full((8, 2), 0.5), torch.full((8, 2), 1.5)
    scale[0, 1] = 0.0  # a group whose scale is 0 stores zeros (as kernels.round_groups)
    codes, stored, residual = gptq_round(weight, hessian, scale, zero, 32, 2)
    assert codes.max() <= 3 and not residual.any()
    group = torch.arange(64) // 32
    assert torch.equal(stored, (codes.to(torch.float32) - zero[:, group]) * scale[:, group])
    assert not stored[0, 32:].any()


def test_row_blocks_round_together_as_each_would_alone():
    """compensated_rows rounds every quantized block's rows (affine and lut) in one pass (one
    factorization, one column loop): each block's codes and outliers are what compensated_blobs gives
    for that block alone, fp16 blocks stay fp16, and `stored` is what the blobs decode to."""
    from mxq.converter.gptq import compensated_rows
    from mxq.converter.row_blocks import RowSplit, row_order

    weight, hessian = correlated(n_in=100, n_out=70)
    weight[5, 7] = 30.0  # an outlier for the block that keeps some
    importance = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) + 0.1
    config = StorageConfig.rows([(25, StorageConfig.affine(2, 32)), (15, StorageConfig.affine(4, 64, outliers=20)),
                                 (15, StorageConfig.lut(3, 1, outliers=10)), (15, StorageConfig.fp16())])
    blobs, stored = compensated_rows(weight, hessian, config, importance)
    assert torch.equal(stored, torch.from_numpy(dequantize(blobs, weight.shape, config)))
    split = RowSplit(row_order(weight, importance), config.row_counts)
    for b, (_, block_config) in enumerate(config.blocks):
        rows = torch.from_numpy(split.rows(b))
        if block_config.scheme == "fp16":
            assert torch.equal(stored[rows], weight[rows].to(torch.float16).to(torch.float32))
            continue
        alone, _ = compensated_blobs(weight[rows], hessian, block_config, importance[rows])
        for name, blob in alone.items():
            assert np.allclose(blobs[f"{b}.{name}"], blob, atol=1e-3), (b, name)
        assert np.array_equal(blobs[f"{b}.qweight"], alone["qweight"]), b


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


def test_hessians_share_one_input_and_sum_the_cross_term():
    """q and k read one tensor: one H, one cross; H = Σ x_qᵀx_q and cross = Σ x_qᵀ(x_fp − x_q) over chunks,
    each quantized input paired with the float input captured for the same linear before it."""
    hessians, generator = _Hessians(), torch.Generator().manual_seed(0)
    expected_h, expected_cross = torch.zeros(8, 8), torch.zeros(8, 8)
    for _ in range(2):
        x_fp = torch.randn(16, 8, generator=generator)
        x_q = x_fp + 0.1 * torch.randn(16, 8, generator=generator)
        o_fp, o_q = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
        hessians.capturing = True
        for name, x in (("q", x_fp), ("k", x_fp), ("o", o_fp)):
            hessians(name, x)
        hessians.capturing = False
        for name, x in (("q", x_q), ("k", x_q), ("o", o_q)):
            hessians(name, x)
        expected_h += x_q.T @ x_q
        expected_cross += x_q.T @ (x_fp - x_q)
    assert hessians.of["q"] is hessians.of["k"] and hessians.cross["q"] is hessians.cross["k"]
    torch.testing.assert_close(hessians.of["k"], expected_h)
    torch.testing.assert_close(hessians.cross["k"], expected_cross)
    assert not torch.allclose(hessians.cross["o"], hessians.cross["q"])


@pytest.mark.parametrize("damp", [1.0, 1e-4])  # float32; float64 (the bound (n + damp) / damp above 1e5)
def test_asymmetric_target_is_the_ridge_fit_of_the_float_output(damp):
    generator = torch.Generator().manual_seed(1)
    x_q = torch.randn(300, 24, generator=generator, dtype=torch.float64)
    x_fp = x_q + 0.2 * torch.randn(300, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(10, 24, generator=generator, dtype=torch.float64)
    hessian, cross = x_q.T @ x_q, x_q.T @ (x_fp - x_q)
    ridge = damp * float(hessian.diagonal().mean())
    a = torch.cat([x_q, ridge ** 0.5 * torch.eye(24, dtype=torch.float64)])  # min ‖a Dᵀ − b‖²
    b = torch.cat([(x_fp - x_q) @ weight.T, torch.zeros(24, 10, dtype=torch.float64)])
    d = torch.linalg.lstsq(a, b).solution.T  # (10, 24)
    factor = ridge_factor(hessian.float(), damp)
    assert factor.dtype == (np.float32 if damp == 1.0 else np.float64)
    for asymmetry in (1.0, 0.5):
        target = asymmetric_target(weight.float(), factor, cross.float(), asymmetry)
        torch.testing.assert_close(target, (weight + asymmetry * d).float(), rtol=1e-4, atol=1e-4)
    target = asymmetric_target(weight.float(), factor, cross.float(), 1.0).double()
    assert ((x_q @ target.T - x_fp @ weight.T) ** 2).sum() < ((x_q @ weight.T - x_fp @ weight.T) ** 2).sum()
    assert torch.equal(asymmetric_target(weight.float(), factor, torch.zeros(24, 24), 1.0), weight.float())
    dead = ridge_factor(torch.zeros(24, 24), damp)  # an input never seen: no shift to fit, and no failure
    assert torch.equal(asymmetric_target(weight.float(), dead, torch.zeros(24, 24), 1.0), weight.float())


def test_asymmetry_changes_only_the_layers_after_the_first(tiny_llama):
    """Layer 0 sees the embeddings in both streams (no shift to undo: its tensors are the symmetric
    ones); every later layer is rounded towards the float model's outputs (different codes)."""
    from mxq.format_spec import TensorPlan

    checkpoint = read_checkpoint(tiny_llama)
    plans = [TensorPlan(name, info.shape, StorageConfig.affine(3, 64) if info.role == "linear" else StorageConfig.fp16(),
                        info.role) for name, info in checkpoint.tensors.items()]
    tensors = {a: dict(quantized_tensors(checkpoint, plans, lambda name: None, "magnitude", None, 1024, asymmetry=a))
               for a in (0.0, 0.5)}
    linears = [plan.name for plan in plans if plan.role == "linear"]
    for name in linears:
        same = all(np.array_equal(tensors[0.0][name][k], tensors[0.5][name][k]) for k in tensors[0.0][name])
        assert same == name.startswith("model.layers.0."), name


def test_gptq_conversion_is_deterministic(tiny_llama, tmp_path):
    for name in ("a", "b"):
        convert(tiny_llama, tmp_path / f"{name}.mxq", **{**FAST, "configs": "b2g64,b3g64", "calib_tokens": 512},
                bpw=4.0, quantizer="gptq", outliers=0.5)
    assert (tmp_path / "a.mxq").read_bytes() == (tmp_path / "b.mxq").read_bytes()


@pytest.mark.parametrize("rows_per_codebook, outliers", [(1, 0), (4, 0), (1, 20)])
def test_lut_rounds_to_its_codebooks_with_compensation(rows_per_codebook, outliers):
    """A lut config keeps wls's codebooks; GPTQ picks the levels: with a diagonal Hessian they are the
    plain nearest levels bit for bit, with correlated inputs the output error falls."""
    weight, hessian = correlated(n_in=100)  # 100 columns: the last pack is padded
    config = StorageConfig.lut(3, rows_per_codebook, outliers=outliers)
    plain = quantize(weight, config, "wls").blobs
    diagonal, _ = compensated_blobs(weight, torch.diag(torch.linspace(0.5, 3.0, 100)), config)
    for name in plain:
        assert np.array_equal(diagonal[name], plain[name]), name
    blobs, stored = compensated_blobs(weight, hessian, config)
    check_blobs(stored_blobs(blobs, weight.shape, config), weight.shape, config)
    assert torch.equal(stored, torch.from_numpy(dequantize(blobs, weight.shape, config)))
    assert np.array_equal(blobs["codebook"], plain["codebook"])
    plain_stored = torch.from_numpy(dequantize(plain, weight.shape, config))
    assert output_error(weight, stored, hessian) < 0.9 * output_error(weight, plain_stored, hessian)


def test_gptq_converts_with_lut_candidates(tiny_llama, tmp_path):
    """--configs all+lut with gptq: lut matrices are compensated too; same plan and bytes as wls."""
    options = dict(bpw=3.0, configs="b2g64,l2,l3,b4g64", calib_tokens=512, cache_dir=None, objective="frobenius")
    gptq = convert(tiny_llama, tmp_path / "gptq.mxq", quantizer="gptq", **options)
    wls = convert(tiny_llama, tmp_path / "wls.mxq", quantizer="wls", **options)
    assert gptq.file_bytes == wls.file_bytes and gptq.config_counts == wls.config_counts
    assert any(label.startswith("l") for label in gptq.config_counts)
    (_, a), (_, b) = tensors_of(tmp_path / "gptq.mxq"), tensors_of(tmp_path / "wls.mxq")
    assert any(not np.array_equal(a[n]["qweight"], b[n]["qweight"]) for n in a if "codebook" in a[n])


@pytest.mark.parametrize("bpw, objective, chosen", [
    (AUTO_GPTQ_BELOW - 0.01, "fisher", "gptq"), (AUTO_GPTQ_BELOW - 0.01, "output", "gptq"),
    (AUTO_GPTQ_BELOW, "fisher", "wls"), (2.5, "frobenius", "wls")])
def test_auto_rounds_with_gptq_only_below_the_threshold(bpw, objective, chosen):
    """auto: gptq below AUTO_GPTQ_BELOW bits per decoder-linear weight, with calibration (a data-free
    objective stays data-free); explicit quantizers are kept as given."""
    assert write_quantizer(ConvertOptions(bpw=3.0, objective=objective), bpw) == chosen
    assert write_quantizer(ConvertOptions(bpw=3.0, quantizer="hqq"), 2.5) == "hqq"


def tensors_of(path):
    with MxqFile.open(path) as file:
        quantizer = file.quantization["quantizer"]
        blobs = {name: {k: np.array(v) for k, v in file.blobs(name).items()} for name in file.tensors}
    return quantizer, blobs


def test_auto_writes_the_file_of_the_quantizer_it_chose(tiny_llama, tmp_path):
    """The default (auto) file below the threshold holds exactly the explicit gptq file's tensors, above
    it the wls file's; the file records what it chose."""
    fast = {**FAST, "objective": "output", "configs": "b2g64,b3g64,b5g64", "calib_tokens": 512}
    for bpw, explicit, other in ((3.0, "gptq", "wls"), (4.5, "wls", "gptq")):
        report = convert(tiny_llama, tmp_path / "auto.mxq", bpw=bpw, **fast)
        assert any(note.startswith(f"--quantizer auto rounded with {explicit} (") for note in report.notes)
        convert(tiny_llama, tmp_path / "explicit.mxq", bpw=bpw, quantizer=explicit, **fast)
        convert(tiny_llama, tmp_path / "other.mxq", bpw=bpw, quantizer=other, **fast)
        (auto_quantizer, auto), (explicit_quantizer, wanted), (_, unwanted) = (
            tensors_of(tmp_path / f"{n}.mxq") for n in ("auto", "explicit", "other"))
        assert auto_quantizer == explicit_quantizer == explicit
        assert any(not np.array_equal(auto[name]["qweight"], unwanted[name]["qweight"])
                   for name in auto if "qweight" in auto[name])  # the two quantizers do write different files
        assert auto.keys() == wanted.keys()
        for name in auto:
            assert auto[name].keys() == wanted[name].keys(), name
            for blob in auto[name]:
                np.testing.assert_array_equal(auto[name][blob], wanted[name][blob], err_msg=f"{name}/{blob}")
