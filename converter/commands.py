"""`mxq convert`: registered on the `mxq` group by mxq.cli. Heavy imports happen inside the command."""
import sys

import click

from ..format_spec import CODEBOOK_ROWS, GROUP_SIZES, LABEL_GRAMMAR, SUPPORTED_BITS
from .candidates import PRESETS
from .options import (AUTO, AUTO_CONFIGS, AUTO_GPTQ_BELOW, AUTO_VQ_BELOW, MAX_ROW_BLOCKS, MIN_BLOCK_ROWS, MIN_SPLIT_COLUMNS, OBJECTIVES, OUTLIER_MODES,
                      QUANTIZERS, default)

_list = lambda values: ",".join(str(v) for v in values)  # noqa: E731

CONVERT_HELP = """Convert a Hugging Face checkpoint folder HF_DIR into one quantized .mxq file.

\b
Every decoder linear (q/k/v/o, gate/up/down) of every layer (by default each of its
--row-blocks blocks of output channels, sorted by importance) gets its own storage
config, chosen by a mixed-integer program that minimizes total quantization error
while keeping the budget exactly:
  --bpw X    bits per weight over the decoder linears, counting everything they store
             (codes, double-quantized scales/zeros, outliers), as in the MXQ paper
  --size S   bytes for the whole file (e.g. 80MB, 75MiB, 1.5GiB)
  --fit S --context N [--batch B]
             the whole runtime footprint of `mxq generate` (lean, CPU): file + KV cache
             for N positions × B + working buffers, tokenizer, interpreter (runtime/footprint.py)
  --max-loss P
             the smallest file whose loss on held-out calibration text (the tokens after
             the calibrated ones) is at most P% above the fp model's: the budget is searched
             with the Fisher prediction, each file written is measured with the runtime (CPU)
             and the prediction rescaled by measured/predicted until a file meets P% (a few
             files at most); the summary shows predicted beside measured for each
With --size and --fit (and the default --objective fisher) the embedding and lm_head are
allocated too: fp16 or 8–3-bit affine, their Fisher error in the linears' units, a tied
matrix stored once. With --bpw they stay fp16; --quantize-embeddings fixes them; norms are fp16.

\b
The default method (best measured): a calibration pass over a small public-domain text
collects Fisher diagonals, errors are measured as Σ F·ΔW² (an estimate of the loss each
config adds); candidates are every affine bit width 2–8, plus shared-codebook vq below 4 bits per
decoder-linear weight (--configs auto); rounding is importance-weighted (wls) at 4 bpw and above,
error-compensating (gptq) below (--quantizer auto); and each linear's input channels are
first scaled by their activations (--input-scaling 0.25).
The MXQ paper's data-free method: --objective frobenius --quantizer hqq --configs paper
(no calibration, so no input scaling either).

\b
Examples:
  mxq convert ./SmolLM2-135M -o smol.mxq --bpw 4.25
  mxq convert ./SmolLM2-135M -o smol.mxq --size 90MiB
  mxq convert ./SmolLM2-135M -o smol.mxq --fit 560MiB --context 2048
  mxq convert ./SmolLM2-135M -o smol.mxq --max-loss 1%
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
@click.option("--fit", "fit_text", help="Budget: bytes for file + runtime memory at --context (suffixes as --size).")
@click.option("--context", type=int, default=None, help="With --fit: positions (prompt + new tokens) to hold.")
@click.option("--batch", type=int, default=default("batch"), show_default=True, help="With --fit: sequences.")
@click.option("--max-loss", "max_loss_text",
              help="Budget: the smallest file whose loss increase on held-out calibration text is at most this "
                   "percentage of the fp model's loss (e.g. 1%), predicted, then measured with the runtime.")
@click.option("--configs", default=default("configs"), show_default=True,
              help=f"Candidate configs: '{AUTO}' ('{AUTO_CONFIGS[0]}' at or above {AUTO_VQ_BELOW:g} bits per "
                   f"decoder-linear weight, '{AUTO_CONFIGS[1]}' below; a byte budget decides by a first solve with "
                   f"'{AUTO_CONFIGS[0]}', --max-loss keeps '{AUTO_CONFIGS[0]}'), or comma-separated labels — "
                   f"{LABEL_GRAMMAR} — with B in {_list(SUPPORTED_BITS)}, "
                   f"G in {_list(GROUP_SIZES)}, C in {_list(CODEBOOK_ROWS)} and a candidate's outliers a percent; "
                   f"or presets {_list(PRESETS)} ('paper': b2/3/4/8 × g32/64/128 with 8-bit metadata, the MXQ paper's "
                   "space; 'all': every affine bit width and group size, and b4/b5 × g32/g64 with 6-bit metadata "
                   "too; 'lut': l2–l5 per channel and per 4 and 16 channels; 'vq': v2d4 and v3d2 × g32/64/128, "
                   "vector quantization with a codebook per matrix; 'vqs': v2d4 and v3d4 × g32/64/128 with codebooks "
                   "shared by the file; 'trellis': t2–t5 g64, trellis-coded rows through the file's table for each "
                   "K; files with vq blocks decode slower on CPU: about half as fast with 'vqs', "
                   "several times slower with 'vq', and trellis blocks slower still (a table lookup per weight; "
                   "conversion runs a Viterbi search per row, ~4 s per million weights on 2 cores) — README, "
                   "Quality).")
@click.option("--row-blocks", type=click.IntRange(min=1, max=MAX_ROW_BLOCKS), default=default("row_blocks"),
              show_default=True,
              help="Split each decoder linear into this many blocks of output channels, sorted by importance "
                   "(Σ_j F_ij·W_ij² of row i; with --objective output the inputs' second moments for F, data-free "
                   "‖W_i‖²), each block with its own config chosen by the MILP (1: one config "
                   f"per matrix). A matrix gets fewer blocks where a block would have fewer than {MIN_BLOCK_ROWS} rows, "
                   f"none when its rows have fewer than {MIN_SPLIT_COLUMNS} weights (the row order costs 16 bits "
                   "a row).")
@click.option("--outliers", "outliers_text", default=f"{default('outliers'):g}", show_default=True,
              help="Keep this share of each matrix's largest weights as fp16 outliers (e.g. 0.5%; not in trellis "
                   "configs, which store none); their bytes count against the budget.")
@click.option("--outlier-mode", type=click.Choice(OUTLIER_MODES), default=default("outlier_mode"), show_default=True,
              help="Outliers are the largest weights, or those with the largest (importance-weighted) error.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default=default("quantizer"), show_default=True,
              help="hqq: HQQ-style zero-point optimization; rtn: min-max round to nearest; wls: weighted "
                   "search over scales with a least-squares scale/offset fit (weights from calibration "
                   "with --objective fisher/output, else from |w|); gptq: wls's scales, then GPTQ's "
                   "error-compensating rounding with the calibration inputs' Hessian, layer by layer, "
                   "towards the float model's outputs "
                   "(errors for the allocation are measured with wls); auto: the allocation is wls's, "
                   f"the file is rounded with gptq below {AUTO_GPTQ_BELOW:g} bits per decoder-linear weight "
                   "(with --objective fisher/output), else with wls.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=default("objective"), show_default=True,
              help="What the allocation minimizes: Σ‖W−Ŵ‖_F (the MXQ paper, data-free), Σ‖W−Ŵ‖²_F, "
                   "output: Σ_j E[x_j²]·‖ΔW_:,j‖² (calibration), fisher: Σ F·ΔW² with F the Fisher diagonal "
                   "(calibration; an estimate of the loss increase).")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text for --objective output/fisher and --quantizer gptq (default: a public-domain Botchan excerpt "
                   "shipped with mxq). Never calibrate on your evaluation text.")
@click.option("--calib-tokens", type=int, default=default("calib_tokens"), show_default=True, help="Calibration tokens to use.")
@click.option("--quantize-embeddings", type=click.Choice(["8", "4"]), default=None,
              help="Fix the embeddings and an untied lm_head to 8: b8g64 or 4: b4g32 (default: fp16 with --bpw, "
                   "allocated with --size/--fit).")
@click.option("--rotate", is_flag=True, default=default("rotate"),
              help="Rotate the residual stream by a random orthogonal matrix first (norms folded into the "
                   "linears; the model's function is unchanged, outliers are spread). Unties tied "
                   "embeddings: the lm_head is stored too. Not for Gemma 3.")
@click.option("--rotate-seed", type=click.IntRange(min=0, max=2**63 - 1), default=default("rotate_seed"),
              show_default=True, help="Seed of the --rotate rotation (recorded in the file).")
@click.option("--input-scaling", type=float, default=default("input_scaling"), show_default=True, metavar="ALPHA",
              help="Scale each decoder linear's input channels by (calibration second moment)^(ALPHA/2), the "
                   "producer (norm weight, v or up rows) divided by the same: the model's function is unchanged, "
                   "channels with large activations get finer levels (AWQ). 0: off (better below ~3 bpw). Needs a "
                   "calibrated objective.")
@click.option("--cache-dir", type=click.Path(), default=None, help="Where measured errors are cached.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the error cache.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Threads for quantization  [default: every core available]; the file does not depend on it.")
@click.option("--cluster", default=None, metavar="ADDRESS",
              help="Run calibration and measurement as Ray tasks: local[:N] (a Ray instance here with N workers), "
                   "ray://HOST:PORT (a cluster's Ray Client port) or HOST:PORT/auto (the cluster this machine "
                   "belongs to). The checkpoint and the cache must be on storage all nodes share; the file is "
                   "the same as without --cluster. Needs pip install 'mxq[cluster]'.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_command(hf_dir, output, bpw, size_text, fit_text, context, batch, max_loss_text, configs,
                    row_blocks, outliers_text, outlier_mode, quantizer, objective,
                    calib, calib_tokens, quantize_embeddings, rotate, rotate_seed, input_scaling, cache_dir, no_cache, jobs,
                    cluster, quiet):
    from tqdm import tqdm

    from ..format_spec.writer import check_output_path
    from .options import ConvertOptions, parse_percent, parse_size
    from .pipeline import convert
    from .errors import ConversionError

    check_output_path(output)  # before any expensive stage: the directory exists and is writable

    try:
        outliers = float(outliers_text.strip().rstrip("%"))
    except ValueError:
        raise ConversionError(f"--outliers {outliers_text!r}: expected a percentage such as 0.5%") from None
    options = ConvertOptions(
        bpw=bpw, size=parse_size(size_text) if size_text else None,
        fit=parse_size(fit_text, "--fit") if fit_text else None, context=context, batch=batch,
        max_loss=parse_percent(max_loss_text, "--max-loss") if max_loss_text else None, configs=configs,
        row_blocks=row_blocks,
        quantizer=quantizer, objective=objective, outliers=outliers, outlier_mode=outlier_mode, calib=calib, calib_tokens=calib_tokens,
        quantize_embeddings=int(quantize_embeddings) if quantize_embeddings else None,
        cache_dir=None if no_cache else (cache_dir or "default"), jobs=jobs, cluster=cluster,
        rotate=rotate, rotate_seed=rotate_seed, input_scaling=input_scaling)
    progress = None if quiet else (lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, **kw))
    report = convert(hf_dir, output, options, progress=progress)
    budget = (f"{options.bpw} bpw" if options.bpw is not None else f"{options.size:,} bytes" if options.size
              else f"fit {options.fit:,} bytes at context {options.context} × {options.batch}" if options.fit
              else f"loss increase ≤ {options.max_loss:g}% on held-out calibration text")
    click.echo(f"wrote {report.path}: {report.file_bytes:,} bytes ({report.file_bytes / 2**20:.2f} MiB)")
    click.echo(f"budget {budget}; achieved {report.achieved_bpw:.4f} bpw over decoder linears")
    click.echo("average bits per module: " + ", ".join(f"{m} {b:.2f}" for m, b in report.module_bits.items()))
    click.echo("configs: " + ", ".join(f"{label}×{n}" for label, n in report.config_counts.items()))
    if report.matrix_configs:
        click.echo("stored once: " + ", ".join(f"{name} {label}" for name, label in report.matrix_configs.items()))
    click.echo("seconds: " + ", ".join(f"{stage} {t:.1f}" for stage, t in report.seconds.items()))
    for stage, workers in report.workers.items():
        click.echo(f"{stage} seconds per worker: " + ", ".join(
            f"{w} {t['seconds']:.1f} (CPU {t['cpu']:.1f}, {t['tasks']} tasks)" for w, t in workers.items()))
    for note in report.notes:
        click.echo(f"note: {note}")


COMMANDS = [convert_command]
