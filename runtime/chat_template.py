"""Rendering a chat template taken from a file: jinja2's immutable sandbox plus cost limits.

A template is code from the file. The sandbox stops it reaching Python internals; the limits below
stop it hanging or allocating gigabytes (`{{ 'a' * 1000000000 }}`, nested `range` loops, a string
doubled in a loop):

  - every operator, call and filter that can build a large value in ONE step (`*`, `+`, `%`, `**`,
    `~`, str.join/replace/center/..., filters with widths) is checked BEFORE it runs: the result
    may hold at most MAX_VALUE_CHARS characters (nested lists count their items' text);
  - the rendered text may be at most MAX_OUTPUT_CHARS characters;
  - while rendering, a trace function counts Python steps (loop iterations, macro calls, filter
    code) and checks the clock and the process's resident memory: more than MAX_STEPS steps,
    MAX_SECONDS seconds or MAX_MEMORY_GROWTH bytes ends the render.
Any failure of the template is a TemplateError whose message is one line.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time
from datetime import datetime

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.runtime import str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_VALUE_CHARS = 4 << 20
MAX_OUTPUT_CHARS = 4 << 20
MAX_INT_BITS = 4096
MAX_STEPS = 5_000_000
MAX_SECONDS = 5.0
MAX_MEMORY_GROWTH = 512 << 20
MAX_JSON_INDENT = 16
REMOVED_FILTERS = ("wordwrap", "urlize", "pprint")  # slow pure-Python text processing, unused by chat templates
CHECK_EVERY = 256  # steps between clock/memory checks


class TemplateError(Exception):
    """The chat template failed or exceeded a limit (one-line message)."""


def _size(value, memo=None) -> int:
    """About how many characters str(value) has, without building it (shared items counted once
    per occurrence, computed once)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (bool, float)) or value is None:
        return 8
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        memo = {} if memo is None else memo
        key = id(value)
        if key not in memo:
            memo[key] = 0  # a container that holds itself counts as empty inside
            items = list(value.items()) if isinstance(value, dict) else value
            total = 2
            for item in items:
                if isinstance(value, dict):
                    total += _size(item[0], memo) + _size(item[1], memo) + 4
                else:
                    total += _size(item, memo) + 2
                if total > MAX_VALUE_CHARS * 4:  # enough to know it is too large
                    break
            memo[key] = total
        return memo[key]
    return 16


