"""Typed settings from the environment, validated at start.

A bad value stops the process with one line naming the variable and what is wrong, before any
connection is attempted. Every problem is reported at once, not the first one only.

The URLs, which carry passwords, can instead be read from files named by `DATABASE_URL_FILE`
and `REDIS_URL_FILE` (Docker and Kubernetes secrets), so that they appear in no process
environment and no `docker inspect`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from domain.entities import DEFAULT_QUEUE, MAX_ATTEMPTS_LIMIT
from domain.payload import DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_OUTPUT_BYTES
from domain.policies import Backoff
from persistence.timeouts import DbTimeouts
from persistence.url import parse as parse_db_url
from worker.redaction import redact_url as redact_url  # where operator and app import it from
from worker.tracing import check_setting as check_tracing

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/tasklane"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_LIVENESS_PATH = "/tmp/tasklane-worker.alive"
DEFAULT_AGENTS = "tasklane.demo_agents"  # a name that works installed and in the repository
DEFAULT_METRICS_HOST = "0.0.0.0"
DEFAULT_MAX_CHILDREN = 10_000  # subtasks one step of a handler may spawn
MAX_QUEUE_LENGTH = 200
# Beyond this arq asks Redis for more queue entries per poll than Redis takes as a count.
MAX_CONCURRENCY = 10_000

T = TypeVar("T")


class ConfigError(ValueError):
    """The environment does not describe a valid configuration."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    agent_modules: tuple[str, ...] = (DEFAULT_AGENTS,)
    queue: str = DEFAULT_QUEUE
    concurrency: int = 50
    lease_seconds: float = 30.0
    task_timeout: float = 300.0
    max_attempts: int = 3
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    reconcile_seconds: float = 1.0
    redispatch_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0
    startup_wait_seconds: float = 30.0  # how long start-up waits for PostgreSQL to accept
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_children: int = DEFAULT_MAX_CHILDREN
    db_pool_size: int = 10
    db_statement_cache: bool = True
    db_timeout_seconds: float = 30.0  # any one statement (client and server side)
    db_lock_timeout_seconds: float = 10.0
    db_session_timeouts: bool = True  # send statement/lock/idle timeouts when connecting
    redis_timeout_seconds: float = 5.0  # any one Redis command
    log_format: str | None = None  # None: console on a TTY, JSON otherwise
    log_level: str = "INFO"
    liveness_path: str = DEFAULT_LIVENESS_PATH
    metrics_port: int | None = None  # /metrics served there (worker/metrics.py); None: off
    metrics_host: str = DEFAULT_METRICS_HOST
    tracing: str = "off"  # off, otlp or file:/abs/path (worker/tracing.py)

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3

    @property
    def db_timeouts(self) -> DbTimeouts:
        return DbTimeouts(
            statement_seconds=self.db_timeout_seconds,
            lock_seconds=self.db_lock_timeout_seconds,
            idle_in_transaction_seconds=2 * self.db_timeout_seconds,
            session_settings=self.db_session_timeouts,
        )

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.retry_base_seconds, self.retry_max_seconds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        settings = cls(
            database_url=reader.secret("DATABASE_URL", _database_url, DEFAULT_DATABASE_URL),
            redis_url=reader.secret("REDIS_URL", _redis_url, DEFAULT_REDIS_URL),
            agent_modules=reader.get("TASKLANE_AGENTS", _modules, (DEFAULT_AGENTS,)),
            queue=reader.get("TASKLANE_QUEUE", queue_name, DEFAULT_QUEUE),
            concurrency=reader.get("TASKLANE_CONCURRENCY", concurrency, 50),
            lease_seconds=reader.get("TASKLANE_LEASE_SECONDS", _positive_float, 30.0),
            task_timeout=reader.get("TASKLANE_TASK_TIMEOUT", _positive_float, 300.0),
            max_attempts=reader.get("TASKLANE_MAX_ATTEMPTS", _attempts, 3),
            retry_base_seconds=reader.get("TASKLANE_RETRY_BASE_SECONDS", _non_negative_float, 1.0),
            retry_max_seconds=reader.get("TASKLANE_RETRY_MAX_SECONDS", _non_negative_float, 300.0),
            reconcile_seconds=reader.get("TASKLANE_RECONCILE_SECONDS", _positive_float, 1.0),
            redispatch_seconds=reader.get("TASKLANE_REDISPATCH_SECONDS", _positive_float, 30.0),
            shutdown_grace_seconds=reader.get(
                "TASKLANE_SHUTDOWN_GRACE_SECONDS", _non_negative_float, 10.0
            ),
            startup_wait_seconds=reader.get(
                "TASKLANE_STARTUP_WAIT_SECONDS", _non_negative_float, 30.0
            ),
            max_input_bytes=reader.get(
                "TASKLANE_MAX_INPUT_BYTES", _positive_int, DEFAULT_MAX_INPUT_BYTES
            ),
            max_output_bytes=reader.get(
                "TASKLANE_MAX_OUTPUT_BYTES", _positive_int, DEFAULT_MAX_OUTPUT_BYTES
            ),
            max_children=reader.get("TASKLANE_MAX_CHILDREN", _positive_int, DEFAULT_MAX_CHILDREN),
            db_pool_size=reader.get("TASKLANE_DB_POOL_SIZE", _positive_int, 10),
            db_statement_cache=reader.get("TASKLANE_DB_STATEMENT_CACHE", _bool, True),
            db_timeout_seconds=reader.get("TASKLANE_DB_TIMEOUT_SECONDS", _positive_float, 30.0),
            db_lock_timeout_seconds=reader.get(
                "TASKLANE_DB_LOCK_TIMEOUT_SECONDS", _positive_float, 10.0
            ),
            db_session_timeouts=reader.get("TASKLANE_DB_SESSION_TIMEOUTS", _bool, True),
            redis_timeout_seconds=reader.get(
                "TASKLANE_REDIS_TIMEOUT_SECONDS", _positive_float, 5.0
            ),
            log_format=reader.get("LOG_FORMAT", _log_format, None),
            log_level=reader.get("LOG_LEVEL", _log_level, "INFO"),
            liveness_path=reader.get(
                "TASKLANE_LIVENESS_PATH", _absolute_path, DEFAULT_LIVENESS_PATH
            ),
            metrics_port=reader.get("TASKLANE_METRICS_PORT", port_number, None),
            metrics_host=reader.get("TASKLANE_METRICS_HOST", _host, DEFAULT_METRICS_HOST),
            tracing=reader.get("TASKLANE_TRACING", check_tracing, "off"),
        )
        if overrides:
            known = {f.name for f in fields(cls)}
            unknown = set(overrides) - known
            if unknown:
                raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
            settings = replace(settings, **overrides)
        reader.check(settings)
        return settings

    def describe(self) -> dict[str, Any]:
        """The settings with secrets masked, fit for a log line."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["database_url"] = redact_url(self.database_url)
        values["redis_url"] = redact_url(self.redis_url)
        return values


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        return self._parse(name, raw, parse, default)

    def secret(self, name: str, parse: Callable[[str], T], default: T) -> T:
        """`name`, or the content of the file that `name`_FILE names (surrounding whitespace,
        such as the newline an editor adds, is dropped)."""
        file_variable = f"{name}_FILE"
        path = self.env.get(file_variable, "").strip()
        if not path:
            return self.get(name, parse, default)
        if self.env.get(name, "").strip():
            self.problems.append(f"{name} and {file_variable} are both set: keep one")
            return default
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            self.problems.append(f"{file_variable}: cannot read {path}: {exc.strerror or exc}")
            return default
        except UnicodeDecodeError:
            self.problems.append(f"{file_variable}: {path} is not UTF-8 text")
            return default
        if not raw.strip():
            self.problems.append(f"{file_variable}: {path} is empty")
            return default
        return self._parse(file_variable, raw, parse, default)

    def _parse(self, name: str, raw: str, parse: Callable[[str], T], default: T) -> T:
        try:
            return parse(raw.strip())
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def check(self, settings: Settings) -> None:
        if settings.retry_max_seconds < settings.retry_base_seconds:
            self.problems.append(
                "TASKLANE_RETRY_MAX_SECONDS must not be below TASKLANE_RETRY_BASE_SECONDS"
            )
        if self.problems:
            raise ConfigError("invalid configuration: " + "; ".join(self.problems))


def _database_url(raw: str) -> str:
    try:
        url = parse_db_url(raw)
    except ValueError:
        raise ValueError(f"not a database URL: {redact_url(raw)!r}") from None
    if not url.drivername.startswith("postgresql"):
        raise ValueError(f"must be a postgresql:// URL, got {url.drivername}://")
    if not url.database:
        raise ValueError("names no database (expected postgresql://user@host:5432/dbname)")
    return raw


def _redis_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(f"must be a redis:// URL, got {redact_url(raw)!r}")
    if parts.scheme != "unix":
        try:
            parts.port  # noqa: B018 - parsing it validates it
        except ValueError:
            raise ValueError(f"has an invalid port: {redact_url(raw)!r}") from None
    return raw


def _modules(raw: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ValueError(f"{module!r} is not a module name")
    if not modules:
        raise ValueError("names no module")
    return modules


def _absolute_path(raw: str) -> str:
    # The worker writes it and a probe, started from any directory, reads it.
    if not raw.startswith("/"):
        raise ValueError(f"must be an absolute path, got {raw!r}")
    return raw


def queue_name(raw: str) -> str:
    """A queue name (TASKLANE_QUEUE, `tasklane worker --queue`): no whitespace, not empty, at
    most MAX_QUEUE_LENGTH characters (it is part of a btree index on tasks, whose entries hold
    at most 2704 bytes, and of arq's Redis keys)."""
    if not raw:
        raise ValueError("must not be empty")
    if any(c.isspace() for c in raw):
        raise ValueError(f"must not contain whitespace: {raw!r:.60}")
    if len(raw) > MAX_QUEUE_LENGTH:
        raise ValueError(f"is {len(raw)} characters, over the limit of {MAX_QUEUE_LENGTH}")
    return raw


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _attempts(raw: str) -> int:
    value = _positive_int(raw)
    if value > MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"must be at most {MAX_ATTEMPTS_LIMIT}, got {value}")
    return value


def concurrency(raw: str) -> int:
    """TASKLANE_CONCURRENCY, `tasklane worker --concurrency`: 1 to MAX_CONCURRENCY."""
    value = _positive_int(raw)
    if value > MAX_CONCURRENCY:
        raise ValueError(f"must be at most {MAX_CONCURRENCY}, got {value}")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a finite number ≥ 0, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = _non_negative_float(raw)
    if value == 0:
        raise ValueError("must be greater than 0")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _log_format(raw: str) -> str:
    if raw.lower() not in {"json", "console"}:
        raise ValueError(f"expected json or console, got {raw!r}")
    return raw.lower()


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return level


def port_number(raw: str) -> int:
    """A TCP port to listen on (TASKLANE_METRICS_PORT, `tasklane metrics --port`)."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a port number, got {raw!r}") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port from 1 to 65535, got {value}")
    return value


def _host(raw: str) -> str:
    if any(c.isspace() for c in raw) or len(raw) > 255:
        raise ValueError(f"expected a host name or address, got {raw!r:.60}")
    return raw
