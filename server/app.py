"""The Starlette app of `mxq serve`: OpenAI-compatible routes over one Engine.

    GET  /health                 {"status": "ok", "model", "busy", "waiting", "queue_size", "tokens_generated"}
    GET  /v1/models              the one model; GET /v1/models/{id} too
    POST /v1/completions         prompt -> text         (stream=true: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> message    (the model's chat template)

Every error is {"error": {"message", "type", "param", "code"}}: 400 bad request (the field is named),
401 missing/wrong API key (every endpoint, when the server has one), 404/405 unknown route or method,
429 queue full (with Retry-After), 500 anything unexpected (the server keeps running).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..runtime.errors import ModelError
from .engine import Engine, Job, QueueFull
from .errors import ApiError, bad_request
from .schema import parse_chat, parse_completion

log = logging.getLogger("mxq.serve")
RETRY_AFTER_SECONDS = 1
MAX_BODY_BYTES = 16 << 20  # far more than any context's worth of text


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class ApiKeyMiddleware:
    """Pure ASGI middleware: every HTTP request needs `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.expected):
                what = "a wrong API key" if given else "no API key"
                error = ApiError(401, f"this server needs an API key in 'Authorization: Bearer <key>'; the request "
                                 f"sent {what}", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, model_id: str, api_key: str | None = None, queue_size: int = 16):
    """An ASGI app serving `model` (a LoadedModel, not shared with anyone else while served).
    app.state.engine is the Engine; its worker runs between the app's startup and shutdown."""
    engine = Engine(model, queue_size=queue_size)
    created = int(os.path.getmtime(model.path)) if os.path.exists(model.path) else int(time.time())
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "mxq",
                  "context_length": model.context_length}

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "busy": engine.running is not None,
                             "waiting": engine.waiting, "queue_size": engine.queue_size,
                             "tokens_generated": engine.tokens_generated})

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card]})

    async def one_model(request):
        if request.path_params["model"] != model_id:
            raise ApiError(404, f"model {request.path_params['model']!r} is not served here (serving "
                           f"{model_id!r})", param="model", code="model_not_found")
        return JSONResponse(model_card)

    async def completions(request):
        return await generate(request, parse_completion, CompletionFormat)

    async def chat_completions(request):
        return await generate(request, parse_chat, ChatFormat)

    async def generate(request, parse, shape):
        body = await read_json(request)
        params = await run_in_threadpool(parse, body, model)  # tokenizing a long prompt takes a while
        job = Job(params, loop=asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: {engine.queue_size} requests are already waiting; retry "
                           "later", code="queue_full", kind="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        response_id = f"{shape.prefix}-{uuid.uuid4().hex}"
        head = {"id": response_id, "created": int(time.time()), "model": model_id}
        if params.stream:
            return StreamingResponse(stream_events(job, head, shape, params.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, (finish, prompt_tokens, completion_tokens) = await collect(request, job)
        return JSONResponse({**head, "object": shape.object, "choices": [shape.choice(text, finish)],
                             "usage": usage(prompt_tokens, completion_tokens)})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


# -- request and response helpers ------------------------------------------------------------------
async def read_json(request: Request):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB",
                           code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise bad_request(f"the request body is not valid JSON: {' '.join(str(error).split())[:200]}") from None
    except RecursionError:  # e.g. 100000 nested arrays: the decoder recurses per level
        raise bad_request("the request body is not valid JSON: nested too deeply") from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionFormat:
    """How /v1/completions shapes a choice (whole answer) and a delta (one streamed chunk)."""
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def choice(text, finish):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def delta(text, finish=None):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


class ChatFormat:
    """How /v1/chat/completions shapes a choice and a delta (the first delta carries the role)."""
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(text, finish):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def delta(text, finish=None, first=False):
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def events(job: Job):
    """The job's events up to and including its end; a runtime failure is raised here."""
    while True:
        event = await job.events.get()
        if event[0] == "error":
            error = event[1]
            if isinstance(error, ModelError):
                raise bad_request(str(error))
            raise error
        yield event
        if event[0] == "done":
            return


async def collect(request: Request, job: Job):
    """Wait for the whole text; cancel the job if the client disconnects meanwhile."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    pieces = []
    try:
        async for event in events(job):
            if event[0] == "text":
                pieces.append(event[1])
            else:
                return "".join(pieces), event[1:]
    finally:
        watcher.cancel()
        job.cancel()  # no-op when done; stops the worker if this handler fails or is cancelled


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, head: dict, shape, include_usage: bool):
    """Server-sent events; Starlette cancels this generator when the client disconnects, and the
    `finally` cancels the job, so the worker stops at the next token."""
    chunk = {**head, "object": shape.chunk_object}
    try:
        if shape is ChatFormat:
            yield sse({**chunk, "choices": [shape.delta("", first=True)]})
        async for event in events(job):
            if event[0] == "text":
                yield sse({**chunk, "choices": [shape.delta(event[1])]})
            else:
                finish, prompt_tokens, completion_tokens = event[1:]
                yield sse({**chunk, "choices": [shape.delta("", finish)]})
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    except ApiError as error:  # the status line is sent already: the error goes in the stream
        yield sse(error.body())
    except Exception:  # noqa: BLE001 - same, for unexpected failures
        log.exception("generation failed")
        yield sse(ApiError(500, "internal server error while generating", kind="server_error").body())
    finally:
        job.cancel()


# -- exception handlers ----------------------------------------------------------------------------
async def api_error(request, error: ApiError):
    return error_response(error)


async def http_error(request, error: HTTPException):
    messages = {404: f"no route {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}
    message = messages.get(error.status_code, str(error.detail))
    return error_response(ApiError(error.status_code, message, headers=error.headers))


async def internal_error(request, error: Exception):
    return error_response(ApiError(500, f"internal server error: {type(error).__name__}", kind="server_error"))
