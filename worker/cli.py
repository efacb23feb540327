"""The `tasklane` command line.

Exit codes: 0 ok, 1 failure or not found (one line on stderr, never a traceback), 2 usage.

Every read command and `submit` take `--json`: exactly one JSON document on stdout. Without it
the output is for people: aligned columns, durations, relative times. What the commands do is in
`worker.operator`, how they print in `worker.cli_render`; this module parses arguments, runs the
operation and maps failures to exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from uuid import UUID

from domain.entities import MAX_ATTEMPTS_LIMIT, MAX_PRIORITY
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from worker.config import (
    DEFAULT_METRICS_HOST,
    MAX_CONCURRENCY,
    ConfigError,
    Settings,
    concurrency,
    port_number,
    queue_name,
    redact_url,
)
from worker.redaction import redact, redact_text

if TYPE_CHECKING:
    from persistence.repositories.report_repository import TaskRow
    from worker.operator import ActionResult, Operator, PruneResult

T = TypeVar("T")

# Bounds of what a person may type: a value outside is one line of error, exit 2.
DEFAULT_WAIT_SECONDS = 60.0
MAX_WAIT_SECONDS = 86_400.0  # submit --wait --timeout, demo --timeout: a day
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
MAX_PRUNE_AGE = timedelta(days=3650)  # prune --older-than: ten years
DEFAULT_PRUNE_BATCH = 1000
MAX_PRUNE_BATCH = 10_000  # one transaction each: bigger batches hold their locks longer
MAX_PRUNE_RATE = 1_000_000.0  # prune --max-rate, tasks per second
MAX_DEMO_SUBTASKS = 1000
DEFAULT_TREE_CHILDREN = 50  # tree: children shown per task, the rest counted on one line
MAX_TREE_CHILDREN = 10_000
DEMO_AGENTS = "tasklane.demo_agents"
# How much of a rejected argument an error repeats, and how long an error line may be.
ECHO_CHARS = 40
MAX_ERROR_LINE = 500


class CommandError(Exception):
    """A failure to report as one line on stderr, exit code 1."""


# -- migrate and worker ---------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    prepare_database(settings)
    _say(f"database {redact_url(settings.database_url)} is at the latest schema revision")
    return 0


def prepare_database(settings: Settings) -> None:
    """Reach PostgreSQL (waiting while it starts), create the database when it is missing and
    the role may, and bring its schema to the latest revision."""
    import asyncio

    asyncio.run(reach_database(settings, create=True))
    migrate(settings)


def migrate(settings: Settings) -> None:
    from persistence.migrate import migrate as upgrade

    try:
        upgrade(settings.database_url)
    except Exception as exc:
        raise CommandError(
            f"migration failed on {redact_url(settings.database_url)}: {_reason(exc)}"
        ) from None


async def reach_database(settings: Settings, *, create: bool) -> None:
    """The first connection: wait up to TASKLANE_STARTUP_WAIT_SECONDS for PostgreSQL to accept
    (one line per wait), then create the database if it is missing and `create` allows."""
    from persistence.startup import DatabaseMissing, StartupError
    from persistence.startup import reach_database as reach

    try:
        await reach(
            settings.database_url,
            wait_seconds=settings.startup_wait_seconds,
            create=create,
            say=say,
        )
    except DatabaseMissing as exc:
        if create:
            raise CommandError(str(exc)) from None
        raise CommandError(f"{exc}: `tasklane migrate` creates it and its schema") from None
    except StartupError as exc:
        raise CommandError(str(exc)) from None


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import TasklaneWorker, worker_options
    from worker.logs import configure_logging

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    import asyncio

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(preflight(settings))
        options = worker_options(settings, burst=args.burst)
    except ImportError as exc:
        loop.close()
        raise CommandError(str(exc)) from None
    except Exception:
        loop.close()
        raise
    worker = TasklaneWorker(**options)
    worker.run()  # returns after SIGTERM/SIGINT (graceful) or, with --burst, an empty queue
    return 0


def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    """Serve queue-level gauges from PostgreSQL for Prometheus (worker/exporter.py)."""
    from worker import exporter
    from worker.logs import configure_logging

    configure_logging(fmt=settings.log_format, level=settings.log_level)
    try:
        exporter.run(settings, host=args.host, port=args.port)
    except OSError as exc:
        raise CommandError(str(exc)) from None
    return 0


async def preflight(settings: Settings) -> None:
    """Fail with one clear line before arq starts: Postgres, the schema, Redis."""
    from worker.health import ServiceError, check_postgres, check_redis

    await reach_database(settings, create=False)
    try:
        await check_postgres(settings)
        await check_redis(settings)
    except ServiceError as exc:
        raise CommandError(str(exc)) from None


def say(line: str) -> None:
    """A line of progress on stderr (stdout holds the command's output)."""
    print(f"tasklane: {line}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


# -- running an operation -------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one operation; every failure it can meet becomes a one-line `CommandError`."""
    import asyncio

    from domain.exceptions import DomainError
    from worker.health import ServiceError
    from worker.operator import OperatorError

    try:
        return asyncio.run(coro)
    except (OperatorError, ServiceError, DomainError) as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:
        # The SQLAlchemy and Redis clients are imported only by the commands that use them: an
        # error of theirs can only come once they are.
        if _raised_by(exc, "sqlalchemy.exc", "SQLAlchemyError"):
            raise CommandError(f"database error: {_reason(exc.__cause__ or exc)}") from None
        if _raised_by(exc, "asyncpg.exceptions", "PostgresError"):
            raise CommandError(f"database error: {_reason(exc)}") from None
        if _raised_by(exc, "redis.exceptions", "RedisError"):
            raise CommandError(f"Redis error: {_reason(exc)}") from None
        if isinstance(exc, OSError | TimeoutError):
            raise CommandError(f"connection failed: {_reason(exc)}") from None
        raise


def _raised_by(exc: BaseException, module: str, name: str) -> bool:
    """`exc` is an instance of `module.name`, checked without importing the module."""
    loaded = sys.modules.get(module)
    kind = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(kind, type) and isinstance(exc, kind)


def _operate(
    settings: Settings, action: Callable[[Operator], Coroutine[Any, Any, T]], *, redis: bool
) -> T:
    """Open the services (checked first: unreachable or unmigrated is one clear line) and run
    `action` on them."""
    from worker.operator import Operator

    async def go() -> T:
        async with Operator.open(settings, redis=redis) as operator:
            return await action(operator)

    return _run(go())


def _emit(args: argparse.Namespace, document: Callable[[], Any], text: Callable[[], str]) -> None:
    if args.json:
        _print_document(document())
    else:
        _say(text())


def _print_document(document: Any) -> None:
    """One JSON document on stdout, secrets redacted (in the data, so it stays valid JSON)."""
    from worker.cli_render import dumps

    print(dumps(redact(document)))


def _say(text: str, *, err: bool = False) -> None:
    """Print readable output (stdout) or a remark (stderr), secrets redacted. Everything the
    CLI prints goes through here or `_print_document`."""
    print(redact_text(text), file=sys.stderr if err else sys.stdout)


def _error_line(text: str) -> str:
    """An error as one bounded line."""
    line = " ".join(text.split("\n"))
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 1] + "…"


def _id(raw: str, what: str = "task") -> UUID:
    try:
        return UUID(raw.strip())
    except ValueError:
        raise CommandError(f"not a {what} id (expected a UUID): {_shown(raw)}") from None


# -- submit ---------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    payload = _parse_input(args.input)
    conversation = str(_id(args.conversation, "conversation")) if args.conversation else None

    async def action(op: Operator) -> tuple[TaskRow, bool, datetime]:
        row = await op.submit(
            args.agent,
            payload,
            conversation_id=conversation,
            idempotency_key=args.idempotency_key,
            priority=args.priority,
        )
        if not await op.agent_known(args.agent):
            _say(
                f"tasklane: warning: no worker has registered agent {_shown(args.agent)} yet; "
                "the task fails as an unknown agent unless a worker serving it claims it",
                err=True,
            )
        finished = True
        if args.wait:
            row, finished = await op.wait(row["id"], args.timeout)
        return row, finished, await op.now()

    row, finished, now = _operate(settings, action, redis=True)
    if not args.wait:
        _emit(args, lambda: render.task_json(row), lambda: render.submit_text(row))
        return 0
    _emit(args, lambda: render.task_json(row), lambda: render.task_block(row, now))
    if not finished:
        _say(
            f"tasklane: task {row['id']} is still {row['status']} after {args.timeout:g}s", err=True
        )
        return 1
    if row["status"] != TaskStatus.COMPLETED.value:
        _say(f"tasklane: task {row['id']} ended {row['status']}", err=True)
        return 1
    return 0


def _parse_input(raw: str | None, what: str = "--input") -> Any:
    if raw is None:
        return {}

    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=reject)
    except ValueError as exc:
        raise CommandError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CommandError(f"{what} is not valid JSON: it is nested too deeply") from None


