"""Candidate storage configs the allocator chooses from, e.g. `b4g32`, `b3g64+o0.5%`, `fp16`.

A candidate is matrix-independent; `storage(shape)` turns it into the exact StorageConfig (outlier
fractions become counts) whose bytes the cost model knows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..format_spec import GROUP_SIZES, SUPPORTED_BITS, StorageConfig, outlier_count
from .errors import ConversionError

PRESETS = {
    # the MXQ paper's configuration space: b ∈ {2,3,4,8} × g ∈ {32,64,128}
    "paper": [f"b{b}g{g}" for b in (2, 3, 4, 8) for g in (32, 64, 128)],
    # every bit width the format stores
    "all": [f"b{b}g{g}" for b in SUPPORTED_BITS for g in GROUP_SIZES],
}
_PATTERN = re.compile(r"^b(\d)g(\d+)(?:\+o(\d+(?:\.\d+)?)%)?$")


@dataclass(frozen=True)
class Candidate:
    scheme: str  # affine | fp16
    bits: int = 16
    group_size: int = 0
    outlier_percent: float = 0.0

    @property
    def label(self) -> str:
        if self.scheme == "fp16":
            return "fp16"
        suffix = f"+o{self.outlier_percent:g}%" if self.outlier_percent else ""
        return f"b{self.bits}g{self.group_size}{suffix}"

    def storage(self, shape) -> StorageConfig:
        if self.scheme == "fp16":
            return StorageConfig.fp16()
        return StorageConfig.affine(self.bits, self.group_size, outlier_count(shape, self.outlier_percent / 100))


def parse_candidates(text: str) -> list[Candidate]:
    """Comma-separated labels and presets ('paper', 'all'), e.g. 'paper,b5g32,b4g64+o0.5%,fp16'."""
    labels = []
    for part in (p.strip() for p in text.split(",")):
        labels += PRESETS.get(part, [part]) if part else []
    candidates = []
    for label in labels:
        if label == "fp16":
            candidate = Candidate("fp16")
        else:
            match = _PATTERN.match(label)
            if not match:
                raise ConversionError(f"--configs: cannot parse {label!r} (expected e.g. b4g32, b3g64+o0.5%, fp16, "
                                      f"or a preset: {', '.join(PRESETS)})")
            bits, group, percent = int(match[1]), int(match[2]), float(match[3] or 0)
            if bits not in SUPPORTED_BITS or group not in GROUP_SIZES or not 0 <= percent <= 10:
                raise ConversionError(f"--configs: {label!r} is not supported (bits {SUPPORTED_BITS}, "
                                      f"groups {GROUP_SIZES}, outliers 0–10%)")
            candidate = Candidate("affine", bits, group, percent)
        if candidate not in candidates:
            candidates.append(candidate)
    if not candidates:
        raise ConversionError("--configs: no candidate configs given")
    return candidates
