"""`mxq convert`: registered on the `mxq` group by mxq.cli. Heavy imports happen inside the command."""
import sys

import click

from ..format_spec import GROUP_SIZES, SUPPORTED_BITS
from .candidates import PRESETS
from .options import OBJECTIVES, OUTLIER_MODES, QUANTIZERS, default

_list = lambda values: ",".join(str(v) for v in values)  # noqa: E731

CONVERT_HELP = """Convert a Hugging Face checkpoint folder HF_DIR into one quantized .mxq file.

\b
Every decoder linear (q/k/v/o, gate/up/down) of every layer gets its own storage config,
chosen by a mixed-integer program that minimizes total quantization error while keeping
the budget exactly:
  --bpw X    bits per weight over the decoder linears, counting everything they store
             (codes, double-quantized scales/zeros, outliers), as in the MXQ paper
  --size S   bytes for the whole file (e.g. 80MB, 75MiB, 1.5GiB)
Embeddings, lm_head and norms stay fp16 unless --quantize-embeddings is given.

\b
The default method (best measured): a calibration pass over a small public-domain text
collects Fisher diagonals, errors are measured as Σ F·ΔW² (an estimate of the loss each
config adds), rounding is importance-weighted (wls), and all bit widths 2–8 are candidates.
The MXQ paper's data-free method: --objective frobenius --quantizer hqq --configs paper.

\b
Examples:
  mxq convert ./SmolLM2-135M -o smol.mxq --bpw 4.25
  mxq convert ./SmolLM2-135M -o smol.mxq --size 90MiB
  mxq convert ./SmolLM2-135M -o smol.mxq --bpw 4.25 --objective frobenius --quantizer hqq --configs paper
  mxq convert ./SmolLM2-135M -o smol-fp16.mxq --bpw 16 --configs fp16

Measured errors and calibration statistics are cached (~/.cache/mxq, or $MXQ_CACHE), so
converting the same checkpoint at another budget skips measurement and calibration.
"""


@click.command("convert", help=CONVERT_HELP)
@click.argument("hf_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .mxq file (written atomically).")
@click.option("--bpw", type=float, help="Budget: bits per weight over the decoder linears.")
@click.option("--size", "size_text", help="Budget: whole-file size in bytes (suffixes B, KB, MB, GB, KiB, MiB, GiB).")
@click.option("--configs", default=default("configs"), show_default=True,
              help=f"Candidate configs, comma-separated: bBgG (B bits {_list(SUPPORTED_BITS)}; G group "
                   f"{_list(GROUP_SIZES)}), optionally +oP% outliers, fp16, or presets {_list(PRESETS)} "
                   "('paper': b2/3/4/8 × g32/64/128, the MXQ paper's space; 'all': every bit width).")
@click.option("--outliers", "outliers_text", default=f"{default('outliers'):g}", show_default=True,
              help="Keep this share of each matrix's largest weights as fp16 outliers (e.g. 0.5%); "
                   "their bytes count against the budget.")
@click.option("--outlier-mode", type=click.Choice(OUTLIER_MODES), default=default("outlier_mode"), show_default=True,
              help="Outliers are the largest weights, or those with the largest (importance-weighted) error.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default=default("quantizer"), show_default=True,
              help="hqq: HQQ-style zero-point optimization; rtn: min-max round to nearest; wls: weighted "
                   "search over scales with a least-squares scale/offset fit (weights from calibration "
                   "with --objective fisher/output, else from |w|); gptq: wls's scales, then GPTQ's "
                   "error-compensating rounding with the calibration inputs' Hessian, layer by layer "
                   "(errors for the allocation are measured with wls).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=default("objective"), show_default=True,
              help="What the allocation minimizes: Σ‖W−Ŵ‖_F (the MXQ paper, data-free), Σ‖W−Ŵ‖²_F, "
                   "output: Σ_j E[x_j²]·‖ΔW_:,j‖² (calibration), fisher: Σ F·ΔW² with F the Fisher diagonal "
                   "(calibration; an estimate of the loss increase).")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text for --objective output/fisher and --quantizer gptq (default: a public-domain Botchan excerpt "
                   "shipped with mxq). Never calibrate on your evaluation text.")
@click.option("--calib-tokens", type=int, default=default("calib_tokens"), show_default=True, help="Calibration tokens to use.")
@click.option("--quantize-embeddings", type=click.Choice(["8", "4"]), default=None,
              help="Also quantize embeddings and an untied lm_head (8: b8g64, 4: b4g32).")
@click.option("--rotate", is_flag=True, default=default("rotate"),
              help="Rotate the residual stream by a random orthogonal matrix first (norms folded into the "
                   "linears; the model's function is unchanged, outliers are spread). Unties tied "
                   "embeddings: the lm_head is stored too. Not for Gemma 3.")
@click.option("--rotate-seed", type=click.IntRange(min=0, max=2**63 - 1), default=default("rotate_seed"),
              show_default=True, help="Seed of the --rotate rotation (recorded in the file).")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where measured errors are cached.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the error cache.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Threads for quantization  [default: every core available]; the file does not depend on it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_command(hf_dir, output, bpw, size_text, configs, outliers_text, outlier_mode, quantizer, objective,
                    calib, calib_tokens, quantize_embeddings, rotate, rotate_seed, cache_dir, no_cache, jobs, quiet):
    from tqdm import tqdm

    from ..format_spec.writer import check_output_path
    from .options import ConvertOptions, parse_size
    from .pipeline import convert
    from .errors import ConversionError

    check_output_path(output)  # before any expensive stage: the directory exists and is writable

    try:
        outliers = float(outliers_text.strip().rstrip("%"))
    except ValueError:
        raise ConversionError(f"--outliers {outliers_text!r}: expected a percentage such as 0.5%") from None
    options = ConvertOptions(
        bpw=bpw, size=parse_size(size_text) if size_text else None, configs=configs, quantizer=quantizer,
        objective=objective, outliers=outliers, outlier_mode=outlier_mode, calib=calib, calib_tokens=calib_tokens,
        quantize_embeddings=int(quantize_embeddings) if quantize_embeddings else None,
        cache_dir=None if no_cache else (cache_dir or "default"), jobs=jobs, rotate=rotate, rotate_seed=rotate_seed)
    progress = None if quiet else (lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, **kw))
    report = convert(hf_dir, output, options, progress=progress)
    budget = f"{options.bpw} bpw" if options.bpw is not None else f"{options.size:,} bytes"
    click.echo(f"wrote {report.path}: {report.file_bytes:,} bytes ({report.file_bytes / 2**20:.2f} MiB)")
    click.echo(f"budget {budget}; achieved {report.achieved_bpw:.4f} bpw over decoder linears")
    click.echo("average bits per module: " + ", ".join(f"{m} {b:.2f}" for m, b in report.module_bits.items()))
    click.echo("configs: " + ", ".join(f"{label}×{n}" for label, n in report.config_counts.items()))
    click.echo("seconds: " + ", ".join(f"{stage} {t:.1f}" for stage, t in report.seconds.items()))
    for note in report.notes:
        click.echo(f"note: {note}")


COMMANDS = [convert_command]
