"""Database URLs read as SQLAlchemy reads them, without importing SQLAlchemy.

The CLI's read commands, `health` and the settings check parse DATABASE_URL; importing
SQLAlchemy for that would be most of a command's run time. This module follows
`sqlalchemy.engine.url.make_url` and `URL.render_as_string` exactly (tests/unit/test_url.py
compares them on generated URLs), so that a URL means the same thing to every part of tasklane.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, quote_plus, unquote

# sqlalchemy.engine.url._parse_url's pattern.
_PATTERN = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
        """,
    re.X,
)


@dataclass(frozen=True, slots=True)
class DbUrl:
    drivername: str
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    # Each key once, its values in order (SQLAlchemy keeps a list when a key repeats).
    query: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def set(self, *, drivername: str) -> DbUrl:
        return replace(self, drivername=drivername)

    def render_as_string(self, *, hide_password: bool = True) -> str:
        s = self.drivername + "://"
        if self.username is not None:
            s += quote(self.username, safe=" +")
            if self.password is not None:
                s += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            s += "@"
        if self.host is not None:
            s += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            s += ":" + str(self.port)
        if self.database is not None:
            s += "/" + quote(self.database, safe=" +/")
        if self.query:
            s += "?" + "&".join(
                f"{quote_plus(key)}={quote_plus(value)}"
                for key, values in sorted(self.query)
                for value in values
            )
        return s


def parse(raw: str) -> DbUrl:
    """`raw` as SQLAlchemy's `make_url` reads it; ValueError if it is no URL."""
    m = _PATTERN.match(raw)
    if m is None:
        raise ValueError("Could not parse SQLAlchemy URL from given URL string")
    parts = m.groupdict()
    query: dict[str, list[str]] = {}
    if parts["query"] is not None:
        for key, value in parse_qsl(parts["query"]):
            query.setdefault(key, []).append(value)
    port = None if parts["port"] is None else int(parts["port"])  # "" is refused, as there
    return DbUrl(
        drivername=parts["name"],
        username=None if parts["username"] is None else unquote(parts["username"]),
        password=None if parts["password"] is None else unquote(parts["password"]),
        host=parts["ipv4host"] or parts["ipv6host"],
        port=port,
        database=None if parts["database"] is None else unquote(parts["database"]),
        query=tuple((key, tuple(values)) for key, values in query.items()),
    )


def postgres(raw: str) -> DbUrl:
    """`raw`, which must name a PostgreSQL driver; ValueError otherwise."""
    url = parse(raw)
    if not url.drivername.startswith("postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {url.render_as_string(hide_password=True)}")
    return url


def asyncpg_dsn(raw: str) -> str:
    """The libpq-style DSN asyncpg takes, from a tasklane database URL (any postgresql
    driver)."""
    return postgres(raw).set(drivername="postgresql").render_as_string(hide_password=False)
