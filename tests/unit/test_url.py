"""persistence.url reads a database URL exactly as SQLAlchemy's make_url does (the CLI parses
DATABASE_URL without importing SQLAlchemy; every other part of tasklane goes through SQLAlchemy)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from persistence import url

# Pieces that exercise the URL syntax: separators, escapes, brackets, unicode.
PIECE = st.text(alphabet=st.sampled_from("ab1_-.:@/?#%&=+[] é"), max_size=12)
SCHEME = st.sampled_from(["postgresql", "postgresql+asyncpg", "mysql", "redis", "p_1"])


@st.composite
def urls(draw: st.DrawFn) -> str:
    s = draw(SCHEME) + "://"
    if draw(st.booleans()):
        s += draw(PIECE)
        if draw(st.booleans()):
            s += ":" + draw(PIECE)
        s += "@"
    s += draw(st.sampled_from(["", "localhost", "127.0.0.1", "[::1]", "db.example"]))
    if draw(st.booleans()):
        s += ":" + draw(st.sampled_from(["5432", "", "x", "0", "99999"]))
    if draw(st.booleans()):
        s += "/" + draw(PIECE)
    if draw(st.booleans()):
        s += "?" + draw(PIECE)
    return s


@given(st.one_of(urls(), st.text(max_size=40)))
@example("postgresql+asyncpg://u%40x:p%2Fw%3A@[::1]:5433/d%20b?sslmode=require&a=1&a=2")
@example("postgresql://user:pa@ss@host/db")
@example("not a url")
def test_parse_reads_urls_as_sqlalchemy_does(raw: str) -> None:
    try:
        expected = make_url(raw)
    except (ArgumentError, ValueError):
        with pytest.raises(ValueError, match=r"Could not parse|invalid literal for int"):
            url.parse(raw)
        return
    got = url.parse(raw)
    assert got.drivername == expected.drivername
    assert got.username == expected.username
    assert got.password == expected.password
    assert got.host == expected.host
    assert got.port == expected.port
    assert got.database == expected.database
    assert {k: list(v) for k, v in got.query} == {
        k: list(v) if isinstance(v, tuple) else [v] for k, v in expected.query.items()
    }
    for hide in (True, False):
        assert got.render_as_string(hide_password=hide) == expected.render_as_string(
            hide_password=hide
        )


def test_the_asyncpg_dsn_drops_the_driver() -> None:
    dsn = url.asyncpg_dsn("postgresql+asyncpg://u:p%40w@h:1/d?sslmode=require")
    assert dsn == "postgresql://u:p%40w@h:1/d?sslmode=require"
    with pytest.raises(ValueError, match="not a PostgreSQL URL: mysql://u:\\*\\*\\*@h/d"):
        url.asyncpg_dsn("mysql://u:secret@h/d")
