"""README and --help are held to the code: the converter's defaults and choices stated in README's
"How configs are chosen" table are the click options' and ConvertOptions' own."""
from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import REPO
from mxq.converter.commands import convert_command

ROW = re.compile(r"^\| `(--[a-z-]+)` \| `([^`]*)` \|(.*)\|$")


def readme_options() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### How configs are chosen"):]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            rows[match[1]] = (match[2], re.findall(r"`([^`]+)`", match[3]))
    return rows


def click_option(flag):
    return next(p for p in convert_command.params if flag in p.opts)


def test_readme_states_the_code_defaults():
    from mxq.converter.pipeline import ConvertOptions

    rows = readme_options()
    assert {"--configs", "--quantizer", "--objective", "--outlier-mode", "--calib-tokens"} <= set(rows)
    defaults = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}
    for flag, (default, choices) in rows.items():
        option = click_option(flag)
        assert str(option.default) == default, f"README says {flag} defaults to {default}, --help says {option.default}"
        assert str(defaults[option.name]) == default, f"README says {flag} defaults to {default}, the code {defaults[option.name]}"
        if hasattr(option.type, "choices"):
            assert list(option.type.choices) == choices, f"{flag}: README lists {choices}, --help {option.type.choices}"


@pytest.mark.parametrize("preset", ["paper", "all"])
def test_readme_presets_exist(preset):
    from mxq.converter.candidates import PRESETS

    assert preset in PRESETS