def _limit(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise TemplateError(f"{what} would build a value of about {size:,} characters (limit {MAX_VALUE_CHARS:,})")


def _check_number_args(args, kwargs, what: str) -> None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_VALUE_CHARS:
            raise TemplateError(f"{what}: argument {value if value.bit_length() < 64 else '(huge)'} is too large")


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(text: str) -> None:
    for width, precision in _PERCENT_FIELD.findall(text):
        for number in (width, precision):
            if number == "*" or (number and int(number) > MAX_VALUE_CHARS):
                raise TemplateError("'%' formatting with a huge or '*' width is not allowed")


_BRACE_WIDTH = re.compile(r"\d{8,}")


def _predict_call(owner: str, name: str, args: tuple, kwargs: dict) -> None:
    """Size checks for the str methods that can grow a string a lot in one call."""
    if name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else None
        if items is not None:
            _limit(len(owner) * max(len(items) - 1, 0) + _size(items), "str.join")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        _limit(len(owner) + count * len(args[1]), "str.replace")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _limit(len(owner) * max(tab, 1), "str.expandtabs")
    elif name in ("format", "format_map") and _BRACE_WIDTH.search(owner):
        raise TemplateError("str.format with a huge width is not allowed")


class _Budget:
    """Counts traced Python steps; checks time and resident memory every CHECK_EVERY steps."""

    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.rss_start = _rss()

    def tick(self) -> None:
        self.steps += 1
        if self.steps % CHECK_EVERY:
            return
        if self.steps > MAX_STEPS:
            raise TemplateError(f"took more than {MAX_STEPS:,} steps (a loop or recursion too long)")
        if time.monotonic() > self.deadline:
            raise TemplateError(f"took more than {MAX_SECONDS:g} seconds")
        if self.rss_start is not None and (_rss() or 0) - self.rss_start > MAX_MEMORY_GROWTH:
            raise TemplateError(f"used more than {MAX_MEMORY_GROWTH >> 20} MiB of memory")

    def trace(self, frame, event, arg):
        self.tick()
        return self.trace


def _rss():
    """Resident bytes of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b ~ ...`: size-checked before the strings are built
        self.write("environment.checked_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=self._finalize)
        self.budget = None
        self.output_chars = 0
        self.globals.pop("lipsum", None)
        for name in REMOVED_FILTERS:
            self.filters.pop(name, None)
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._bounded_filter("tojson", _tojson)
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:256])

    # -- checks applied by compiled template code --------------------------------------------------
    def _tick(self):
        if self.budget is not None:
            self.budget.tick()

    def _finalize(self, value):
        size = _size(value)
        self.output_chars += size
        if self.output_chars > MAX_OUTPUT_CHARS:
            raise TemplateError(f"output exceeds {MAX_OUTPUT_CHARS:,} characters")
        return value

    def concat(self, parts):  # joins macro, call-block and set-block output in compiled code
        parts = list(parts)
        _limit(sum(len(p) if isinstance(p, str) else _size(p) for p in parts), "block output")
        return "".join(parts)

    def checked_concat(self, parts):
        memo = {}
        _limit(sum(_size(p, memo) for p in parts), "'~'")
        return str_join(parts)

    def call_binop(self, context, operator, left, right):
        self._tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > MAX_INT_BITS:
                raise TemplateError(f"'**' would build an integer of more than {MAX_INT_BITS} bits")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise TemplateError(f"'*' would build an integer of more than {MAX_INT_BITS} bits")
            elif isinstance(right, int) and not isinstance(left, (int, float)):
                _limit(_size(left) * max(right, 0), "'*'")
            elif isinstance(left, int) and not isinstance(right, (int, float)):
                _limit(_size(right) * max(left, 0), "'*'")
        elif operator == "+" and not isinstance(left, (int, float)):
            memo = {}
            _limit(_size(left, memo) + _size(right, memo), "'+'")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left)
        result = super().call_binop(context, operator, left, right)
        if operator == "%" and isinstance(result, str):
            _limit(len(result), "'%'")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        __self._tick()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        name = getattr(target, "__name__", "call")
        _check_number_args(args, kwargs, name)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _predict_call(owner, name, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _limit(_size(result), name)
        return result

    def _bounded_filter(self, name, function):
        @functools.wraps(function)
        def bounded(*args, **kwargs):
            self._tick()
            skip = 2 if getattr(function, "jinja_pass_arg", None) is not None else 1
            _check_number_args(args[skip:], kwargs, f"filter {name}")
            value = args[skip - 1] if len(args) >= skip else None
            if name == "join" and isinstance(value, (list, tuple)):
                separator = args[skip] if len(args) > skip else kwargs.get("d", "")
                _limit(_size(value) + _size(separator) * len(value), "filter join")
            elif name == "indent" and isinstance(value, str):
                width = args[skip] if len(args) > skip else kwargs.get("width", 4)
                _limit(len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))),
                       "filter indent")
            elif name == "replace" and isinstance(value, str) and len(args) > skip + 1:
                _predict_call(value, "replace", tuple(str(a) for a in args[skip: skip + 2]), {})
            elif name == "format" and isinstance(value, str):
                _check_percent_format(value)
            result = function(*args, **kwargs)
            if isinstance(result, (str, list, tuple)):
                _limit(_size(result), f"filter {name}")
            return result

        return bounded

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, source: str, **variables) -> str:
        """Render `source` with `variables`; TemplateError on any failure or exceeded limit."""
        self.budget, self.output_chars = _Budget(), 0
        previous = sys.gettrace()
        sys.settrace(self.budget.trace)
        try:
            pieces, total = [], 0
            for piece in self.from_string(source).generate(**variables):
                total += len(piece)
                if total > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"output exceeds {MAX_OUTPUT_CHARS:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        except TemplateError:
            raise
        except jinja2.TemplateError as error:
            raise TemplateError(_one_line(error)) from None
        except MemoryError:
            raise TemplateError("ran out of memory") from None
        except RecursionError:
            raise TemplateError("recursion too deep") from None
        except Exception as error:  # noqa: BLE001 - anything the file's template code raises is the file's fault
            raise TemplateError(f"{type(error).__name__}: {_one_line(error)}") from None
        finally:
            sys.settrace(previous)
            self.budget = None


def _tojson(value, indent=None, **kwargs):
    """transformers' tojson (ensure_ascii=False), with a small indent cap."""
    import json

    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= MAX_JSON_INDENT):
        raise TemplateError(f"tojson indent must be an integer in [0, {MAX_JSON_INDENT}]")
    allowed = {k: v for k, v in kwargs.items() if k in ("separators", "sort_keys")}
    return json.dumps(value, ensure_ascii=False, indent=indent, **allowed)


def _one_line(error) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _raise_exception(message):
    """What HF chat templates call to reject a conversation."""
    raise TemplateError(_one_line(message))


def render_chat_template(source: str, **variables) -> str:
    """The chat template `source` rendered with `variables` (messages, bos_token, ...) under the
    limits above; TemplateError (one line) on failure."""
    environment = BoundedEnvironment()
    environment.globals["raise_exception"] = _raise_exception
    return environment.render(source, **variables)
