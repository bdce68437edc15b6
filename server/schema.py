"""Request bodies of /v1/completions and /v1/chat/completions → validated generation parameters.

The rules, one place:
- Types are strict JSON types ("5" is not an integer, true is not a number, NaN is not a number);
  every violation is a 400 whose message and `param` name the field.
- Fields this server does not know are ignored (clients send many optional ones, e.g. `user`).
- OpenAI fields it knows but does not implement (n, best_of, echo, logprobs, penalties, logit_bias,
  suffix, tools, response_format ...) are accepted only at their "off" value and rejected with a 400
  naming the field otherwise: never silently ignored when they would change the output.
- `model` may be any string: the server has one model and reports its own id in responses.
- temperature defaults to 1.0 as in the OpenAI API (0 = greedy); top_k is an extension (0/absent = off).
- max_tokens defaults to 16 for completions (OpenAI's default) and to the rest of the context for chat;
  prompt tokens + max_tokens must fit in the model's context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..runtime.errors import ModelError
from .errors import bad_request

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # OpenAI takes 4 stop sequences; a long list stalled every request

OFF_VALUES = {  # implemented only when off: field -> the values that mean "off"
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "suffix": ("",),
    "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},),
}


@dataclass
class GenerationRequest:
    ids: list  # prompt token ids
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with token usage


def json_type(value) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_integer(value) or isinstance(value, float)) and math.isfinite(value)


class Body:
    """Typed reads of one JSON object's fields; absent and null both mean "use the default"."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {json_type(body)}")
        self.body = body

    def _get(self, name, ok, what):
        value = self.body.get(name)
        if value is not None and not ok(value):
            raise bad_request(f"'{name}' must be {what}, got {json_type(value)} {_short(value)}", name)
        return value

    def integer(self, name, default=None, minimum=None):
        value = self._get(name, is_integer, "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise bad_request(f"'{name}' must be >= {minimum}, got {value}", name)
        return default if value is None else value

    def number(self, name, default, low, high, low_open=False):
        value = self._get(name, is_number, "a finite number")
        if value is None:
            return default
        if value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise bad_request(f"'{name}' must be in {interval}, got {value}", name)
        return float(value)

    def boolean(self, name, default=False):
        value = self._get(name, lambda v: isinstance(v, bool), "a boolean")
        return default if value is None else value

    def stop(self) -> list:
        value = self._get("stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(
            isinstance(s, str) for s in v)), "a string or an array of strings")
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):  # each is scanned per token
            raise bad_request(f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters, "
                              f"got {len(stops)} (longest {max(map(len, stops))})", "stop")
        return stops

    def reject_unsupported(self) -> None:
        for name, off in OFF_VALUES.items():
            value = self.body.get(name)
            if value is None or any(type(value) is type(o) and value == o for o in off):
                continue
            hint = "this server returns one choice per request" if name in ("n", "best_of") else "not supported"
            raise bad_request(f"'{name}' {_short(value)} is not supported ({hint}); omit it or send "
                              f"{off[0]!r}", name, code="unsupported_parameter")


def parse_completion(body, model) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a string, an array of token ids, or an array of one of those."""
    r = Body(body)
    prompt = r.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = _encode(model, prompt, "prompt")
    elif isinstance(prompt, list) and all(is_integer(i) for i in prompt):
        vocab = model.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"'prompt' token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(f"'prompt' is an array of {len(prompt)} prompts; this server takes one prompt "
                          "per request", "prompt")
    else:
        raise bad_request(f"'prompt' must be a string or an array of token ids, got {json_type(prompt)}",
                          "prompt")
    return _generation(r, ids, model.context_length, "prompt", "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)


def parse_chat(body, model) -> GenerationRequest:
    """POST /v1/chat/completions: `messages` rendered with the model's chat template."""
    r = Body(body)
    messages = r.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"'messages' must be a non-empty array of messages, got {json_type(messages)}",
                          "messages")
    rendered = [_message(m, i) for i, m in enumerate(messages)]
    if model.tokenizer.chat_template is None:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    try:
        text = model.tokenizer.render_chat(rendered)
    except ModelError as error:
        raise bad_request(str(error), "messages") from None
    ids = _encode(model, text, "messages", add_bos=False)  # templates write BOS themselves
    field = "max_completion_tokens" if r.body.get("max_completion_tokens") is not None else "max_tokens"
    return _generation(r, ids, model.context_length, "messages", field, None)


def _encode(model, text: str, field: str, add_bos=None) -> list:
    """The text's token ids; text the tokenizer refuses (not valid UTF-8: a lone surrogate such as "\\udcff"
    in the JSON) or fails on (a hostile tokenizer) is a 400 naming the field."""
    try:
        return model.tokenizer.encode(text, add_bos=add_bos)
    except ModelError as error:
        raise bad_request(str(error), field) from None


def _message(message, index) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object, got {json_type(message)}", where)
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise bad_request(f"'{where}.role' must be a string, got {json_type(role)}", f"{where}.role")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                                  "...}: this model reads text only", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                          f"{json_type(content)}", f"{where}.content")
    return {"role": role, "content": content}


def _generation(r: Body, ids, context, prompt_field, max_field, default_max) -> GenerationRequest:
    """Checks the sampling fields, then that prompt + max_tokens fit in `context` tokens."""
    r.reject_unsupported()
    options = r.body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"'stream_options' must be an object, got {json_type(options)}", "stream_options")
    request = GenerationRequest(
        ids=ids,
        max_tokens=r.integer(max_field, minimum=1),
        temperature=r.number("temperature", 1.0, 0.0, 2.0),
        top_p=r.number("top_p", None, 0.0, 1.0, low_open=True),
        top_k=r.integer("top_k", minimum=0) or None,
        seed=r.integer("seed", minimum=0),
        stop=r.stop(),
        stream=r.boolean("stream"),
        include_usage=Body(options or {}).boolean("include_usage"),
    )
    if not ids:
        raise bad_request(f"'{prompt_field}' is empty (no tokens) and the model adds no BOS token", prompt_field)
    room = context - len(ids)
    if room <= 0:
        raise bad_request(f"'{prompt_field}' has {len(ids)} tokens; the model's context is {context} tokens, "
                          "leaving no room to generate", prompt_field, code="context_length_exceeded")
    if request.max_tokens is None:
        request.max_tokens = min(default_max or room, room)
    elif request.max_tokens > room:
        raise bad_request(f"'{max_field}' is {request.max_tokens}, but the prompt has {len(ids)} tokens and the model's "
                          f"context is {context}: at most {room} new tokens fit", max_field,
                          code="context_length_exceeded")
    return request


def _short(value, limit=40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