# -- read commands --------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    task_id = _id(args.id)
    if args.follow:
        return _follow(args, settings, task_id)
    report = _operate(settings, lambda op: op.show(task_id), redis=False)
    _emit(args, lambda: render.show_json(report), lambda: render.show_text(report))
    return 0


def _follow(args: argparse.Namespace, settings: Settings, task_id: Any) -> int:
    """`show ID --follow`: one line (or, with --json, one JSON document) per change, until the
    task is final (TaskClient.watch)."""
    from domain.exceptions import EntityNotFoundError
    from worker import cli_render as render

    async def action(op: Operator) -> None:
        try:
            async for event in op.client.watch(task_id):
                if args.json:
                    print(render.dumps(redact(render.plain(event))), flush=True)
                else:
                    _say(render.event_text(event))
                    sys.stdout.flush()
        except EntityNotFoundError:
            raise CommandError(f"no task with id {task_id}") from None

    _operate(settings, action, redis=True)
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    conversation = str(_id(args.conversation, "conversation")) if args.conversation else None
    if args.waiting and args.status not in (None, TaskStatus.WAITING):
        raise CommandError("--waiting lists waiting tasks: leave out --status")
    status = TaskStatus.WAITING if args.waiting else args.status
    rows, now = _operate(
        settings,
        lambda op: op.list_tasks(
            agent_id=args.agent,
            status=status,
            conversation_id=conversation,
            limit=args.limit,
        ),
        redis=False,
    )
    if args.waiting:
        _emit(
            args,
            lambda: [{**render.task_json(r), "waits_for": render.waits_for(r, now)} for r in rows],
            lambda: render.inbox_text(rows, now),
        )
        return 0
    _emit(args, lambda: [render.task_json(r) for r in rows], lambda: render.list_text(rows, now))
    return 0


