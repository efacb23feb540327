"""Typed settings from the environment, validated at start.

A bad value stops the process with one line naming the variable and what is wrong, before any
connection is attempted. Every problem is reported at once, not the first one only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from domain.entities import DEFAULT_QUEUE
from domain.payload import DEFAULT_MAX_INPUT_BYTES

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/tasklane"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AGENTS = "worker.demo_agents"

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
    db_pool_size: int = 10
    db_statement_cache: bool = True
    log_format: str | None = None  # None: console on a TTY, JSON otherwise
    log_level: str = "INFO"

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        settings = cls(
            database_url=reader.get("DATABASE_URL", _database_url, DEFAULT_DATABASE_URL),
            redis_url=reader.get("REDIS_URL", _redis_url, DEFAULT_REDIS_URL),
            agent_modules=reader.get("TASKLANE_AGENTS", _modules, (DEFAULT_AGENTS,)),
            queue=reader.get("TASKLANE_QUEUE", _name, DEFAULT_QUEUE),
            concurrency=reader.get("TASKLANE_CONCURRENCY", _positive_int, 50),
            lease_seconds=reader.get("TASKLANE_LEASE_SECONDS", _positive_float, 30.0),
            task_timeout=reader.get("TASKLANE_TASK_TIMEOUT", _positive_float, 300.0),
            max_attempts=reader.get("TASKLANE_MAX_ATTEMPTS", _positive_int, 3),
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
            db_pool_size=reader.get("TASKLANE_DB_POOL_SIZE", _positive_int, 10),
            db_statement_cache=reader.get("TASKLANE_DB_STATEMENT_CACHE", _bool, True),
            log_format=reader.get("LOG_FORMAT", _log_format, None),
            log_level=reader.get("LOG_LEVEL", _log_level, "INFO"),
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


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
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
        url = make_url(raw)
    except ArgumentError:
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


def _name(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError(f"must not contain whitespace: {raw!r}")
    return raw


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
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
