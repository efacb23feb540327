"""JSON payloads (task input, output and metadata) and the rules PostgreSQL's jsonb imposes.

Checked before anything is written so that a bad payload gets a clear error naming what is wrong
instead of a driver error from deep inside asyncpg.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from domain.exceptions import InvalidInputError

# A JSON value as Python holds it: dict, list, str, int, float, bool or None.
JsonValue = Any

DEFAULT_MAX_INPUT_BYTES = 256 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024

# jsonb cannot hold U+0000. In the JSON text it appears as \u0000 preceded by an even number of
# backslashes (an odd number means the backslash itself was escaped: the literal text "\u0000").
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_json(value: JsonValue, *, what: str, max_bytes: int | None = None) -> str:
    """Serialise `value` to the JSON text stored in a jsonb column, or raise InvalidInputError."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise InvalidInputError(f"{what} is nested too deeply to be stored as JSON") from None
    except ValueError as exc:  # NaN / Infinity
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    except TypeError as exc:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{what} contains a string that is not valid Unicode (a lone surrogate)"
        ) from None
    if _NUL_ESCAPE.search(text):
        raise InvalidInputError(f"{what} contains a NUL character (\\u0000), which jsonb rejects")
    if max_bytes is not None and size > max_bytes:
        raise InvalidInputError(f"{what} is {size} bytes, over the limit of {max_bytes} bytes")
    _check_keys(value, what)
    return text


def _check_keys(value: JsonValue, what: str) -> None:
    """JSON object keys are strings. json.dumps turns 1, 1.5, True and None keys into strings
    silently, so `{1: "a", "1": "b"}` would be stored as one key; refuse them instead. Runs after
    json.dumps, which has already refused cycles; iterative, since nesting may be deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise InvalidInputError(
                        f"{what} has an object key of type {type(key).__name__} "
                        f"({key!r:.40}): JSON object keys are strings"
                    )
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


@dataclass(frozen=True, slots=True)
class UnreadableJson:
    """Stands in for a stored JSON value that Python cannot load.

    jsonb holds integers longer than Python's int/str conversion limit (4300 digits) and
    nesting deeper than its recursion limit; `encode_json` never writes either, but a row
    inserted with plain SQL can. Reading such a value yields this marker instead of raising, so
    the worker fails the task with the reason and operators can still read the row.
    """

    reason: str


def decode_json(text: str | None) -> JsonValue:
    """Load JSON text read from the database; what Python cannot load becomes `UnreadableJson`."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except RecursionError:
        return UnreadableJson("nested too deeply for Python to load")
    except ValueError as exc:  # an integer over the digit limit
        return UnreadableJson(str(exc))


def storable_text(text: str, *, max_chars: int) -> str:
    """`text` as a Postgres text column holds it: NUL (which text cannot hold) and lone
    surrogates (which are not Unicode) written as escapes, and cut to `max_chars`, saying how
    much was cut. For error messages: what can be kept is kept."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - len(f"… [{len(text)} more characters cut]"), 0)
    return text[:keep] + f"… [{len(text) - keep} more characters cut]"