def cmd_tree(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    task_id = _id(args.id)
    tree = _operate(settings, lambda op: op.tree(task_id), redis=False)
    _emit(args, lambda: render.tree_json(tree), lambda: render.tree_text(tree, args.max_children))
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    stats = _operate(settings, lambda op: op.stats(), redis=False)
    _emit(args, lambda: render.stats_json(stats), lambda: render.stats_text(stats))
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render
    from worker.health import health, liveness

    report = liveness(settings) if args.live else _run(health(settings, local=args.local))
    _emit(args, lambda: render.health_json(report), lambda: render.health_text(report))
    if report.ok:
        return 0
    failed = ", ".join(c.name for c in report.checks if not c.ok)
    _say(f"tasklane: unhealthy: {failed}", err=True)
    return 1


# -- operator actions -----------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    return _act(args, settings, "cancel")


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    return _act(args, settings, "retry")


def cmd_signal(args: argparse.Namespace, settings: Settings) -> int:
    """Deliver a signal to a task (TaskClient.signal): a task waiting for it resumes at once."""
    from domain.exceptions import EntityNotFoundError, SignalRefusedError

    task_id = _id(args.id)
    payload = _parse_input(args.payload, "--payload") if args.payload is not None else None
    if not args.name or len(args.name) > 200:
        raise CommandError("a signal's name is 1 to 200 characters")

    async def action(op: Operator) -> int:
        try:
            return await op.client.signal(task_id, args.name, payload, sent_by=args.by)
        except EntityNotFoundError:
            raise CommandError(f"no task with id {task_id}") from None
        except SignalRefusedError as exc:
            raise CommandError(str(exc)) from None

    signal_id = _operate(settings, action, redis=True)
    if args.json:
        _print_document({"signal_id": signal_id, "task_id": str(task_id), "name": args.name})
    else:
        _say(f"signal {args.name!r} delivered to {task_id} (signal {signal_id})")
    return 0


def _act(args: argparse.Namespace, settings: Settings, verb: str) -> int:
    """Cancel or retry. A task in a state that does not allow it is printed unchanged, exit 0."""
    from worker import cli_render as render

    task_id = _id(args.id)

    async def action(op: Operator) -> tuple[ActionResult, datetime]:
        result = await (op.cancel(task_id) if verb == "cancel" else op.retry(task_id))
        return result, await op.now()

    # A retry dispatches the task again, so it needs Redis; a cancel works through Postgres
    # alone (an operator must be able to stop work while Redis is away).
    result, now = _operate(settings, action, redis=verb == "retry")
    if args.json:  # the remark goes to stderr: stdout holds the document only
        _say(result.message, err=True)
        _print_document(render.task_json(result.row))
    else:
        _say(render.action_text(result, now))
    return 0


def cmd_edit(args: argparse.Namespace, settings: Settings) -> int:
    """An operator's edit of a task that has not started (TaskClient.update)."""
    from worker import cli_render as render

    task_id = _id(args.id)
    if args.run_after is None and args.max_attempts is None and args.metadata is None:
        raise CommandError("nothing to edit: give --run-after, --max-attempts and/or --metadata")
    metadata = _parse_input(args.metadata, "--metadata") if args.metadata is not None else None
    if metadata is not None and not isinstance(metadata, dict):
        raise CommandError("--metadata must be a JSON object")

    async def action(op: Operator) -> tuple[ActionResult, datetime]:
        now = await op.now()
        from worker.client import UNSET

        run_after: Any = UNSET
        if args.run_after is not None:  # "now", an offset from the database's now, or a time
            run_after = None if args.run_after == "now" else args.run_after
            if isinstance(run_after, timedelta):
                run_after = now + run_after
        result = await op.edit(
            task_id,
            run_after=run_after,
            max_attempts=args.max_attempts if args.max_attempts is not None else UNSET,
            metadata=metadata if metadata is not None else UNSET,
            expected_version=args.if_version,
        )
        return result, now

    result, now = _operate(settings, action, redis=True)
    if args.json:
        _say(result.message, err=True)
        _print_document(render.task_json(result.row))
    else:
        _say(render.action_text(result, now))
    return 0


# -- flow control ---------------------------------------------------------------------------------


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    """`queue [NAME]`, `agent AGENT` or `key AGENT KEY` as TaskClient.pause/resume arguments."""
    names = list(args.names)
    wanted = {"queue": (0, 1), "agent": (1, 1), "key": (2, 2)}[args.scope]
    if not wanted[0] <= len(names) <= wanted[1]:
        usage = {"queue": "queue [NAME]", "agent": "agent AGENT", "key": "key AGENT KEY"}
        raise CommandError(f"expected `{args.command} {usage[args.scope]}`")
    if args.scope == "queue":
        return {"queue": names[0] if names else args.queue}
    scope = {"queue": args.queue, "agent_id": _agent_id(names[0])}
    if args.scope == "key":
        if not names[1] or len(names[1]) > 500:
            raise CommandError("a key is 1 to 500 characters")
        scope["key"] = names[1]
    return scope


def _agent_id(raw: str) -> str:
    from domain.entities import check_agent_id
    from domain.exceptions import InvalidInputError

    try:
        return check_agent_id(raw)
    except InvalidInputError as exc:
        raise CommandError(str(exc)) from None


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    scope = _scope(args)
    seconds = None if args.for_ is None else args.for_.total_seconds()

    async def action(op: Operator) -> tuple[dict[str, Any], datetime]:
        pause = await op.client.pause(**scope, reason=args.reason, for_seconds=seconds, by=args.by)
        return pause, await op.now()

    pause, now = _operate(settings, action, redis=False)
    _emit(args, lambda: render.plain(pause), lambda: render.limits_text([], [pause], now))
    return 0


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    scope = _scope(args)
    resumed = _operate(settings, lambda op: op.client.resume(**scope), redis=False)
    what = " ".join([args.scope, *args.names])
    if args.json:
        _print_document({"resumed": resumed})
    else:
        _say(f"resumed {what}" if resumed else f"{what} was not paused")
    return 0


def cmd_limits(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    if args.action == "set":
        return _set_limits(args, settings)
    if args.action == "reset":
        if args.agent is None:
            raise CommandError("expected `limits reset AGENT`")
        agent = _agent_id(args.agent)
        reset = _operate(
            settings, lambda op: op.client.reset_limits(agent, queue=args.queue), redis=False
        )
        _say(f"{agent}: back to its code's limits on {reset} queue(s)")
        return 0

    async def action(op: Operator) -> tuple[list[Any], list[Any], datetime]:
        return await op.client.limits(), await op.client.pauses(), await op.now()

    limits, pauses, now = _operate(settings, action, redis=False)
    _emit(
        args,
        lambda: {"limits": render.plain(limits), "pauses": render.plain(pauses)},
        lambda: render.limits_text(limits, pauses, now),
    )
    return 0


def _set_limits(args: argparse.Namespace, settings: Settings) -> int:
    if args.agent is None:
        raise CommandError("expected `limits set AGENT --concurrency N …`")
    agent = _agent_id(args.agent)
    changes = {
        name: value
        for name, value in (
            ("concurrency", args.concurrency),
            ("per_key", args.per_key),
            ("rate", args.rate),
            ("key_rate", args.key_rate),
        )
        if value is not None
    }
    if not changes:
        raise CommandError("nothing to set: give --concurrency, --per-key, --rate or --key-rate")
    # "none" lifts the limit whatever the code declares.
    values = {k: None if v == "none" else v for k, v in changes.items()}
    queue = args.queue or settings.queue
    _operate(
        settings,
        lambda op: op.client.set_limits(agent, queue=queue, by=args.by, **values),
        redis=False,
    )
    _say(f"{agent} on queue {queue!r}: " + ", ".join(f"{k} {v}" for k, v in changes.items()))
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render

    statuses = sorted(set(args.status or FINISHED_STATUSES))

    async def action(op: Operator) -> tuple[PruneResult, datetime]:
        result = await op.prune(
            older_than=args.older_than,
            statuses=statuses,
            dry_run=args.dry_run,
            batch_size=args.batch_size,
            max_rate=args.max_rate,
        )
        return result, await op.now()

    result, now = _operate(settings, action, redis=False)
    _emit(args, lambda: render.prune_json(result), lambda: render.prune_text(result, now))
    return 0


# -- demo -----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker import cli_render as render
    from worker.cli_demo import run_demo
    from worker.dev import servers, stop_on_signals

    # The demo's output is its tree, not the log of the worker it starts.
    settings = replace(settings, log_level=_command_log_level(settings))
    if DEMO_AGENTS not in settings.agent_modules:  # its worker must serve fanout and square
        settings = replace(settings, agent_modules=(*settings.agent_modules, DEMO_AGENTS))

    # Embedded servers when nothing else answers (or with --embedded): those a `tasklane dev`
    # in this folder runs are shared, others are started here and stopped at the end, also on
    # SIGTERM.
    with (
        stop_on_signals(),
        servers(settings, embedded_only=args.embedded, share=True, say=say) as running,
    ):
        settings = running.settings
        prepare_database(settings)
        if not args.json:
            _say(f"migrated {redact_url(settings.database_url)}; starting a worker in this process")
        tree = _run(run_demo(settings, n=args.n, timeout=args.timeout))
    root = tree.nodes[0].row
    _emit(
        args,
        lambda: render.tree_json(tree),
        lambda: render.tree_text(tree, DEFAULT_TREE_CHILDREN),
    )
    if root["status"] != TaskStatus.COMPLETED.value:
        _say(f"tasklane: the demo task {root['id']} ended {root['status']}", err=True)
        return 1
    if not args.json:
        _say(f"\nfanout of {args.n} completed: {json.dumps(root['output'])}")
        _say(f"see it again with: tasklane tree {root['id']}")
    return 0


# -- dev ------------------------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dev import run_dev

    return run_dev(settings, embedded_only=args.embedded, fresh=args.fresh)


# -- web (the dashboard) --------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from worker.web.auth import TokenError, read_token
        from worker.web.server import serve
    except ImportError as exc:
        raise CommandError(
            f"the dashboard needs the web extra ({exc.name} is missing): "
            "pip install 'tasklane[web]'"
        ) from None
    try:
        token = read_token(os.environ)
    except TokenError as exc:
        raise CommandError(str(exc)) from None
    import asyncio

    asyncio.run(preflight_database(settings))
    where = f"http://{args.host}:{args.port}"
    say(f"dashboard on {where} ({'read-only' if token is None else 'actions need the token'})")
    serve(settings, token=token, host=args.host, port=args.port)
    return 0


async def preflight_database(settings: Settings) -> None:
    """PostgreSQL reachable and migrated, or one line saying which is not."""
    from worker.health import ServiceError, check_postgres

    await reach_database(settings, create=False)
    try:
        await check_postgres(settings)
    except ServiceError as exc:
        raise CommandError(str(exc)) from None


# -- parsing --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error: one line on stderr (the usage is one --help away), exit 2."""
        line = _error_line(redact_text(f"{self.prog}: error: {message}"))
        self.exit(2, f"{line} (see {self.prog} --help)\n")


Command = Callable[[argparse.Namespace, Settings], int]

# Commands that run on one asyncpg connection and import neither the ORM nor structlog (their
# logging is configured only if something logs): they answer in about a tenth of a second, submit
# (which rings Redis, with arq's job format) in about a quarter. tests/integration/
# test_cli_imports.py keeps them so.
QUICK_COMMANDS: frozenset[Command] = frozenset(
    {cmd_show, cmd_list, cmd_tree, cmd_stats, cmd_prune, cmd_health, cmd_submit}
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tasklane", description="Background tasks for agent systems.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    embedded_help = (
        "use the embedded PostgreSQL and Redis under ./.tasklane, whatever DATABASE_URL and "
        "REDIS_URL say or other servers answer"
    )
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(handler=cmd_migrate)

    worker = sub.add_parser("worker", help="run a worker until SIGTERM")
    worker.add_argument(
        "--queue",
        type=_configured(queue_name, "queue name"),
        help="arq queue name (default: TASKLANE_QUEUE)",
    )
    worker.add_argument(
        "--concurrency",
        metavar="N",
        type=_configured(concurrency, "concurrency"),
        help=f"tasks run at once (default: TASKLANE_CONCURRENCY; at most {MAX_CONCURRENCY})",
    )
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(handler=cmd_worker)

    metrics = sub.add_parser(
        "metrics", help="serve queue gauges from PostgreSQL for Prometheus, until SIGTERM"
    )
    metrics.add_argument(
        "--port",
        type=_configured(port_number, "port"),
        default=9465,
        help="port to serve /metrics on (default: 9465)",
    )
    metrics.add_argument(
        "--host", default=DEFAULT_METRICS_HOST, help="address to bind (default: all)"
    )
    metrics.set_defaults(handler=cmd_metrics)

    submit = sub.add_parser("submit", parents=[json_flag], help="submit a task")
    submit.add_argument("agent", metavar="AGENT", help="the agent to run, e.g. echo")
    submit.add_argument("--input", metavar="JSON", help="the task's input (default: {})")
    submit.add_argument(
        "--conversation", metavar="ID", help="conversation id (default: a new one for user cli)"
    )
    submit.add_argument("--idempotency-key", metavar="K", help="submit at most once per key")
    submit.add_argument(
        "--priority",
        metavar="N",
        type=_whole_number(-MAX_PRIORITY, MAX_PRIORITY),
        default=0,
        help="higher starts first among due tasks; one point counts as a minute of waiting",
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait until the task finishes (exit 1 unless completed)"
    )
    submit.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds(MAX_WAIT_SECONDS),
        default=DEFAULT_WAIT_SECONDS,
        help=f"with --wait: give up after S seconds (default {DEFAULT_WAIT_SECONDS:g}, "
        f"at most {MAX_WAIT_SECONDS:g})",
    )
    submit.set_defaults(handler=cmd_submit)

    show = sub.add_parser(
        "show", parents=[json_flag], help="a task, its run history and why it is where it is"
    )
    show.add_argument("id", metavar="ID")
    show.add_argument(
        "--follow", action="store_true", help="print each change as it happens until it is final"
    )
    show.set_defaults(handler=cmd_show)

    list_ = sub.add_parser("list", parents=[json_flag], help="tasks, newest first")
    list_.add_argument("--agent", metavar="A")
    list_.add_argument("--status", metavar="S", type=_status)
    list_.add_argument("--conversation", metavar="C")
    list_.add_argument(
        "--waiting",
        action="store_true",
        help="the inbox: waiting tasks, what each waits for (subtasks, signals, a timer)",
    )
    list_.add_argument(
        "--limit",
        metavar="N",
        type=_whole_number(1, MAX_LIST_LIMIT),
        default=DEFAULT_LIST_LIMIT,
        help=f"at most N tasks (default {DEFAULT_LIST_LIMIT}, at most {MAX_LIST_LIMIT})",
    )
    list_.set_defaults(handler=cmd_list)

    tree = sub.add_parser("tree", parents=[json_flag], help="a task and all its subtasks")
    tree.add_argument("id", metavar="ID")
    tree.add_argument(
        "--max-children",
        metavar="N",
        type=_whole_number(1, MAX_TREE_CHILDREN),
        default=DEFAULT_TREE_CHILDREN,
        help=f"children shown per task, the rest counted on a '… N more' line (default "
        f"{DEFAULT_TREE_CHILDREN}; --json always has them all)",
    )
    tree.set_defaults(handler=cmd_tree)

    cancel = sub.add_parser(
        "cancel", parents=[json_flag], help="cancel a task and its unfinished subtasks"
    )
    cancel.add_argument("id", metavar="ID")
    cancel.set_defaults(handler=cmd_cancel)

    retry = sub.add_parser(
        "retry", parents=[json_flag], help="run a failed task again with fresh attempts"
    )
    retry.add_argument("id", metavar="ID")
    retry.set_defaults(handler=cmd_retry)

    signal_ = sub.add_parser(
        "signal", parents=[json_flag], help="deliver a signal to a task (a waiting one resumes)"
    )
    signal_.add_argument("id", metavar="ID")
    signal_.add_argument("name", metavar="NAME")
    signal_.add_argument("--payload", metavar="JSON", help="the signal's payload (any JSON)")
    signal_.add_argument("--by", default=os.environ.get("USER") or "cli", help="who sends it")
    signal_.set_defaults(handler=cmd_signal)

    edit = sub.add_parser(
        "edit",
        parents=[json_flag],
        help="change when a pending task runs, its attempts or metadata (it must not have started)",
    )
    edit.add_argument("id", metavar="ID")
    edit.add_argument(
        "--run-after",
        metavar="WHEN",
        type=_when,
        help="now, an offset such as +30m or +2h (by the database clock), or an ISO-8601 time "
        "with its zone",
    )
    edit.add_argument(
        "--max-attempts", metavar="N", type=_whole_number(1, MAX_ATTEMPTS_LIMIT), default=None
    )
    edit.add_argument("--metadata", metavar="JSON", help="the task's new metadata (an object)")
    edit.add_argument(
        "--if-version",
        metavar="V",
        type=_whole_number(1, 2**31 - 1),
        help="refuse the edit unless the task is still at this version (as `show` printed it)",
    )
    edit.set_defaults(handler=cmd_edit)

    by = _Parser(add_help=False)
    by.add_argument(
        "--by",
        default=os.environ.get("USER") or "operator",
        help="who does it (recorded with the pause or override; default: $USER)",
    )
    by.add_argument("--queue", help="the queue (default: TASKLANE_QUEUE)")
    for name, handler, helptext in (
        ("pause", cmd_pause, "stop new starts on a queue, an agent or one key of an agent"),
        ("resume", cmd_resume, "lift a pause"),
    ):
        command = sub.add_parser(name, parents=[json_flag, by], help=helptext)
        command.add_argument("scope", choices=["queue", "agent", "key"])
        command.add_argument("names", nargs="*", metavar="NAME", help="[QUEUE] | AGENT | AGENT KEY")
        if name == "pause":
            command.add_argument("--reason", default="paused by an operator", type=_pause_reason)
            command.add_argument(
                "--for", dest="for_", metavar="DURATION", type=_pause_duration,
                help="lift it by itself after this long (30m, 2h, 1d)",
            )  # fmt: skip
        command.set_defaults(handler=handler, command=name)

    limits = sub.add_parser(
        "limits",
        parents=[json_flag, by],
        help="flow limits and pauses; `limits set AGENT --concurrency N` overrides one live",
    )
    limits.add_argument("action", nargs="?", choices=["list", "set", "reset"], default="list")
    limits.add_argument("agent", nargs="?", metavar="AGENT")
    limits.add_argument("--concurrency", type=_limit_value(whole=True), metavar="N|none")
    limits.add_argument("--per-key", type=_limit_value(whole=True), metavar="N|none")
    limits.add_argument("--rate", type=_limit_value(whole=False), metavar="RATE|none")
    limits.add_argument("--key-rate", type=_limit_value(whole=False), metavar="RATE|none")
    limits.set_defaults(handler=cmd_limits)

    stats = sub.add_parser(
        "stats", parents=[json_flag], help="counts by agent and status, latency, live workers"
    )
    stats.set_defaults(handler=cmd_stats)

    prune = sub.add_parser(
        "prune", parents=[json_flag], help="delete finished tasks older than a duration"
    )
    prune.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        required=True,
        help="e.g. 7d, 12h, 30m, 1d12h: tasks finished longer ago than this "
        f"(at most {MAX_PRUNE_AGE.days}d)",
    )
    prune.add_argument(
        "--status",
        metavar="S",
        type=_finished_statuses,
        action="extend",
        help="completed, failed and/or cancelled (repeat or comma-separate; default: all three)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune.add_argument(
        "--batch-size",
        metavar="N",
        type=_whole_number(1, MAX_PRUNE_BATCH),
        default=DEFAULT_PRUNE_BATCH,
        help=f"tasks deleted per transaction (default {DEFAULT_PRUNE_BATCH}, "
        f"at most {MAX_PRUNE_BATCH})",
    )
    prune.add_argument(
        "--max-rate",
        metavar="R",
        type=_rate,
        help=f"delete at most R tasks per second on average, no batch larger than R (at most "
        f"{MAX_PRUNE_RATE:g}; default: as fast as the database allows)",
    )
    prune.set_defaults(handler=cmd_prune)

    health = sub.add_parser(
        "health",
        parents=[json_flag],
        help="check Postgres, Redis, the schema and a live worker (exit 1 if any fails)",
    )
    probe = health.add_mutually_exclusive_group()
    probe.add_argument(
        "--local",
        action="store_true",
        help="require a live worker on this host (a readiness probe)",
    )
    probe.add_argument(
        "--live",
        action="store_true",
        help="only: this host's worker loop is running; no service is asked (a liveness probe)",
    )
    health.set_defaults(handler=cmd_health)

    demo = sub.add_parser(
        "demo", parents=[json_flag], help="run a fan-out task end to end and print its tree"
    )
    demo.add_argument(
        "--n",
        type=_whole_number(1, MAX_DEMO_SUBTASKS),
        default=10,
        help=f"subtasks (default 10, at most {MAX_DEMO_SUBTASKS})",
    )
    demo.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds(MAX_WAIT_SECONDS),
        default=DEFAULT_WAIT_SECONDS,
        help=f"give up after S seconds (default {DEFAULT_WAIT_SECONDS:g}, "
        f"at most {MAX_WAIT_SECONDS:g})",
    )
    demo.add_argument("--embedded", action="store_true", help=embedded_help)
    demo.set_defaults(handler=cmd_demo)

    dev = sub.add_parser(
        "dev",
        help="run PostgreSQL and Redis (embedded if none answer), migrations and a worker "
        "until Ctrl-C",
    )
    dev.add_argument("--embedded", action="store_true", help=embedded_help)
    dev.add_argument(
        "--fresh", action="store_true", help="wipe the embedded servers' data (./.tasklane) first"
    )
    dev.set_defaults(handler=cmd_dev)

    web = sub.add_parser(
        "web",
        help="serve the dashboard (read-only unless TASKLANE_WEB_TOKEN is set; needs the web "
        "extra)",
    )
    web.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)"
    )
    web.add_argument(
        "--port", type=_whole_number(1, 65535), default=8080, help="port (default 8080)"
    )
    web.set_defaults(handler=cmd_web)
    return parser


