"""Short text for people: durations, first lines of messages, counted nouns.

The building blocks that `worker.cli_render` (whole commands' output) and `worker.diagnosis`
(one-line reasons) share, so that a duration or a truncated error reads the same everywhere.
"""

from __future__ import annotations

from datetime import timedelta


def duration(value: timedelta | float) -> str:
    """A short human duration: 850ms, 12.3s, 4m05s, 2h03m, 3d04h."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def first_line(text: str | None, limit: int) -> str:
    """The first line of `text`, cut to `limit` characters with an ellipsis ("" for none)."""
    if not text or not text.strip():
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def counted(n: int, noun: str) -> str:
    """`1 attempt`, `3 attempts`: English plurals by adding an s."""
    return f"{n} {noun}{'s' if n != 1 else ''}"
