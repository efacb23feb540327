"""The `tasklane` command line.

Exit codes: 0 ok, 1 failure or not found (one line on stderr, never a traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker.config import ConfigError, Settings, redact_url

ROOT = Path(__file__).resolve().parent.parent


class CommandError(Exception):
    """A failure to report as one line on stderr, exit code 1."""


def migrations_dir() -> Path:
    return ROOT / "migrations"


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = database_url
    config.attributes["skip_logging_setup"] = True
    return config


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from alembic import command

    try:
        command.upgrade(alembic_config(settings.database_url), "head")
    except Exception as exc:
        raise CommandError(
            f"migration failed on {redact_url(settings.database_url)}: {_reason(exc)}"
        ) from None
    print(f"database {redact_url(settings.database_url)} is at the latest schema revision")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from arq.worker import Worker

    from worker.app import worker_options
    from worker.logs import configure_logging

    configure_logging(fmt=settings.log_format, level=settings.log_level)
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
    worker = Worker(**options)
    worker.run()  # returns after SIGTERM/SIGINT (graceful) or, with --burst, an empty queue
    return 0


async def preflight(settings: Settings) -> None:
    """Fail with one clear line before arq starts: Postgres, the schema, Redis."""
    from persistence import pg
    from persistence.schema import SchemaError, check_schema
    from worker.redis_conn import create_redis

    try:
        conn = await asyncio.wait_for(pg.connect(settings.database_url), timeout=10)
    except Exception as exc:
        raise CommandError(
            f"cannot connect to PostgreSQL at {redact_url(settings.database_url)}: {_reason(exc)}"
        ) from None
    try:
        await check_schema(conn)
    except SchemaError as exc:
        raise CommandError(str(exc)) from None
    finally:
        await conn.close()
    redis = create_redis(settings.redis_url, retries=1)
    try:
        await asyncio.wait_for(redis.ping(), timeout=10)
    except Exception as exc:
        raise CommandError(
            f"cannot connect to Redis at {redact_url(settings.redis_url)}: {_reason(exc)}"
        ) from None
    finally:
        await redis.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


# -- parsing ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tasklane", description="Background tasks for agent systems.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(handler=cmd_migrate)

    worker = sub.add_parser("worker", help="run a worker until SIGTERM")
    worker.add_argument("--queue", help="arq queue name (default: TASKLANE_QUEUE)")
    worker.add_argument("--concurrency", type=_positive_int, help="tasks run at once")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(handler=cmd_worker)
    return parser


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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
        return handler(args, settings)
    except ConfigError as exc:
        print(f"tasklane: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"tasklane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
