"""Caps on what a reader accepts from a cache: no input may cost unbounded memory or time.

A cache may come from a shared bucket written by someone else, or be damaged. Every size and
nesting the readers meet is capped before it is read or parsed; a value past its cap is an error
naming the file (and member), never a gigabyte allocation or a RecursionError. The defaults are
far above what precompute writes (a 3M-sample manifest is ~100 MB; a sample's JSON a few KB);
each can be raised with an environment variable (a size like `512MiB`, see `shards.units`):

| variable | default | what |
|---|---|---|
| SHARDS_MAX_MANIFEST_BYTES | 512MiB | manifest.json |
| SHARDS_MAX_RECORD_BYTES | 64MiB | records/shard-*.json, identity.json |
| SHARDS_MAX_TENSOR_MEMBER_BYTES | 256MiB | a sample's .safetensors member; empty_prompt.safetensors |
| SHARDS_MAX_PNG_MEMBER_BYTES | 64MiB | a sample's .cond.png member (its pixel size is checked from the header) |
| SHARDS_MAX_JSON_MEMBER_BYTES | 1MiB | a sample's .json member |
| SHARDS_MAX_JSON_DEPTH | 64 | nesting of any JSON document the tool reads |
| SHARDS_MAX_IMAGE_PIXELS | 64000000 | a cache's image size (resolution or bucket, h x w): what one conditioning image may decode to |
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import numpy as np

from .errors import ShardError
from .units import parse_size

_DEFAULTS = {
    "SHARDS_MAX_MANIFEST_BYTES": "512MiB",
    "SHARDS_MAX_RECORD_BYTES": "64MiB",
    "SHARDS_MAX_TENSOR_MEMBER_BYTES": "256MiB",
    "SHARDS_MAX_PNG_MEMBER_BYTES": "64MiB",
    "SHARDS_MAX_JSON_MEMBER_BYTES": "1MiB",
}
DEFAULT_MAX_JSON_DEPTH = 64
# An image size a cache may declare (its resolution or any bucket): 8000 x 8000, far above SDXL's
# largest bucket at 4096 px (about 17 MP). Every conditioning image is checked against the cache's
# geometry from its PNG header before it is decoded; this bounds the geometry itself.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_CHUNK = 16 << 20  # bytes scanned per numpy pass: bounded memory for any document


class LimitError(ShardError, ValueError):
    """Something is larger or deeper than its cap; the message names it, the cap and the variable."""


def cap(variable: str) -> int:
    """The byte cap named by `variable` (environment, else the default). A value that is not a
    size is a LimitError naming the variable (a message, like every cache problem)."""
    raw = os.environ.get(variable) or _DEFAULTS[variable]
    try:
        return parse_size(raw, variable)
    except ValueError as e:
        raise LimitError(str(e)) from None


def max_json_depth() -> int:
    return _whole("SHARDS_MAX_JSON_DEPTH", DEFAULT_MAX_JSON_DEPTH)


def _whole(variable: str, default: int) -> int:
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LimitError(f"{variable}={raw!r} is not a whole number") from None
    if value < 1:
        raise LimitError(f"{variable} must be >= 1, got {value}")
    return value


def max_image_pixels() -> int:
    """The largest image size (h x w) a cache may declare (SHARDS_MAX_IMAGE_PIXELS)."""
    return _whole("SHARDS_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def oversized_images(sizes) -> tuple[int, list[tuple[int, int]]]:
    """(the cap, the distinct (h, w) of `sizes` over it, sorted): what writers refuse to declare
    and readers refuse to believe. LimitError for a cap set to nonsense."""
    limit = max_image_pixels()
    return limit, sorted({(int(h), int(w)) for h, w in sizes if h * w > limit})


def too_big(what: str, variable: str, size: int | None = None) -> LimitError:
    """The error for `what` over its cap `variable` (`size` when known; a stream stopped past the
    cap knows only that)."""
    is_ = f"is {size} bytes," if size is not None else "is"
    return LimitError(f"{what} {is_} over the {cap(variable)}-byte limit ({variable}): damaged or hostile; "
                      f"raise {variable} if it is genuine")


def check_size(size: int, variable: str, what: str) -> None:
    if size > cap(variable):
        raise too_big(what, variable, size)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without parsing it
    (strings, which may hold brackets, are skipped first), in linear time and memory."""
    bare = _STRING.sub(b'""', data)
    deepest = level = 0
    for start in range(0, len(bare), _CHUNK):
        arr = np.frombuffer(bare, dtype=np.uint8, count=min(_CHUNK, len(bare) - start), offset=start)
        step = ((arr == 91) | (arr == 123)).astype(np.int32) - ((arr == 93) | (arr == 125)).astype(np.int32)  # [{ ]}
        running = np.cumsum(step) + level
        if running.size:
            deepest = max(deepest, int(running.max()))
            level = int(running[-1])
    return deepest


def loads(data: bytes, what: str, variable: str | None = None) -> Any:
    """json.loads with the size cap `variable` (if given) and the depth cap checked first.
    Raises LimitError for a cap, json.JSONDecodeError for bad JSON (a number too long to convert
    included), UnicodeDecodeError for text that is not UTF-8."""
    if variable is not None:
        check_size(len(data), variable, what)
    depth, limit = json_depth(data), max_json_depth()
    if depth > limit:
        raise LimitError(f"{what} nests {depth} levels deep, over the limit of {limit} (SHARDS_MAX_JSON_DEPTH): "
                         "damaged or hostile")
    text = data.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer of more digits than Python converts
        raise json.JSONDecodeError(f"a number of over {sys.get_int_max_str_digits()} digits", text, 0) from None


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_JSON_DEPTH", "LimitError", "cap", "check_size", "json_depth", "loads",
           "max_image_pixels", "max_json_depth", "oversized_images", "too_big"]
