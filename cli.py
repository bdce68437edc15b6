"""The `mxq` command line: convert, sweep, generate, eval, inspect, verify, export-hf, serve."""
from __future__ import annotations

import signal
import sys

# Ctrl-C while the CLI is still importing (numpy, click, the command modules) exits quietly with 130,
# like a Ctrl-C later on (the group's invoke), instead of a KeyboardInterrupt traceback.
def _on_sigint(handler) -> None:
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # imported outside the main thread (as a library): leave signals alone
        pass


_on_sigint(lambda signum, frame: sys.exit(130))

import json  # noqa: E402
import os  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .format_spec import MxqFile, MxqFormatError
from .format_spec.strict_json import JsonError
from .format_spec.summary import summarize
from .format_spec.tokenizer_schema import MetadataError
from .format_spec.writer import OutputPathError, Terminated, terminate_as_exception

# Bad input (a file, a checkpoint, an option, the file system) raises one of these, or the
# converter's ConversionError / the runtime's ModelError (_is_known). Anything else reaching the
# CLI is a bug in mxq and is labelled "internal error" (MXQ_DEBUG=1 shows the traceback).
EXPECTED_ERRORS = (MxqFormatError, MetadataError, JsonError, OutputPathError, OSError)


class _Cli(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit; SIGTERM and Ctrl-C
    unwind through cleanup code (temporary outputs are removed) before exiting."""

    def invoke(self, ctx):
        try:
            with terminate_as_exception():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated:
            click.echo("mxq: terminated", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("mxq: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("mxq: error: out of memory", err=True)
            sys.exit(1)
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as error:  # noqa: BLE001 - the CLI's last line of defence; a native library's
            if os.environ.get("MXQ_DEBUG"):  # panic (pyo3's PanicException) is a BaseException too
                raise
            kind = "error" if isinstance(error, EXPECTED_ERRORS) or _is_known(error) else "internal error"
            message = " ".join(str(error).split()) or type(error).__name__
            click.echo(f"mxq: {kind}: {message}", err=True)
            sys.exit(1)


def _is_known(error: Exception) -> bool:
    """Errors the converter and runtime raise for bad input (imported lazily: they are heavy)."""
    known = []
    for module, name in (("mxq.converter.errors", "ConversionError"), ("mxq.runtime.errors", "ModelError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            known.append(cls)
    return isinstance(error, tuple(known))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mxq")
def main():
    """mxq: fit a Hugging Face LLM into an exact memory budget as one mixed-precision
    quantized .mxq file, then run it on a CPU (compiled Numba kernels, or NumPy) or an NVIDIA GPU (CuPy).

    \b
    Typical use:
      mxq convert ./SmolLM2-135M -o smol.mxq --bpw 4.25
      mxq generate smol.mxq "Once upon a time"
      mxq eval smol.mxq --text wikitext2-test.txt
      mxq inspect smol.mxq
    """


def _open(path) -> MxqFile:
    return MxqFile.open(path)


@main.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Also estimate the peak memory of `mxq generate` (lean, CPU) for N positions "
                   "(prompt + new tokens), itemized: file, KV cache, working buffers, runtime.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences generated at once, for --context (multiplies KV cache and activations).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the allocation heatmap (decoder layer × module → bits per weight) as a PNG "
                   "(needs matplotlib: pip install 'mxq[plot]').")
def inspect(file, as_json, tensors, context, batch, plot_path):
    """Show what is inside an .mxq FILE: model, tokenizer, provenance, per-tensor storage, totals;
    with --context N, the runtime memory footprint too; with --plot OUT.png, the allocation heatmap."""
    footprint = None
    if plot_path is not None:
        from . import plot

        try:
            plot.require()  # before any work: one line on how to install matplotlib
        except plot.PlotUnavailable as error:
            _fail(str(error))
        plot.check_png_path(plot_path)
    with _open(file) as f:
        report = summarize(f)
        if context is not None:
            from .runtime.footprint import file_footprint

            footprint = file_footprint(f, context, batch)
            report["footprint"] = footprint.to_json()
    if plot_path is not None:
        _plot_allocation(report, plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    totals = report["totals"]
    model = report["model"]
    click.echo(f"{report['file']}: mxq format {report['version']}, {report['file_bytes']:,} bytes")
    click.echo(f"model: {model.get('architecture', '?')}, {model.get('num_hidden_layers', '?')} layers, "
               f"hidden {model.get('hidden_size', '?')}, vocab {model.get('vocab_size', '?')}")
    raw = report["tokenizer_raw_bytes"]
    unpacked = f", {raw:,} unpacked" if raw != report["tokenizer_bytes"] else ""
    click.echo(f"tokenizer: {report['tokenizer'].get('kind', '?')} ({report['tokenizer_bytes']:,} bytes{unpacked})")
    for key, value in report["provenance"].items():
        click.echo(f"provenance.{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    for key, value in report["quantization"].items():
        if key != "plan":
            click.echo(f"quantization.{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    if tensors:
        width = max([12] + [len(t["short_label"]) for t in report["tensors"]])
        click.echo(f"\n{'tensor':<48} {'shape':>14} {'storage':>{width}} {'bytes':>12} {'bpw':>7}")
        for t in report["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            click.echo(f"{t['name'][:48]:<48} {shape:>14} {t['short_label']:>{width}} {t['bytes']:>12,} {t['bpw']:>7.3f}")
    click.echo(f"\ntensors: {totals['tensors']}, parameters: {totals['parameters']:,}")
    rows = f", rows tensors {totals['bpw_rows']:.4f}" if any(t["scheme"] == "rows" for t in report["tensors"]) else ""
    rows += f", vq tensors {totals['bpw_vq']:.4f}" if any(t["scheme"] == "vq" for t in report["tensors"]) else ""
    rows += f", trellis tensors {totals['bpw_trellis']:.4f}" if any(t["scheme"] == "trellis" for t in report["tensors"]) else ""
    click.echo(f"bits per weight: decoder linears {totals['bpw_linear']:.4f}, affine tensors "
               f"{totals['bpw_affine']:.4f}{rows}, all tensors {totals['bpw_all']:.4f}")
    click.echo("linear configs: " + ", ".join(f"{k}×{v}" for k, v in totals["linear_configs"].items()))
    if totals["row_block_configs"]:
        click.echo("row block configs: " + ", ".join(f"{k}×{v}" for k, v in totals["row_block_configs"].items()))
    click.echo(f"bytes: tensors {report['tensor_bytes']:,}, tokenizer {report['tokenizer_bytes']:,}, "
               f"header+JSON {report['header_and_json_bytes']:,}, alignment padding {report['padding_bytes']:,}")
    if footprint is not None:
        kernels = "compiled kernels" if footprint.kernels else "NumPy path, no compiled kernels"
        click.echo(f"\npeak memory of `mxq generate` (lean, cpu, {kernels}), context {context}, batch {batch}:")
        click.echo("\n".join(footprint.lines()))


def _fail(message: str) -> None:
    click.echo(f"mxq: error: {message}", err=True)
    sys.exit(1)


def _plot_allocation(report: dict, path) -> None:
    from pathlib import Path

    from . import plot

    linears = [(t["name"], t["label"], t["bpw"]) for t in report["tensors"] if t["role"] == "linear"]
    if not any(plot.layer_of(name) is not None for name, _, _ in linears):
        _fail(f"{report['file']}: no per-layer decoder linears to plot")
    others = ", ".join(f"{t['role']} {t['label']}" for t in report["tensors"] if t["role"] in ("embedding", "lm_head"))
    totals = report["totals"]
    title = (f"{Path(report['file']).name}: {totals['bpw_linear']:.3f} bpw over decoder linears, "
             f"{totals['bpw_all']:.3f} over all tensors" + (f"; {others}" if others else ""))
    plot.heatmap(linears, path, title)
    click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("file", type=click.Path())
def verify(file):
    """Check every checksum in FILE, its zero padding, and the content rules a runtime checks before use
    (finite float16 blobs, sound CSR outliers, row orders that are permutations). Exit status 0: intact;
    1: damaged or not a valid file."""
    with _open(file) as f:
        problems = f.verify()
        blobs = 1 + sum(len(e.blobs) for e in f.tensors.values())
        checksums = len(f.checksums())
    if problems:
        for problem in problems[:20]:
            click.echo(f"{file}: {' '.join(problem.split())}", err=True)  # one line each
        click.echo(f"{file}: DAMAGED ({len(problems)} problems: {checksums} checksums over {blobs} blobs, zero "
                   "padding, content rules)", err=True)
        sys.exit(1)
    click.echo(f"{file}: OK ({blobs} blobs, all {checksums} checksums match, content rules hold)")


def _register_commands():
    """convert lives with the converter, generate/eval/export-hf with the runtime, serve with the
    server; each module defines click commands whose heavy imports happen only when the command runs."""
    from .converter.commands import COMMANDS as converter_commands
    from .converter.sweep import sweep_command
    from .runtime.commands import COMMANDS as runtime_commands
    from .server.commands import COMMANDS as server_commands

    for command in converter_commands + [sweep_command] + runtime_commands + server_commands:
        main.add_command(command)


_register_commands()
_on_sigint(signal.default_int_handler)  # imports done: Ctrl-C is a KeyboardInterrupt again

if __name__ == "__main__":
    main()