def _shown(raw: str) -> str:
    """A rejected argument as an error repeats it: redacted, quoted, cut to ECHO_CHARS."""
    text = repr(redact_text(raw))
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 1] + "…"


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)  # more than 4300 digits is a ValueError too
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number, got {_shown(raw)}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {_shown(raw)}")
        return value

    return parse


def _seconds(high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {_shown(raw)}"
            ) from None
        if not 0 < value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(
                f"must be more than 0 and at most {high:g} seconds, got {_shown(raw)}"
            )
        return value

    return parse


def _rate(raw: str) -> float:
    """prune --max-rate: tasks per second, at least 0.01 (one every 100 s), at most
    MAX_PRUNE_RATE."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of tasks per second, got {_shown(raw)}"
        ) from None
    if not 0.01 <= value <= MAX_PRUNE_RATE:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"must be between 0.01 and {MAX_PRUNE_RATE:g} tasks per second, got {_shown(raw)}"
        )
    return value


def _configured(parse: Callable[[str], T], what: str) -> Callable[[str], T]:
    """An option that overrides a setting, parsed by the setting's own rule."""

    def parse_option(raw: str) -> T:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what} {exc}") from None

    return parse_option


def _status(raw: str) -> TaskStatus:
    try:
        return TaskStatus.from_string(raw.strip().lower())
    except ValueError:
        statuses = ", ".join(s.value for s in TaskStatus)
        raise argparse.ArgumentTypeError(f"expected one of {statuses}, got {_shown(raw)}") from None


