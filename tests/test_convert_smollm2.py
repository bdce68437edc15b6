"""The real default model: SmolLM2-135M converted at the issue's budgets (slow: ~3 minutes)."""
import pytest

import fixtures
from mxq.converter import ConversionError, convert
from mxq.converter.candidates import PRESETS
from mxq.format_spec import MxqFile
from mxq.format_spec.summary import summarize

pytestmark = pytest.mark.slow
BUDGETS = [2.5, 3.0, 3.25, 3.5, 4.25, 5.0, 8.5]


@pytest.fixture(scope="module")
def smollm2():
    return fixtures.ensure("smollm2")


@pytest.fixture(scope="module")
def error_cache(smollm2_cache):
    return smollm2_cache  # shared with test_budget's --fit conversions (conftest)


@pytest.mark.parametrize("bpw", BUDGETS)
def test_budgets_on_the_real_model(smollm2, error_cache, tmp_path, bpw):
    """Every budget with wls rounding and `all` (the rounding never changes the bytes), and 3.0 bpw with the
    defaults, both `auto`: shared-codebook candidates (`all+vqs`), rounded with gptq (~5 min more: the codebooks'
    fit, their candidates' measurement and GPTVQ's layer-sequential passes over the text)."""
    out = tmp_path / "smol.mxq"
    convert(smollm2, out, bpw=bpw, cache_dir=error_cache, **({} if bpw == 3.0 else dict(quantizer="wls", configs="all")))
    with MxqFile.open(out) as f:
        totals = summarize(f)["totals"]
        assert f.model["num_hidden_layers"] == 30 and len([e for e in f.tensors.values() if e.role == "linear"]) == 210
        assert f.quantization["quantizer"] == ("gptq" if bpw == 3.0 else "wls")
        assert f.quantization["configs"] == PRESETS["all+vqs" if bpw == 3.0 else "all"]
        assert sorted(f.codebooks) == (["codebook.v2d4", "codebook.v3d4"] if bpw == 3.0 else [])
    assert bpw - 0.05 <= totals["bpw_linear"] <= bpw


def test_infeasible_budget_names_the_range(smollm2, error_cache, tmp_path):
    with pytest.raises(ConversionError, match=r"feasible range is 2\.\d+ to 8\.\d+ bpw"):
        convert(smollm2, tmp_path / "x.mxq", bpw=2.0, cache_dir=error_cache)
    assert not (tmp_path / "x.mxq").exists()
