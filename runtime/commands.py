"""Click commands of this part of mxq, registered on the `mxq` group by mxq.cli:
generate, eval, export-hf.

Keep imports here light: heavy modules are imported inside the command functions."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

MEMORY_HELP = ("Dequantize every matrix to float32 once at load and keep it (4 bytes per weight of extra "
               "memory; on a CPU this is rarely faster now). Default (lean): weights stay packed in the "
               "memory-mapped file; decoding multiplies straight from the packed codes with compiled "
               "kernels (NumPy fallback), prefill dequantizes chunk by chunk; memory stays close to the "
               "file size.")
DEVICE_OPTION = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                             help="Where to run: cpu (NumPy) or cuda (NVIDIA GPU via CuPy).")
CACHE_OPTION = click.option("--cache-dequantized", is_flag=True, help=MEMORY_HELP)
VERIFY_OPTION = click.option("--verify/--no-verify", default=True, show_default=True,
                             help="Check every weight checksum at load (one read of the file; metadata and "
                                  "tokenizer are always checked). --no-verify starts faster on trusted files.")


@click.command("generate")
@click.argument("file", type=click.Path())
@click.argument("prompt")
@click.option("-n", "--max-new-tokens", type=int, default=128, show_default=True,
              help="Stop after this many new tokens (or earlier at an end-of-sequence token).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy (always the most likely token); higher = more random.")
@click.option("--top-k", type=int, default=None, help="Sample only among the K most likely tokens.")
@click.option("--top-p", type=float, default=None,
              help="Sample only among the most likely tokens whose probabilities add up to P (0 < P <= 1).")
@click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text.")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@DEVICE_OPTION
@CACHE_OPTION
@VERIFY_OPTION
def generate(file, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, device, cache_dequantized,
             verify):
    """Continue PROMPT with the model in FILE, printing text as it is generated.

    The continuation goes to stdout; a summary (prefill and decode speed) goes to stderr.

    \b
    Examples:
      mxq generate smol.mxq "Once upon a time"
      mxq generate smol.mxq "Write a haiku about the sea" --chat -n 64
      mxq generate smol.mxq "The meaning of life is" --temperature 0.8 --top-p 0.95 --seed 1
    """
    from .generate import load

    with load(file, device=device, cache_dequantized=cache_dequantized, verify=verify) as model:
        pieces = model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, chat=chat)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        click.echo(f"mxq: loaded in {model.load_seconds:.2f} s; {model.last_stats.summary()}", err=True)


def read_text_file(path, what: str) -> str:
    """A UTF-8 text file's contents; one-line errors for a missing, non-regular or undecodable file."""
    from ..format_spec.reader import open_regular
    from .errors import ModelError

    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            return handle.read().decode("utf-8")
    except FileNotFoundError:
        raise ModelError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError:
        raise ModelError(f"{what} {path}: not UTF-8 text") from None
    except OSError as error:
        raise ModelError(f"{what} {path}: {error.strerror or error}") from None


@click.command("eval")
@click.argument("file", type=click.Path())
@click.option("--text", "text_path", type=click.Path(), required=True, envvar="MXQ_EVAL_TEXT",
              help="UTF-8 text file to score (required; or set $MXQ_EVAL_TEXT), e.g. the WikiText-2 test "
                   "split as one file, the usual perplexity benchmark.")
@click.option("--ctx", type=int, default=None,
              help="Tokens per chunk / window. Default: 2048, or the model's context if that is shorter.")
@click.option("--stride", type=int, default=None,
              help="Use transformers' sliding-window method, moving the window by this many tokens. "
                   "Default: non-overlapping chunks (GPTQ-style).")