def _finished_statuses(raw: str) -> list[TaskStatus]:
    statuses = [_status(part) for part in raw.split(",") if part.strip()]
    unfinished = [s.value for s in statuses if s not in FINISHED_STATUSES]
    if unfinished or not statuses:
        raise argparse.ArgumentTypeError(
            f"prune deletes finished tasks only: completed, failed, cancelled (got {_shown(raw)})"
        )
    return statuses


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _pause_reason(raw: str) -> str:
    if not raw.strip() or len(raw) > 1000:
        raise argparse.ArgumentTypeError("a reason is 1 to 1000 characters")
    return raw


def _pause_duration(raw: str) -> timedelta:
    value = _duration(raw)
    if value.total_seconds() <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0s, got {_shown(raw)}")
    return value


def _limit_value(*, whole: bool) -> Callable[[str], Any]:
    """A limit on the command line: a whole number (≥ 1) or a rate ("60/min"), or "none"."""

    def parse(raw: str) -> Any:
        if raw.strip().lower() == "none":
            return "none"
        if whole:
            return _whole_number(1, 1_000_000)(raw)
        from worker.agents import parse_rate

        try:
            parse_rate(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return raw.strip()

    return parse


def _duration(raw: str) -> timedelta:
    """`7d`, `12h`, `30m`, `45s`, `2w`, or a combination such as `1d12h`; at most
    MAX_PRUNE_AGE."""
    text = raw.strip().lower()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 7d, 12h, 30m, 45s or 1d12h, got {_shown(raw)}"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)  # a huge one is inf, no error
    if not seconds <= MAX_PRUNE_AGE.total_seconds():
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_PRUNE_AGE.days}d, got {_shown(raw)}"
        )
    return timedelta(seconds=seconds)


