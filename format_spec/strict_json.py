"""Strict, cost-bounded JSON parsing for metadata read from untrusted files (SPEC.md §3).

Python's json module accepts NaN/Infinity, lets a duplicate key silently win, and turns 3 bytes of
`{},` into a 64-byte dict: a 63 MB `[{},{},…]` costs gigabytes. `loads` counts containers, values
and nesting depth with a cheap byte-level pre-scan BEFORE building any Python object, then parses
with NaN/Infinity, non-finite numbers, duplicate keys and lone surrogates rejected.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

MAX_DEPTH = 64  # objects/arrays nested deeper than this are rejected
MAX_VALUES = 1 << 20  # containers + scalars in one document (a 1,000-tensor model needs ~60,000)

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = np.zeros(256, dtype=np.int8)
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1


class JsonError(ValueError):
    """The text is not JSON this reader accepts; the message says why (one line)."""


def prescan(raw: bytes, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Bound the cost of parsing `raw` without parsing it: strings are blanked out, then
    values <= commas + containers + 1 and depth = the running maximum of bracket balance."""
    skeleton = _STRING.sub(b'""', raw)
    containers = skeleton.count(b"[") + skeleton.count(b"{")
    values = skeleton.count(b",") + containers + 1
    if values > max_values:
        raise JsonError(f"has about {values:,} values (cap {max_values:,})")
    if containers:
        steps = _BRACKETS[np.frombuffer(skeleton, dtype=np.uint8)]
        steps = steps[steps != 0]
        depth = int(np.cumsum(steps, dtype=np.int32).max())
        if depth > max_depth:
            raise JsonError(f"nests {depth} levels deep (cap {max_depth})")


def _constant(name):
    raise JsonError(f"contains {name}, which JSON does not allow")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"number {text[:40]} is out of range")
    return value


def _object(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonError(f"key {key[:60]!r} appears twice in one object")
            seen.add(key)
    return result


def _check_strings(value) -> None:
    """Lone surrogates (\\ud800) parse into Python str but cannot be encoded again."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise JsonError(f"string {item[:40]!r} holds an unpaired surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(raw: bytes, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES):
    """Parse UTF-8 JSON bytes strictly; raises JsonError (a ValueError) with a one-line reason."""
    prescan(raw, max_depth, max_values)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonError(f"is not UTF-8 (byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite, object_pairs_hook=_object)
    except JsonError:
        raise
    except (ValueError, RecursionError) as error:  # json.JSONDecodeError, int digit limit, depth
        raise JsonError(f"does not parse: {' '.join(str(error).split())[:100]}") from None
    _check_strings(value)
    return value
