"""Logging: structlog, one JSON object per line (a console renderer on a TTY), secrets redacted.

Library logs (arq, SQLAlchemy, asyncpg, our persistence layer, which uses the standard library)
go through the same processors, so every line has the same shape and the same redaction. Lines
written while a task runs carry task_id, agent_id, attempt and worker_id from contextvars.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"pass(word|wd)?$|^pwd$|token|secret|api[_-]?key|authorization|credential|dsn", re.I
)
# user:password@ in any URL
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)@", re.I)
# password=…, token: …, secret='…' in free text (reprs, messages)
_KEY_VALUE = re.compile(
    r"(?P<prefix>\b(?:password|passwd|pwd|token|secret|api_key)['\"]?\s*[=:]\s*['\"]?)"
    r"(?P<secret>[^'\"\s,;&)}]+)",
    re.I,
)


def redact_text(text: str) -> str:
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<prefix>{REDACTED}@", text)
    return _KEY_VALUE.sub(rf"\g<prefix>{REDACTED}", text)


def redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > 5:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, depth + 1) for v in value)
    return value


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if _SECRET_KEY.search(key):
            event[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple):
            event[key] = redact(value)
    return event


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
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
        structlog.processors.format_exc_info if fmt == "json" else _noop,
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


def _noop(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    return event


def get_logger(name: str = "tasklane") -> Any:
    return structlog.get_logger(name)
