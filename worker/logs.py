"""Logging: structlog, one JSON object per line (a console renderer on a TTY), secrets redacted.

Library logs (arq, SQLAlchemy, asyncpg, our persistence layer, which uses the standard library)
go through the same processors, so every line has the same shape and the same redaction. Lines
written while a task runs carry task_id, agent_id, attempt and worker_id from contextvars.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.redaction import REDACTED, is_secret_key, redact, redact_text
from worker.tracing import current_ids as current_trace_ids  # observability

# Containers nested deeper than this in a log event print as a marker: the line stays renderable
# (json.dumps recurses), and nothing below the cut can print a secret.
LOG_MAX_DEPTH = 100
_PLAIN = (str, int, float, bool, type(None))


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Redact every value of the event (the exception already rendered to text). Values that
    are not plain data become their redacted repr: that is what the renderers would print."""
    for key, value in event.items():
        if is_secret_key(key):
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = redact_text(value)
        elif not isinstance(value, _PLAIN):
            event[key] = redact(value, stringify=True, max_depth=LOG_MAX_DEPTH)
    return event


def add_trace_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """trace_id and span_id of the current OpenTelemetry span, if any (worker/tracing.py)."""
    ids = current_trace_ids()
    if ids is not None:
        event["trace_id"], event["span_id"] = ids
    return event


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,  # observability
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


class _Output:
    stream: TextIO = sys.stderr


class _LineLogger:
    """What structlog's loggers write through: one write per rendered line, to the stream that
    `configure_logging` chose last (structlog caches loggers, the stream may change later), with
    the name `add_logger_name` reads."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        stream = _Output.stream
        stream.write(message + "\n")
        stream.flush()

    debug = info = warning = warn = error = critical = exception = msg


def _line_logger(*args: Any) -> _LineLogger:
    return _LineLogger(str(args[0]) if args else "tasklane")


def configure_logging(
    *, fmt: str | None = None, level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's root logger. Safe to call again.

    structlog's loggers (ours) render straight to the stream; the standard library's (arq,
    SQLAlchemy, our persistence layer) go through a handler whose formatter runs the same
    processors. Our own lines skip the standard library's record, handler and formatter (two
    lines per task); bench/run.py could not tell the difference from its noise, the code path
    is simply shorter.
    """
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    final: list[Processor] = [
        # Both renderers get the traceback as text, after redaction: the console renderer's own
        # exception formatting would print it unredacted (with rich installed, with locals).
        structlog.processors.format_exc_info,
        redact_secrets,
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False),
    ]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    _Output.stream = stream
    structlog.configure(
        processors=[*_shared_processors(), *final],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_line_logger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # arq logs every job start and end at INFO: one line per job is ours to write, not arq's.
    logging.getLogger("arq.worker").setLevel(max(numeric_level, logging.WARNING))


def get_logger(name: str = "tasklane") -> Any:
    return structlog.get_logger(name)
