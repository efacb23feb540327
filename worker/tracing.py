"""OpenTelemetry tracing, with the optional extra `tasklane[otel]`.

Producers: `TaskClient.submit` and `submit_many` run in a `tasklane.submit` span (continuing the
caller's trace, or starting one) whose W3C context is stored on each task (`tasks.trace_context`).
That happens only when the application itself uses OpenTelemetry: this module never imports it;
it looks for it in `sys.modules`, so without the extra (or with it installed and unused) a submit
costs one dictionary lookup.

Workers (TASKLANE_TRACING=otlp, or file:/abs/path for JSON lines): each run of a task is a
`tasklane.run` span continuing the task's stored context, with `claim`, `handler` and `finish`
children (worker/observe.py drives them). A subtask stores the context of the handler span that
spawned it, so its runs sit in the parent's trace. A task submitted with no trace gets its task
id as trace id, so that all its runs are still one trace. While a span is current, log lines
carry trace_id and span_id (worker/logs.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from uuid import UUID

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

P = ParamSpec("P")
R = TypeVar("R")

TRACER = "tasklane"
EXTRA_HINT = "install the tracing extra: pip install 'tasklane[otel]'"


class TracingError(RuntimeError):
    """Tracing cannot start; the message says why in one line."""


class _State:
    provider: TracerProvider | None = None  # set while this worker exports spans


def enabled() -> bool:
    """This worker process exports spans (TASKLANE_TRACING is on)."""
    return _State.provider is not None


def _otel_loaded() -> bool:
    return "opentelemetry.trace" in sys.modules


# -- producers ------------------------------------------------------------------------------------


def submit_span(
    method: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Run an async submit method in a `tasklane.submit` span when OpenTelemetry is in use."""

    @functools.wraps(method)
    async def traced(*args: P.args, **kwargs: P.kwargs) -> R:
        if not _otel_loaded():
            return await method(*args, **kwargs)
        from opentelemetry import trace

        tracer = trace.get_tracer(TRACER)
        with tracer.start_as_current_span("tasklane.submit", kind=trace.SpanKind.PRODUCER):
            return await method(*args, **kwargs)

    return traced


def carrier() -> dict[str, str] | None:
    """The current span's W3C context (traceparent, tracestate), or None without one."""
    if not _otel_loaded():
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    found: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(found)
    return found or None


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for log lines; None without one."""
    if not _otel_loaded():
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


# -- workers --------------------------------------------------------------------------------------


def check_setting(raw: str) -> str:
    """TASKLANE_TRACING: off, otlp, or file:/absolute/path."""
    value = raw.strip()
    if value.lower() in {"off", "otlp"}:
        value = value.lower()
    elif not (value.startswith("file:/") and len(value) > len("file:/")):
        raise ValueError(f"expected off, otlp or file:/absolute/path, got {raw!r:.80}")
    if value != "off" and not _sdk_installed():
        raise ValueError(f"{value} needs OpenTelemetry: {EXTRA_HINT}")
    return value


def _sdk_installed() -> bool:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def start(setting: str) -> None:
    """Export this worker's spans as TASKLANE_TRACING says (`check_setting` validated it)."""
    if setting == "off" or enabled():
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
            SpanExporter,
        )
    except ImportError as exc:
        raise TracingError(f"TASKLANE_TRACING={setting} needs OpenTelemetry: {EXTRA_HINT}") from exc
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "tasklane-worker"}
    provider = TracerProvider(resource=Resource.create(attributes))
    if setting == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* say where
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        path = setting.removeprefix("file:")
        try:
            out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open
        except OSError as exc:
            raise TracingError(f"TASKLANE_TRACING: cannot write {path}: {exc.strerror}") from None
        exporter = ConsoleSpanExporter(
            out=out, formatter=lambda span: json.dumps(json.loads(span.to_json())) + "\n"
        )
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _State.provider = provider


def stop() -> None:
    provider, _State.provider = _State.provider, None
    if provider is not None:
        provider.shutdown()  # flushes what the batch processor holds


class RunSpans:
    """The spans of one run: `tasklane.run` and its current step (claim, handler, finish)."""

    def __init__(self, task: Any, claim_started_ns: int | None) -> None:
        from opentelemetry import context, trace

        self._context = context
        self.tracer = tracer = trace.get_tracer(TRACER)
        parent = _parent_context(task.trace_context, task.id)
        start = claim_started_ns or time.time_ns()
        self.run: Span = tracer.start_span(
            "tasklane.run", context=parent, kind=trace.SpanKind.CONSUMER, start_time=start
        )
        self.run.set_attributes(
            {
                "tasklane.task_id": str(task.id),
                "tasklane.agent": task.agent_id,
                "tasklane.queue": task.queue,
                "tasklane.attempt": task.attempts,
                "tasklane.run": task.runs,
                "tasklane.parent_task_id": str(task.parent_task_id or ""),
            }
        )
        self._in_run = trace.set_span_in_context(self.run)
        if claim_started_ns is not None:
            claim = tracer.start_span("claim", context=self._in_run, start_time=claim_started_ns)
            claim.end()
        self.step: Span | None = None
        self._token: object | None = None

    def begin(self, name: str) -> None:
        """End the current step; start `name` and make it current (a handler spawned from here
        continues it)."""
        self._end_step()
        from opentelemetry import trace

        self.step = self.tracer.start_span(name, context=self._in_run)
        self._token = self._context.attach(trace.set_span_in_context(self.step))

    def outcome(self, outcome: str, error: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.run.set_attribute("tasklane.outcome", outcome)
        if outcome in {"failed", "retry", "lost"}:
            self.run.set_status(Status(StatusCode.ERROR, error or outcome))
            if error:
                self.run.add_event("exception", {"exception.message": error[:1000]})

    def end(self) -> None:
        self._end_step()
        self.run.end()

    def _end_step(self) -> None:
        if self._token is not None:
            # Same asyncio task as the attach (worker/observe.py): the token is ours to reset.
            with contextlib.suppress(Exception):
                self._context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if self.step is not None:
            self.step.end()
            self.step = None


def _parent_context(stored: dict[str, str] | None, task_id: UUID) -> Any:
    """The context a run continues: the task's stored one, else a trace whose id is the task's
    (every run of an untraced task in one trace)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if stored:
        extracted = TraceContextTextMapPropagator().extract(stored)
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
    remote = trace.SpanContext(
        trace_id=task_id.int,
        span_id=(task_id.int & ((1 << 64) - 1)) or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))
