"""The `mxq serve` click command, registered on the `mxq` group by mxq.cli.

Keep imports here light: starlette/uvicorn (the `serve` extra) and the runtime are imported when the
command runs, so `mxq --help` works without the extra."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from ..runtime.commands import CACHE_OPTION, DEVICE_OPTION

SERVE_PACKAGES = ("starlette", "uvicorn")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts so a busy port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


@click.command("serve")
@click.argument("file", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 127.0.0.1 = this machine only; 0.0.0.0 = every network interface "
                   "(then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0 = any free port; the chosen one is printed).")
@click.option("--api-key", envvar="MXQ_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (default: $MXQ_API_KEY; unset = no key).")
@click.option("--queue-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait while one generates; beyond that a request gets 429 at once.")
@click.option("--model-id", default=None, help="The model's name in the API. Default: FILE's name without .mxq.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="uvicorn's log level (info logs every request).")
@DEVICE_OPTION
@CACHE_OPTION
def serve(file, host, port, api_key, queue_size, model_id, log_level, device, cache_dequantized):
    """Serve the model in FILE over an OpenAI-compatible HTTP API.

    Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming with stream=true),
    GET /v1/models, GET /health. One generation runs at a time; up to --queue-size requests wait,
    more get HTTP 429. A client that disconnects stops its generation. Needs the serve extra:
    pip install 'mxq[serve]'.

    \b
    Examples:
      mxq serve smol.mxq
      mxq serve smol.mxq --port 9000 --cache-dequantized --api-key "$(cat key.txt)"
      curl http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'
    """
    if api_key == "":
        raise click.BadParameter("must not be empty", param_hint="--api-key")
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in SERVE_PACKAGES:
            raise
        raise click.ClickException(f"mxq serve needs the serve extra ({error.name} is not installed): "
                                   "pip install 'mxq[serve]'") from None
    from ..runtime.generate import load

    with load(file, device=device, cache_dequantized=cache_dequantized) as model:
        sock = listen(host, port)
        model_id = model_id or Path(file).stem
        app = create_app(model, model_id, api_key=api_key, queue_size=queue_size)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"mxq: serving {model_id} ({model.context_length}-token context, {device}) on "
                   f"http://{shown}:{bound}/v1{' (API key required)' if api_key else ''}; loaded in "
                   f"{model.load_seconds:.2f} s", err=True)
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"mxq: warning: listening on {host} without --api-key: anyone who can reach this "
                       "address can use the model", err=True)
        sys.stderr.flush()
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])


COMMANDS = [serve]