@click.option("--max-chunks", type=int, default=None, help="Score only the first M chunks (windows): a quick estimate.")
@click.option("--reference", "reference_path", type=click.Path(), default=None,
              help="Also run the model in this .mxq file (e.g. the fp16 file of the same checkpoint: "
                   "mxq convert HF_DIR -o ref.mxq --bpw 16 --configs fp16) on the same chunks and report "
                   "FILE's perplexity over REF's with a 95% interval from the paired per-chunk differences, "
                   "the mean KL divergence KL(REF || FILE) of the next-token distributions, and how often "
                   "both models' most likely tokens agree. Both files must tokenize the text alike.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@DEVICE_OPTION
@CACHE_OPTION
@VERIFY_OPTION
def eval_command(file, text_path, ctx, stride, max_chunks, reference_path, as_json, progress, device,
                 cache_dequantized, verify):
    """Measure the perplexity of the model in FILE on a text (lower is better).

    The text is tokenized once (with BOS if the model adds one). Default method: cut the tokens into
    non-overlapping --ctx-token chunks, score every token of a chunk but its first from the chunk
    alone (the usual GPTQ evaluation). With --stride: transformers' sliding-window method. Compare
    numbers only when method, ctx, stride and tokenizer are the same; they are printed with the result.

    Each chunk (window) is one sample: the 95% interval is the mean NLL ± 1.96 standard errors over
    them. Two files differ less than their intervals suggest, because the same text is hard for both:
    compare them with --reference, whose ratio interval comes from the paired per-chunk differences.
    """
    import contextlib
    import json

    from .errors import ModelError
    from .generate import load
    from .perplexity import Z95, perplexity

    path = Path(text_path)
    text = read_text_file(path, "--text")
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(load(file, device=device, cache_dequantized=cache_dequantized, verify=verify))
        ids = model.tokenizer.encode(text)
        reference = None
        if reference_path is not None:
            reference = stack.enter_context(load(reference_path, device=device, cache_dequantized=cache_dequantized,
                                                 verify=verify))
            if reference.model.config.vocab_size != model.model.config.vocab_size:
                raise ModelError(f"--reference {reference_path}: vocabulary of {reference.model.config.vocab_size} "
                                 f"tokens, {file} has {model.model.config.vocab_size}")
            if list(reference.tokenizer.encode(text)) != list(ids):
                raise ModelError(f"--reference {reference_path}: its tokenizer encodes the text differently "
                                 f"from {file}'s")
        if ctx is None:
            ctx = min(2048, model.context_length)
            if ctx < 2:
                raise ModelError(f"{file}: the model's context ({model.context_length} tokens) is too short to "
                                 f"score a text (2 tokens at least)")
        report = perplexity(model, ids, ctx=ctx, stride=stride, max_chunks=max_chunks, progress=progress,
                            reference=reference)
    report = {"file": str(file), "text": str(path), **report}
    if reference_path is not None:
        report["reference"] = {"file": str(reference_path), **report["reference"]}
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    unit = "chunks" if report["method"] == "chunks" else "windows"
    stride_text = f", stride {report['stride']}" if report["stride"] else ""
    click.echo(f"perplexity {report['ppl']:.4f} {_interval_text(report['ppl_95'])} (method {report['method']}, "
               f"ctx {report['ctx']}{stride_text}, {report['chunks']} {unit}, {report['scored_tokens']:,} "
               f"tokens scored of {report['tokens']:,}; text {path.name}; {report['seconds']:.1f} s)")
    if reference_path is not None:
        ref = report["reference"]
        kl_se = f" ± {Z95 * report['kl_divergence_se']:.4f}" if report["kl_divergence_se"] is not None else ""
        click.echo(f"reference {ref['ppl']:.4f} {_interval_text(ref['ppl_95'])} ({Path(reference_path).name}); "
                   f"ratio {report['ppl_ratio']:.4f} {_interval_text(report['ppl_ratio_95'])}; "
                   f"KL divergence {report['kl_divergence']:.4f}{kl_se} nats/token; "
                   f"same top token {100 * report['top1_agreement']:.2f}%")


def _interval_text(interval) -> str:
    """'(95%: a–b)', or '' for a single chunk (no interval)."""
    return "" if interval is None else f"(95%: {interval[0]:.4f}–{interval[1]:.4f})"


@click.command("export-hf")
@click.argument("file", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def export_hf_command(file, out_dir, progress):
    """Write the model in FILE as a Hugging Face checkpoint in OUT_DIR.

    The weights are DEQUANTIZED to float32 (model.safetensors, 4 bytes per weight), with config.json,
    generation_config.json and the tokenizer files, so transformers and other tools can load exactly
    what the quantized file computes: AutoModelForCausalLM.from_pretrained(OUT_DIR).

    FILE's checksums are verified first. The export is atomic: files are written to a hidden
    directory next to OUT_DIR and renamed into place. OUT_DIR must not be a symbolic link; an
    existing OUT_DIR is replaced only if it holds nothing but files an export writes.
    """
    from tqdm import tqdm

    from .export_hf import export_hf

    def bar(items):
        return tqdm(items, desc="export", unit="tensor", file=sys.stderr, disable=not progress)

    export_hf(file, out_dir, progress=bar)
    click.echo(f"wrote {out_dir}")


COMMANDS = [generate, eval_command, export_hf_command]
