"""Click commands of this part of mxq, registered on the `mxq` group by mxq.cli.

Keep imports here light: heavy modules are imported inside the command functions."""
import click  # noqa: F401

COMMANDS = []
