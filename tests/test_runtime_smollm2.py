"""The real default model through the real converter and the runtime, against transformers running the
file's export-hf output (slow: a few minutes)."""
import math

import numpy as np
import pytest

import fixtures
import mxq
from mxq.converter import convert
from mxq.runtime.export_hf import export_hf
from mxq.runtime.perplexity import perplexity
from test_runtime import hf_greedy, mxq_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """fp16 file, and a quantized one (3/4/5-bit mix with outliers; rtn and the shortest calibration keep the
    conversion quick: what is checked here is the runtime against transformers on the same weights)."""
    root = tmp_path_factory.mktemp("smol")
    source = fixtures.ensure("smollm2")
    built = {}
    for kind, options in {"fp16": dict(bpw=16, configs="fp16"),
                          "quantized": dict(bpw=4.25, configs="b3g64,b4g32,b5g128", outliers=0.25,
                                            quantizer="rtn", calib_tokens=512)}.items():
        path = root / f"{kind}.mxq"
        convert(source, path, cache_dir=None, **options)
        export_hf(path, root / f"{kind}-hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(root / f"{kind}-hf", dtype=torch.float32)
        built[kind] = path, hf.eval()
    return built


@pytest.mark.parametrize("kind", ["fp16", "quantized"])
def test_logits_and_greedy_tokens_match_transformers(files, kind):
    path, hf = files[kind]
    with mxq.load(path) as lm:
        ids = lm.tokenizer.encode(fixtures.DATA_DIR.joinpath("botchan.txt").read_text()[5000:8000])[:128]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        logits = lm.logits(ids)
        assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max()
        prompt = lm.tokenizer.encode(PROMPT)
        assert mxq_greedy(lm, prompt, 64) == hf_greedy(hf, prompt, 64)
        if kind == "fp16":
            text = "".join(lm.generate(PROMPT, max_new_tokens=10))
            assert text.startswith(" Emma who loved to play in the sun.")


def test_eval_matches_transformers_on_wikitext(files):
    path, hf = files["fp16"]
    ctx, chunks = 2048, 2
    text = fixtures.DATA_DIR.joinpath("wikitext2-test.txt").read_text()
    with mxq.load(path) as lm:
        ids = lm.tokenizer.encode(text)
        report = perplexity(lm, ids, ctx=ctx, max_chunks=chunks, progress=False)
    total = 0.0
    with torch.no_grad():
        for i in range(chunks):
            chunk = torch.tensor([ids[i * ctx:(i + 1) * ctx]])
            total += float(hf(chunk, labels=chunk).loss) * (ctx - 1)
    reference = math.exp(total / (chunks * (ctx - 1)))
    assert abs(report["ppl"] / reference - 1) < 1e-3, (report["ppl"], reference)