def _when(raw: str) -> str | timedelta | datetime:
    """`now`, `+DURATION` (an offset from now) or an ISO-8601 time with its time zone."""
    text = raw.strip()
    if text.lower() == "now":
        return "now"
    if text.startswith("+"):
        return _duration(text[1:])
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected now, +30m or an ISO-8601 time such as 2026-12-24T08:00:00+00:00, "
            f"got {_shown(raw)}"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time zone too (e.g. +00:00): {_shown(raw)}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "queue", None):
        overrides["queue"] = args.queue
    if getattr(args, "concurrency", None):
        overrides["concurrency"] = args.concurrency
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(**_overrides(args))
        handler: Command = args.handler
        if handler in QUICK_COMMANDS:
            _configure_logging_on_first_record(settings)
        elif handler is not cmd_worker:  # a worker configures its logging as it starts
            _configure_logging(settings)
        return handler(args, settings)
    except ConfigError as exc:
        _say(_error_line(f"tasklane: {exc}"), err=True)
        return 2
    except CommandError as exc:
        _say(_error_line(f"tasklane: {exc}"), err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tasklane list | head`): say nothing more, and keep Python from
        # complaining about the stdout it cannot flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:  # the promise is one line, never a traceback
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            _say(traceback.format_exc().rstrip(), err=True)
        _say(
            _error_line(
                f"tasklane: unexpected error: {type(exc).__name__}: {_reason(exc)} "
                "(LOG_LEVEL=DEBUG shows the traceback)"
            ),
            err=True,
        )
        return 1


def _configure_logging(settings: Settings) -> None:
    """Log lines of a command (a library's warning, the client's) go to stderr, redacted like a
    worker's: left unconfigured, structlog would print them on stdout, into a --json document.
    WARNING unless LOG_LEVEL says otherwise."""
    from worker.logs import configure_logging

    configure_logging(fmt=settings.log_format, level=_command_log_level(settings))


class _FirstRecord(logging.Handler):
    """Configures the CLI's logging when the first record comes, then hands the record on:
    a quick command that logs nothing never imports structlog."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if self in root.handlers:
            _configure_logging(self.settings)  # replaces this handler
            if record.levelno >= root.level:
                root.handle(record)


def _configure_logging_on_first_record(settings: Settings) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_FirstRecord(settings)]
    root.setLevel(_command_log_level(settings))


def _command_log_level(settings: Settings) -> str:
    return settings.log_level if "LOG_LEVEL" in os.environ else "WARNING"


if __name__ == "__main__":
    sys.exit(main())
