"""The converter's options: every knob's default and choices live here, once. `mxq convert`'s click
options (converter/commands.py) and README's table (held by tests/test_docs.py) derive from them.
Torch-free, so the CLI can build its --help without importing the converter's heavy modules."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from .errors import ConversionError

# gptq: wls's scales, codes rounded with error compensation layer by layer (converter/gptq.py); the
# MILP's errors are measured with wls (MEASURED_WITH), the compensation happens at write time.
# auto: the allocation is wls's; the file is rounded with gptq when it is below AUTO_GPTQ_BELOW bits per
# decoder-linear weight and calibrated (write_quantizer), else with wls.
QUANTIZERS = ("auto", "hqq", "rtn", "wls", "gptq")
MEASURED_WITH = {"gptq": "wls", "auto": "wls"}
# GPTQ's gain over wls by the allocation's bits (SmolLM2, WikiText-2 ppl, README "Quality"; with its
# asymmetric target): 4.25 bpw +0.5%, 3.5 −3.1%, 3.0 −8.4%, 2.5 −24%; Gemma 3 270M at 3.0 −16.7%.
AUTO_GPTQ_BELOW = 4.0
# --configs auto: the candidate preset by the decoder linears' bits per weight — AUTO_CONFIGS[0] at or above
# AUTO_VQ_BELOW, AUTO_CONFIGS[1] below (a byte budget: decided by a first solve with AUTO_CONFIGS[0]; loss
# prediction, --max-loss and mxq sweep, takes no shared codebooks: AUTO_CONFIGS[0] throughout). all+vqs against
# all (SmolLM2, WikiText-2 ppl, README "Quality"): 3.5 bpw −4.8%, 3.0 −10.7%, 2.5 −30.7%; 4.25 −0.2% (noise);
# its files decode about half as fast on CPU as affine ones (README).
AUTO = "auto"
AUTO_CONFIGS = ("all", "all+vqs")
AUTO_VQ_BELOW = 4.0
AUTO_VQ_MAX_SHARE = 0.01  # ... where the shared codebooks take at most this share of the decoder linears' bytes
OUTLIER_MODES = ("magnitude", "error")  # which weights become outliers: largest |w|, or largest (weighted) error
# frobenius: Σ‖W−Ŵ‖_F (the MXQ paper, data-free); frobenius_sq: Σ‖W−Ŵ‖²_F;
# output: Σ_j m_j Σ_i ΔW_ij² with m_j = Σ x_j² over calibration tokens (diagonal of tr(ΔW XᵀX ΔWᵀ));
# fisher: Σ F·ΔW² with F the Fisher diagonal from calibration (≈ 2 × expected loss increase).
OBJECTIVES = ("frobenius", "frobenius_sq", "output", "fisher")
CALIBRATED_OBJECTIVES = ("output", "fisher")
MAX_ROW_BLOCKS = 64  # --row-blocks: at most this many row blocks per matrix (converter/row_blocks.py) ...
MIN_BLOCK_ROWS = 32  # ... each of at least this many rows (a matrix with fewer gets fewer blocks) ...
MIN_SPLIT_COLUMNS = 256  # ... and only with rows this wide: the row order costs 16 bits a row, ≤ 1/16 bpw here
SAMPLE_EVERY = 8  # measurement quantizes 1 row in this many per config (converter/measure.py)
MAX_INPUT_SCALING = 1.0  # --input-scaling α: s = (second moment)^(α/2), AWQ's range
MAX_LOSS_PERCENT = 100.0  # --max-loss P%: the loss increase allowed, as a percentage of the fp model's loss
# --cluster: "local" or "local:N" (start a Ray instance here with N worker processes), "ray://HOST:PORT"
# (Ray Client to a running cluster's head) or "HOST:PORT" / "auto" (join a cluster this machine is part of)
CLUSTER_ADDRESS = re.compile(r"local(:[1-9][0-9]*)?|ray://[^\s/:]+:[0-9]+|(?!local:)[^\s/:]+:[0-9]+|auto")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class ConvertOptions:
    bpw: float | None = None  # bits per weight over the decoder linears (everything they store)
    size: int | None = None  # or: bytes for the whole file (embeddings and lm_head allocated too)
    fit: int | None = None  # or: bytes for the runtime's whole footprint at `context` × `batch`
    context: int | None = None  # --fit: positions (prompt + new tokens) the KV cache holds
    batch: int = 1  # --fit: sequences
    max_loss: float | None = None  # or: percent loss increase allowed on held-out calibration text (target_loss.py)
    # Defaults are the best measured on SmolLM2 (tools/quality_sweep.py, README "Quality"); the MXQ
    # paper's data-free method is configs="paper", quantizer="hqq", objective="frobenius".
    configs: str = AUTO  # or a preset / labels (converter/candidates.py); auto: AUTO_CONFIGS by the bits per weight
    quantizer: str = "auto"
    objective: str = "fisher"
    row_blocks: int = 4  # split each decoder linear into this many row blocks by importance, a config each
    outliers: float = 0.0  # percent of each matrix's weights kept as fp16 outliers, added to every candidate
    outlier_mode: str = "magnitude"  # which weights become outliers: largest |w| or largest (weighted) error
    quantize_embeddings: int | None = None  # 8 or 4: embeddings (and an untied lm_head) fixed to b8g64 / b4g32
    calib: str | None = None  # calibration text file (default: the packaged Botchan excerpt)
    calib_tokens: int = 8192
    cache_dir: str | None = "default"  # "default": ~/.cache/mxq; None: no error/calibration cache
    measure_every: int = SAMPLE_EVERY  # errors measured on 1 row in this many (1: every row, exact)
    jobs: int | None = None  # threads for quantization (None: every core this process may use)
    cluster: str | None = None  # run calibration and measurement as Ray tasks (CLUSTER_ADDRESS; converter/cluster.py)
    rotate: bool = False  # rotate the residual stream offline (converter/rotate.py) before everything else
    rotate_seed: int = 0  # the random rotation's seed (recorded in the file's provenance)
    # α: decoder linears' input channels scaled by (second moment)^(α/2), producers divided (converter/input_scaling.py)
    input_scaling: float = 0.25

    def validate(self):
        if sum(budget is not None for budget in (self.bpw, self.size, self.fit, self.max_loss)) != 1:
            raise ConversionError("give exactly one budget: --bpw, --size, --fit or --max-loss")
        if (self.fit is None) != (self.context is None):
            raise ConversionError("--fit and --context go together: --fit SIZE --context N")
        if self.fit is not None and self.fit <= 0:
            raise ConversionError("--fit must be positive")
        if self.context is not None and self.context < 1:
            raise ConversionError(f"--context {self.context} must be at least 1")
        if self.batch < 1:
            raise ConversionError(f"--batch {self.batch} must be at least 1")
        if self.max_loss is not None and not 0.0 < self.max_loss <= MAX_LOSS_PERCENT:
            raise ConversionError(f"--max-loss {self.max_loss:g}% is outside (0, {MAX_LOSS_PERCENT:g}]%")
        if self.max_loss is not None and self.objective != "fisher":
            raise ConversionError("--max-loss predicts the loss with the Fisher estimate: use --objective fisher")
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
        if not 1 <= self.row_blocks <= MAX_ROW_BLOCKS:
            raise ConversionError(f"--row-blocks {self.row_blocks} is outside [1, {MAX_ROW_BLOCKS}]")
        if self.measure_every < 1:
            raise ConversionError(f"measure_every {self.measure_every} must be at least 1")
        if not 0 <= self.rotate_seed < 2**63:
            raise ConversionError(f"--rotate-seed {self.rotate_seed} is outside [0, 2^63)")
        if not 0.0 <= self.input_scaling <= MAX_INPUT_SCALING:
            raise ConversionError(f"--input-scaling {self.input_scaling:g} is outside [0, {MAX_INPUT_SCALING:g}]")
        if self.jobs is not None and self.jobs < 1:
            raise ConversionError(f"--jobs {self.jobs} must be at least 1")
        if self.cluster is not None and not CLUSTER_ADDRESS.fullmatch(self.cluster):
            raise ConversionError(f"--cluster {self.cluster!r}: expected local, local:N, ray://HOST:PORT, HOST:PORT "
                                  "or auto")


def whole_file(options: ConvertOptions) -> bool:
    """Whether the allocation covers the embedding and lm_head too: a byte budget (--size, --fit) with
    the Fisher objective (their errors in the linears' units) and no --quantize-embeddings override."""
    return options.bpw is None and options.objective == "fisher" and options.quantize_embeddings is None


def write_quantizer(options: ConvertOptions, bpw_linear: float) -> str:
    """The quantizer that rounds the file's weights: --quantizer, or auto's choice (_auto)."""
    return options.quantizer if options.quantizer != "auto" else _auto(options, bpw_linear)[0]


def auto_note(options: ConvertOptions, bpw_linear: float) -> str:
    """What --quantizer auto chose and why, for the conversion's notes."""
    chosen, why = _auto(options, bpw_linear)
    return f"--quantizer auto rounded with {chosen} ({why})"


def _auto(options: ConvertOptions, bpw_linear: float) -> tuple[str, str]:
    """(quantizer, why): gptq when the allocation stores fewer than AUTO_GPTQ_BELOW bits per
    decoder-linear weight (bpw_linear) and the objective is calibrated (the run reads calibration text
    anyway; a data-free objective stays data-free), else wls."""
    if bpw_linear >= AUTO_GPTQ_BELOW:
        return "wls", f"{bpw_linear:.4f} bpw ≥ {AUTO_GPTQ_BELOW:g}"
    if options.objective not in CALIBRATED_OBJECTIVES:
        return "wls", f"--objective {options.objective} is data-free"
    return "gptq", f"{bpw_linear:.4f} bpw < {AUTO_GPTQ_BELOW:g}"


def resolved_configs(options: ConvertOptions) -> str:
    """--configs, or for auto before a byte budget's first solve AUTO_CONFIGS[0] (the conversion resolves --bpw's
    first: auto_configs)."""
    return options.configs if options.configs != AUTO else AUTO_CONFIGS[0]


def auto_configs(bpw_linear: float, numel: int) -> tuple[str, str]:
    """(preset, why) of --configs auto for bpw_linear bits per weight over `numel` decoder-linear weights: the
    shared codebooks of AUTO_CONFIGS[1] below AUTO_VQ_BELOW where their bytes are at most AUTO_VQ_MAX_SHARE of
    the linears' (a small model cannot spare 34 KiB: its budget would go to codebooks), else AUTO_CONFIGS[0]."""
    from .candidates import parse_candidates
    from .shared_codebooks import reserved_nbytes, shared_pairs

    if bpw_linear >= AUTO_VQ_BELOW:
        return AUTO_CONFIGS[0], f"{bpw_linear:.4f} bpw ≥ {AUTO_VQ_BELOW:g}"
    books = reserved_nbytes(shared_pairs(parse_candidates(AUTO_CONFIGS[1])))
    share = books / max(bpw_linear * numel / 8, 1.0)
    if share > AUTO_VQ_MAX_SHARE:
        return AUTO_CONFIGS[0], (f"{bpw_linear:.4f} bpw < {AUTO_VQ_BELOW:g}, but the shared codebooks' {books:,} bytes "
                                 f"would be {100 * share:.1f}% of the decoder linears', over "
                                 f"{100 * AUTO_VQ_MAX_SHARE:g}%")
    return AUTO_CONFIGS[1], f"{bpw_linear:.4f} bpw < {AUTO_VQ_BELOW:g}"


def configs_note(options: ConvertOptions, configs: str, why: str) -> str:
    """What --configs auto chose and why, for the conversion's notes (with shared codebooks: their cost)."""
    how = "--bpw" if options.bpw is not None else f"the first solve, with {AUTO_CONFIGS[0]}"
    cost = "" if configs == AUTO_CONFIGS[0] else (f"; files with shared-codebook blocks decode about half as fast on "
                                                  f"CPU as affine ones, --configs {AUTO_CONFIGS[0]} for speed")
    return f"--configs auto took {configs} ({how}: {why}){cost}"


def measured_with(quantizer: str) -> str:
    """The quantizer whose errors the allocation measures for --quantizer `quantizer`."""
    return MEASURED_WITH.get(quantizer, quantizer)


def default(name: str):
    """The default of ConvertOptions field `name`."""
    return next(f.default for f in fields(ConvertOptions) if f.name == name)


def parse_size(text: str, flag: str = "--size") -> int:
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
        raise ConversionError(f"{flag} {text!r}: expected a positive number of bytes, optionally with "
                              "B/KB/MB/GB/KiB/MiB/GiB")
    return int(size)


def parse_percent(text: str, option: str) -> float:
    """'1%', '0.5', ' 2.5 % ' → the number of percent."""
    try:
        value = float(text.strip().rstrip("%").strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConversionError(f"{option} {text!r}: expected a percentage such as 1%")
    return value
