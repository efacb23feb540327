"""Logging: every line is one JSON object with the same shape and the same redaction, whether
it comes from structlog (ours) or the standard library (arq, SQLAlchemy, persistence)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.support.cli import logging_restored
from tests.support.secrets import Secret, secret_structures, secret_texts
from worker.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_lines_share_shape_and_redaction() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=out)

    structlog.get_logger("tasklane.worker").info(
        "task.started", api_key="k-123", url="postgresql://app:hunter2@db/x"
    )
    logging.getLogger("persistence.store").warning("claim failed: password=hunter2")

    ours, library = lines(out)
    assert ours["event"] == "task.started"
    assert ours["logger"] == "tasklane.worker"
    assert ours["level"] == "info"
    assert ours["api_key"] == "***"
    assert ours["url"] == "postgresql://app:***@db/x"
    assert library["logger"] == "persistence.store"
    assert library["level"] == "warning"
    assert library["event"] == "claim failed: password=***"
    assert "hunter2" not in out.getvalue()
    assert {"timestamp"} <= ours.keys() & library.keys()


def test_level_filters_both_kinds_of_logger() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="WARNING", stream=out)

    structlog.get_logger("tasklane.worker").info("quiet")
    logging.getLogger("persistence.store").info("quiet too")
    structlog.get_logger("tasklane.worker").warning("loud")

    assert [line["event"] for line in lines(out)] == ["loud"]


def test_a_logger_made_before_reconfiguring_writes_to_the_new_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", stream=first)
    log = structlog.get_logger("tasklane.client")
    log.info("one")  # cached on first use
    configure_logging(fmt="json", stream=second)
    log.info("two")

    assert [line["event"] for line in lines(first)] == ["one"]
    assert [line["event"] for line in lines(second)] == ["two"]


def test_exceptions_are_rendered_into_the_line() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        structlog.get_logger("tasklane.worker").warning("handler.raised", exc_info=exc)

    (line,) = lines(out)
    assert "ValueError: boom" in line["exception"]


def test_task_context_is_bound_to_lines_written_while_it_runs() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", stream=out)
    structlog.contextvars.bind_contextvars(task_id="t-1")
    try:
        structlog.get_logger("tasklane.worker").info("inside")
        logging.getLogger("arq.jobs").warning("library inside")
    finally:
        structlog.contextvars.unbind_contextvars("task_id")

    assert [line.get("task_id") for line in lines(out)] == ["t-1", "t-1"]


# -- secrets never print --------------------------------------------------------------------------


def _raise_chained(outer: str, inner: str) -> BaseException:
    """An exception whose text, and whose cause's text, carry `outer` and `inner`."""
    try:
        try:
            raise KeyError(inner)
        except KeyError as cause:
            raise RuntimeError(outer) from cause
    except RuntimeError as exc:
        return exc


@hypothesis_settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drawn=secret_texts(),
    structure=secret_structures(),
    fmt=st.sampled_from(["json", "console"]),
)
def test_no_secret_reaches_a_log_line_in_either_renderer(
    drawn: tuple[Secret, str], structure: tuple[Secret, Any], fmt: str
) -> None:
    """A secret as the message, as a field, in a nested field, in an object's repr, in an
    exception's text and its cause's (the traceback), through structlog and the standard
    library's loggers."""
    (secret, text), (nested_secret, nested) = drawn, structure
    out = io.StringIO()
    configure_logging(fmt=fmt, level="INFO", stream=out)
    log = structlog.get_logger("tasklane.worker")
    error = _raise_chained(text, text)

    log.info(text, detail=text, nested=nested, obj=ValueError(text), db_password=text)
    log.warning("handler.raised", exc_info=error)
    library = logging.getLogger("persistence.store")
    library.warning("claim failed: %s", text)
    library.error("dropped", exc_info=error)

    written = out.getvalue()
    assert not secret.leaks(written), written
    assert not nested_secret.leaks(written), written
    # both chained tracebacks were written (redacted), by both loggers
    assert written.count("The above exception was the direct cause") == 2
