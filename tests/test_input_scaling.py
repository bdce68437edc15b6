"""--input-scaling: the scaled model computes the same function, its calibration statistics are the
original's transformed exactly (no second calibration), options are checked, the file records it."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter.calibrate import calibrate
from mxq.converter.checkpoint import read_checkpoint
from mxq.converter.input_scaling import channel_scales, scaled
from mxq.format_spec import MxqFile

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-phi3", "tiny-gemma3"]
IDS = list(range(5, 70))


def test_channel_scales_follow_the_moments_with_geometric_mean_one():
    moments = torch.tensor([1.0, 4.0, 16.0, 0.0])
    s = channel_scales(moments, 0.5)
    assert torch.isclose(torch.log(s).mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12)
    assert torch.isclose(s[1] / s[0], torch.tensor(2 ** 0.5, dtype=torch.float64))  # (4/1)^(0.5/2)
    assert torch.isfinite(s).all() and s[3] > 0  # a dead channel is floored, never divided by
    assert torch.equal(channel_scales(moments, 0.0), torch.ones(4, dtype=torch.float64))


def fp16_logits(hf_dir, path, alpha):
    import mxq

    # fp16 is chosen everywhere (16 bpw), but b8g32 is a candidate, so calibration (and the scaling) runs
    convert(hf_dir, path, bpw=16, configs="fp16,b8g32", cache_dir=None, calib_tokens=512, row_blocks=1,
            input_scaling=alpha)
    with mxq.load(path) as model:
        return model.logits(IDS)


@pytest.mark.parametrize("name", FAMILIES)
def test_scaled_fp16_file_computes_the_same_logits(name, tmp_path):
    hf_dir = fixtures.ensure(name)
    plain = fp16_logits(hf_dir, tmp_path / "plain.mxq", 0.0)
    for alpha in (0.25, 1.0):
        scaled_logits = fp16_logits(hf_dir, tmp_path / f"{alpha}.mxq", alpha)
        assert np.abs(scaled_logits - plain).max() <= 2e-2 * np.abs(plain).max(), alpha  # fp16 rounding only
        with MxqFile.open(tmp_path / f"{alpha}.mxq") as file:
            record = file.provenance["input_scaling"]
            assert record["alpha"] == alpha and record["tensors"] > 0
    with MxqFile.open(tmp_path / "plain.mxq") as file:
        assert "input_scaling" not in file.provenance


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gemma3"])
def test_statistics_equal_a_calibration_of_the_scaled_model(name, tmp_path):
    """Transformed statistics == calibrating the scaled weights themselves (fp32 rounding apart)."""
    checkpoint = read_checkpoint(fixtures.ensure(name))
    original = calibrate(checkpoint, tmp_path / "original", tokens=512, fisher_dtype=torch.float32)
    model, _, derived, _ = scaled(checkpoint, checkpoint.content_hash(), original, 0.5)
    direct = calibrate(model, tmp_path / "direct", tokens=512, fisher_dtype=torch.float32)
    assert abs(direct.loss - original.loss) < 1e-4  # the same function
    changed = 0
    for name_ in original.fisher:
        for kind in ("fisher", "input_sq"):
            ours, theirs = getattr(derived, kind)[name_], getattr(direct, kind)[name_]
            scale = float(theirs.abs().max())
            assert torch.allclose(ours, theirs, rtol=2e-3, atol=1e-5 * scale), (name_, kind)
            changed += not torch.allclose(ours, getattr(original, kind)[name_], rtol=1e-3)
    assert changed > len(original.fisher)  # the transform did something


def test_scaling_changes_the_quantized_file_not_its_bytes(tmp_path):
    hf_dir = fixtures.ensure("tiny-llama3")
    reports = [convert(hf_dir, tmp_path / f"{alpha}.mxq", bpw=4.25, cache_dir=None, calib_tokens=512,
                       input_scaling=alpha) for alpha in (0.0, 0.25)]
    assert reports[0].file_bytes <= reports[1].file_bytes + 4096  # one budget; only provenance grows
    assert (tmp_path / "0.0.mxq").read_bytes() != (tmp_path / "0.25.mxq").read_bytes()


def test_out_of_range_alpha_fails_in_one_line(tmp_path):
    hf_dir = fixtures.ensure("tiny-llama")
    with pytest.raises(ConversionError, match="--input-scaling 2 is outside"):
        convert(hf_dir, tmp_path / "a.mxq", bpw=4, input_scaling=2.0)
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "convert", str(hf_dir), "-o", str(tmp_path / "a.mxq"),
                             "--bpw", "4", "--input-scaling", "-1", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--input-scaling -1 is outside" in result.stderr.strip().splitlines()[-1]
