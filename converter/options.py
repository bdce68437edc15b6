"""The converter's options: every knob's default and choices live here, once. `mxq convert`'s click
options (converter/commands.py) and README's table (held by tests/test_docs.py) derive from them.
Torch-free, so the CLI can build its --help without importing the converter's heavy modules."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import ConversionError

# gptq: wls's scales, codes rounded with error compensation layer by layer (converter/gptq.py); the
# MILP's errors are measured with wls (MEASURED_WITH), the compensation happens at write time.
QUANTIZERS = ("hqq", "rtn", "wls", "gptq")
MEASURED_WITH = {"gptq": "wls"}
OUTLIER_MODES = ("magnitude", "error")  # which weights become outliers: largest |w|, or largest (weighted) error
# frobenius: Σ‖W−Ŵ‖_F (the MXQ paper, data-free); frobenius_sq: Σ‖W−Ŵ‖²_F;
# output: Σ_j m_j Σ_i ΔW_ij² with m_j = Σ x_j² over calibration tokens (diagonal of tr(ΔW XᵀX ΔWᵀ));
# fisher: Σ F·ΔW² with F the Fisher diagonal from calibration (≈ 2 × expected loss increase).
OBJECTIVES = ("frobenius", "frobenius_sq", "output", "fisher")
CALIBRATED_OBJECTIVES = ("output", "fisher")
SAMPLE_EVERY = 8  # measurement quantizes 1 row in this many per config (converter/measure.py)
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ConvertOptions:
    bpw: float | None = None  # bits per weight over the decoder linears (everything they store)
    size: int | None = None  # or: bytes for the whole file
    # Defaults are the best measured on SmolLM2 (tools/quality_sweep.py, README "Quality"); the MXQ
    # paper's data-free method is configs="paper", quantizer="hqq", objective="frobenius".
    configs: str = "all"
    quantizer: str = "wls"
    objective: str = "fisher"
    outliers: float = 0.0  # percent of each matrix's weights kept as fp16 outliers, added to every candidate
    outlier_mode: str = "magnitude"  # which weights become outliers: largest |w| or largest (weighted) error
    quantize_embeddings: int | None = None  # 8 or 4: embeddings (and an untied lm_head) affine too
    calib: str | None = None  # calibration text file (default: the packaged Botchan excerpt)
    calib_tokens: int = 8192
    cache_dir: str | None = "default"  # "default": ~/.cache/mxq; None: no error/calibration cache
    measure_every: int = SAMPLE_EVERY  # errors measured on 1 row in this many (1: every row, exact)
    jobs: int | None = None  # threads for quantization (None: every core this process may use)
    rotate: bool = False  # rotate the residual stream offline (converter/rotate.py) before everything else
    rotate_seed: int = 0  # the random rotation's seed (recorded in the file's provenance)

    def validate(self):
        if (self.bpw is None) == (self.size is None):
            raise ConversionError("give exactly one budget: --bpw or --size")
        if self.bpw is not None and not 1.0 <= self.bpw <= 16.0:
            raise ConversionError(f"--bpw {self.bpw} is outside [1, 16]")
        if self.size is not None and self.size <= 0:
            raise ConversionError("--size must be positive")
        if self.quantizer not in QUANTIZERS:
            raise ConversionError(f"--quantizer {self.quantizer!r}: choose from {', '.join(QUANTIZERS)}")
        if self.objective not in OBJECTIVES:
            raise ConversionError(f"--objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.outliers <= 10.0:
            raise ConversionError(f"--outliers {self.outliers}% is outside [0, 10]%")
        if self.quantize_embeddings not in (None, 4, 8):
            raise ConversionError("--quantize-embeddings takes 8 or 4")
        if self.outlier_mode not in OUTLIER_MODES:
            raise ConversionError(f"--outlier-mode {self.outlier_mode!r}: choose from {', '.join(OUTLIER_MODES)}")
        if self.calib_tokens < 512:
            raise ConversionError("--calib-tokens must be at least 512")
        if self.measure_every < 1:
            raise ConversionError(f"measure_every {self.measure_every} must be at least 1")
        if not 0 <= self.rotate_seed < 2**63:
            raise ConversionError(f"--rotate-seed {self.rotate_seed} is outside [0, 2^63)")
        if self.jobs is not None and self.jobs < 1:
            raise ConversionError(f"--jobs {self.jobs} must be at least 1")


def default(name: str):
    """The default of ConvertOptions field `name`."""
    return next(f.default for f in fields(ConvertOptions) if f.name == name)


def parse_size(text: str) -> int:
    """'123456', '300MB', '1.5GiB' → bytes."""
    number = text.strip().lower().rstrip("s")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if unit and number.endswith(unit):
            value, factor = number[: -len(unit)].strip(), SIZE_UNITS[unit]
            break
    else:
        value, factor = number, 1
    try:
        size = float(value) * factor
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size <= 0:
        raise ConversionError(f"--size {text!r}: expected a positive number of bytes, optionally with "
                              "B/KB/MB/GB/KiB/MiB/GiB")
    return int(size)
