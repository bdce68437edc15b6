"""Hostile tokenizers and prompts: a tokenizer.json that makes the `tokenizers` library fail or panic in Rust
(pyo3's PanicException derives from BaseException and escaped every handler), padding/truncation settings that
panic or abort the process, and prompts that are not valid UTF-8. Each is one line naming the problem: a
ModelError in the runtime, a ConversionError in the converter, an `mxq: error:` line from the CLI (HTTP 400s:
test_serve.py). The tokenizers are tiny WordLevel ones built here."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mxq.converter.calibrate import text_ids
from mxq.converter.checkpoint import _library_tokenizer
from mxq.converter.errors import ConversionError
from mxq.runtime.errors import ModelError
from mxq.runtime.tokenizer import Tokenizer

BACKTRACKING = "(a|a)+$"  # Onig gives up after its retry limit on "aaa…a!" and tokenizers panics
LONG_A = "a" * 30 + "!"


def tokenizer_json(**edits) -> bytes:
    """A WordLevel tokenizer.json (whitespace-split words) with top-level fields replaced by `edits`."""
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "hello": 2, LONG_A: 3},
                      "unk_token": "[UNK]"}}
    return json.dumps({**data, **edits}).encode()


def runtime_tokenizer(data: bytes) -> Tokenizer:
    return Tokenizer({"kind": "hf-tokenizers"}, data)


PANIC_ON_LOAD = tokenizer_json(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAECAwQFBgcICQ=="})
PANIC_ON_ENCODE = tokenizer_json(pre_tokenizer={"type": "Split", "pattern": {"Regex": BACKTRACKING},
                                                "behavior": "Isolated", "invert": False})
PANIC_ON_DECODE = tokenizer_json(decoder={"type": "Replace", "pattern": {"Regex": BACKTRACKING}, "content": "x"})
NO_UNK = tokenizer_json(model={"type": "WordLevel", "vocab": {"a": 0, "hello": 1}, "unk_token": "[UNK]"})
BAD_TRUNCATION = tokenizer_json(truncation={"max_length": 1, "stride": 5, "strategy": "LongestFirst",
                                            "direction": "Right"})
PADDING = {"direction": "Right", "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0, "pad_token": "[UNK]"}


def test_a_panic_while_loading_is_a_model_error():
    with pytest.raises(ModelError, match=r"^the embedded tokenizer.json: does not load: Precompiled"):
        runtime_tokenizer(PANIC_ON_LOAD)


@pytest.mark.parametrize("data, words", [(PANIC_ON_ENCODE, "retry-limit-in-match"),
                                         (NO_UNK, "Missing [UNK] token")], ids=["regex-panic", "no-unk"])
def test_a_failing_encode_is_a_model_error(data, words):
    with pytest.raises(ModelError, match="^the embedded tokenizer.json: fails to encode the text: ") as error:
        runtime_tokenizer(data).encode(f"hello {LONG_A} zzz")
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_panic_while_decoding_is_a_model_error():
    tokenizer = runtime_tokenizer(PANIC_ON_DECODE)
    assert tokenizer.decode([2]) == "hello"
    with pytest.raises(ModelError, match="fails to decode tokens: .*retry-limit-in-match"):
        tokenizer.decode([3])


def test_padding_and_truncation_are_switched_off():
    """mxq wants every token of the one text it encodes: a file's truncation (here: a stride the library panics
    on) and padding (a Fixed length of 2^40 aborts the process on the allocation) are dropped at load."""
    assert runtime_tokenizer(BAD_TRUNCATION).encode("hello a hello") == [2, 1, 2]
    padded = runtime_tokenizer(tokenizer_json(padding={**PADDING, "strategy": {"Fixed": 8}}))
    assert padded.encode("hello a") == [2, 1]
    huge = tokenizer_json(padding={**PADDING, "strategy": {"Fixed": 1 << 40}}, truncation=json.loads(
        BAD_TRUNCATION)["truncation"])
    for library in (runtime_tokenizer(huge)._impl.tok, _library_tokenizer("hf-tokenizers", huge, Path("t.json"))):
        assert library.padding is None and library.truncation is None  # encoding it would abort without the fix


@pytest.mark.parametrize("text, words", [("hi \udcff", "byte 0xff at character 3"),
                                         ("\ud800 x", "lone surrogate U+D800 at character 0")])
def test_text_that_is_not_utf8_is_a_model_error(text, words):
    with pytest.raises(ModelError, match=re.escape(f"the prompt is not valid UTF-8: {words}")):
        runtime_tokenizer(tokenizer_json()).encode(text)


# -- the converter: a checkpoint's tokenizer.json ----------------------------------------------------------------
def test_converter_load_panic_names_the_file():
    with pytest.raises(ConversionError, match=r"^ck/tokenizer.json: does not load: Precompiled"):
        _library_tokenizer("hf-tokenizers", PANIC_ON_LOAD, Path("ck/tokenizer.json"))


@pytest.mark.parametrize("data, words", [(PANIC_ON_ENCODE, "retry-limit-in-match"),
                                         (NO_UNK, "Missing [UNK] token")], ids=["regex-panic", "no-unk"])
def test_calibration_text_that_fails_to_encode_names_the_file(data, words):
    checkpoint = SimpleNamespace(path=Path("ck"), tokenizer={"kind": "hf-tokenizers"}, tokenizer_data=data)
    with pytest.raises(ConversionError, match=r"^ck/tokenizer.json: fails to encode the calibration text: ") as error:
        text_ids(checkpoint, f"hello {LONG_A} zzz")
    assert words in str(error.value)


def test_calibration_ignores_the_files_truncation():
    checkpoint = SimpleNamespace(path=Path("ck"), tokenizer={"kind": "hf-tokenizers"}, tokenizer_data=BAD_TRUNCATION)
    assert text_ids(checkpoint, "hello a hello") == [2, 1, 2]


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_cli_prompt_with_bytes_that_are_not_utf8_is_one_error_line(tmp_path):
    fixtures = pytest.importorskip("fixtures")
    from test_runtime_files import write_test_mxq

    path = write_test_mxq(fixtures.ensure("tiny-qwen2"), tmp_path / "m.mxq")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "MXQ_KERNELS": "numpy"}
    result = subprocess.run([sys.executable, "-m", "mxq.cli", "generate", str(path), b"hi \xff", "-n", "1"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "mxq: error: the prompt is not valid UTF-8: byte 0xff at character 3", result.stderr
