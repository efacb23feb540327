"""arq job (de)serialisation: JSON on both sides. Pickle is never accepted.

arq's default is pickle, which would let anyone who can write to Redis run code in the worker.
The deserializer also checks the job's shape: arq itself assumes a well-formed job and a few
malformed values (an unhashable function name, a non-numeric try count) would otherwise crash
its poll loop instead of failing one job.
"""

from __future__ import annotations

import json
from typing import Any

# arq turns the enqueue time into a datetime outside its error handling: out of range, it would
# end the poll loop.
MAX_ENQUEUE_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class MalformedJobError(ValueError):
    """The bytes in Redis are not a tasklane/arq job."""


def serialize(data: dict[str, Any]) -> bytes:
    # default=str: arq serialises failed-job results holding exception objects; keep them readable.
    return json.dumps(data, default=str, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    if raw[:1] == b"\x80":
        raise MalformedJobError("pickle payload refused: tasklane jobs are JSON")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJobError(f"job is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedJobError("job is not a JSON object")
    _expect(data, "f", str)
    _expect(data, "a", list)
    _expect(data, "k", dict)
    _expect(data, "et", int, MAX_ENQUEUE_TIME_MS)
    if data.get("t") is not None:
        _expect(data, "t", int)
    return data


def _expect(data: dict[str, Any], key: str, kind: type, maximum: int | None = None) -> None:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedJobError(f"job field {key!r} must be {kind.__name__}, got {value!r:.80}")
    if maximum is not None and isinstance(value, int) and not 0 <= value <= maximum:
        raise MalformedJobError(f"job field {key!r} must be within 0…{maximum}, got {value!r:.40}")
