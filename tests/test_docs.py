"""README and --help are held to the code: the converter's defaults and choices stated in README's
"How configs are chosen" table are the click options' and ConvertOptions' own."""
from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import REPO
from mxq.converter.candidates import PRESETS
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


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_in_readme_and_help(preset):
    """README's --configs row names every preset; --help says what each single preset holds (a
    combination such as all+vq is its parts)."""
    assert preset in readme_options()["--configs"][1], f"README's --configs row does not name {preset}"
    help_text = " ".join(click_option("--configs").help.split())
    assert "+" in preset or f"'{preset}':" in help_text, f"--help does not say what preset {preset} holds"


def quality_chunks() -> list[str]:
    """README's "Quality" section (up to the next ### heading) cut into table rows and paragraphs."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Quality")
    section = text[start:text.index("\n### ", start + 1)]
    chunks = []
    for paragraph in section.split("\n\n"):
        lines = paragraph.splitlines()
        rows = [line for line in lines if line.startswith("|")]
        chunks += rows + ["\n".join(line for line in lines if not line.startswith("|"))]
    return chunks


def number_in(value: str, text: str) -> bool:
    """value (as written, e.g. '21.8') occurs in text as a whole number (not inside 121.85)."""
    return re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])", text) is not None


def test_quality_plot_points_are_readme_measurements():
    """Every point of docs/quality.csv (which draws docs/quality.png) is stated by README's Quality section:
    a target as "≤ PPL at BPW", any other point by one table row or paragraph holding its bpw (both ends of
    a range) and its perplexity as written."""
    from quality_plot import read_points, read_rows

    path = REPO / "docs" / "quality.csv"
    rows = read_rows(path)  # the values as written
    assert len(rows) == len(read_points(path)) > 20
    assert {row["kind"] for row in rows} == {"mxq", "peer", "target", "reference"}
    chunks = quality_chunks()
    for row in rows:
        if row["kind"] == "target":
            assert any(f"≤ {row['perplexity']} at {row['bpw']}" in chunk for chunk in chunks), row
            continue
        values = [row["bpw"], row["perplexity"]] + ([row["bpw_high"]] if row["bpw_high"] else [])
        assert any(all(number_in(v, chunk) for v in values) for chunk in chunks), \
            f"README's Quality section has no row or paragraph with {row['series']} {values}"
    assert (REPO / "docs" / "quality.png").stat().st_size > 10_000


def test_quality_plot_draws_and_rejects_bad_rows(tmp_path):
    pytest.importorskip("matplotlib")
    import quality_plot

    out = tmp_path / "q.png"
    assert quality_plot.main(["-o", str(out)]) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.csv"
    bad.write_text("series,kind,bpw,bpw_high,perplexity,note\nx,mxq,3.0,,not-a-number,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv: data row 1: .*not-a-number"):
        quality_plot.read_points(bad)
    bad.write_text("series,kind,bpw,bpw_high,perplexity,note\nx,mine,3.0,,20,\n", encoding="utf-8")
    assert quality_plot.main(["--csv", str(bad), "-o", str(out)]) == 1


def test_the_configs_row_states_autos_rule():
    """README's --configs row says what `auto` takes and where it switches (converter/options.py)."""
    from mxq.converter.options import AUTO, AUTO_CONFIGS, AUTO_VQ_BELOW

    assert readme_options()["--configs"][0] == AUTO
    row = next(line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `--configs` |"))
    assert (f"`{AUTO}` (`{AUTO_CONFIGS[0]}` at or above {AUTO_VQ_BELOW:g} bits per decoder-linear weight, "
            f"`{AUTO_CONFIGS[1]}` below;") in row
