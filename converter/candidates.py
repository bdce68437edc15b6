"""Candidate storage configs the allocator chooses from, e.g. `b4g32`, `b3g64+o0.5%`, `l4`, `fp16`.

A candidate is a format_spec StorageConfig named by its label (one grammar: format_spec.LABEL_GRAMMAR);
its outliers are a percent of the matrix's weights, which `candidate.storage(shape)` turns into the
exact count of one matrix, whose bytes the cost model knows.
"""
from __future__ import annotations

from dataclasses import replace

from ..format_spec import CODEBOOK_ROWS, GROUP_SIZES, LABEL_GRAMMAR, SUPPORTED_BITS, StorageConfig
from .errors import ConversionError

Candidate = StorageConfig  # a config whose outliers are a percent (resolved per matrix by storage(shape))
MAX_OUTLIER_PERCENT = 10.0

# 6-bit metadata as a choice beside 8-bit where it saves ≥ 1/16 bpw (g ≤ 64) and its zero's rounding costs
# ≤ ~26% of the codes' own error (b ≤ 5); b ≤ 3 store 6 bits by default (format_spec.default_meta_bits)
META6_CHOICES = [f"b{b}g{g}m6" for b in (4, 5) for g in (32, 64)]

PRESETS = {
    # the MXQ paper's configuration space: b ∈ {2,3,4,8} × g ∈ {32,64,128}, 8-bit metadata as in the paper
    "paper": [f"b{b}g{g}m8" if b <= 3 else f"b{b}g{g}" for b in (2, 3, 4, 8) for g in (32, 64, 128)],
    # every bit width the format stores, affine, and 6-bit metadata where it can pay
    "all": [f"b{b}g{g}" for b in SUPPORTED_BITS for g in GROUP_SIZES] + META6_CHOICES,
    # non-uniform codebooks (CMPQ): 2–5 bits, one codebook per output channel or per 4 / 16 channels
    "lut": [f"l{b}{suffix}" for b in (2, 3, 4, 5) for suffix in ("", "c4", "c16")],
    # vector quantization (SPEC.md §12): 2 bits in 4-D (256 points), 3 bits in 2-D (64 points), a scale per g
    "vq": [f"v{b}d{d}g{g}" for b, d in ((2, 4), (3, 2)) for g in GROUP_SIZES],
    # vq with codebooks shared by the file (SPEC.md §12.4): 2 bits in 4-D (256 points), 3 bits in 4-D (4096)
    "vqs": [f"v{b}d4g{g}s" for b in (2, 3) for g in GROUP_SIZES],
    # trellis-coded quantization (SPEC.md §13): K = 2–5 bits per weight through a 12-bit window, a scale per 64
    "trellis": [f"t{k}g64" for k in (2, 3, 4, 5)],
}
PRESETS["all+lut"] = PRESETS["all"] + PRESETS["lut"]
PRESETS["all+vq"] = PRESETS["all"] + PRESETS["vq"]
PRESETS["all+vqs"] = PRESETS["all"] + PRESETS["vqs"]
PRESETS["all+vq+vqs"] = PRESETS["all+vq"] + PRESETS["vqs"]  # the smallest files measured (2.5 bpw: README)
PRESETS["all+trellis"] = PRESETS["all"] + PRESETS["trellis"]


def parse_candidates(text: str) -> list[Candidate]:
    """Comma-separated labels and presets, e.g. 'paper,b5g32,b4g64+o0.5%,l3c4,fp16'. Candidates' outliers
    are percents (0–10%): a count (`+o12`) names one matrix's config, not a candidate."""
    labels = []
    for part in (p.strip() for p in text.split(",")):
        labels += PRESETS.get(part, [part]) if part else []
    candidates = []
    for label in labels:
        try:
            candidate = StorageConfig.parse(label)
        except ValueError as error:
            raise ConversionError(f"--configs: {label!r}: {error}; presets: {', '.join(PRESETS)}") from None
        if candidate.outliers:
            raise ConversionError(f"--configs: {label!r}: a candidate's outliers are a percent (e.g. +o0.5%)")
        if candidate.outlier_percent > MAX_OUTLIER_PERCENT:
            raise ConversionError(f"--configs: {label!r}: outliers above {MAX_OUTLIER_PERCENT:g}%")
        if candidate not in candidates:
            candidates.append(candidate)
    if not candidates:
        raise ConversionError("--configs: no candidate configs given")
    return candidates


def with_outliers(candidate: Candidate, percent: float) -> Candidate:
    """`candidate` keeping `percent` of each matrix's weights as outliers (fp16 stays fp16; trellis, which stores
    no outliers, stays as it is)."""
    if candidate.scheme in ("fp16", "trellis") or not percent:
        return candidate
    return replace(candidate, outliers=0, outlier_percent=percent)
