"""worker.redaction: secrets in every shape are redacted; what only looks like one is left alone."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings

from tests.support.secrets import Secret, secret_structures, secret_texts
from worker.redaction import is_secret_key, redact, redact_text, redact_url


@hypothesis_settings(max_examples=300)
@given(drawn=secret_texts())
def test_every_shape_of_secret_in_text_is_redacted(drawn: tuple[Secret, str]) -> None:
    secret, text = drawn
    redacted = redact_text(text)
    assert not secret.leaks(redacted), (text, redacted)
    assert "***" in redacted


@hypothesis_settings(max_examples=100)
@given(drawn=secret_structures())
def test_secrets_are_redacted_at_any_depth(drawn: tuple[Secret, Any]) -> None:
    secret, value = drawn
    assert not secret.leaks(repr(redact(value)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:hunter2@db/x", "postgresql://app:***@db/x"),
        ("redis://:p@ss@cache:6379/0", "redis://:***@cache:6379/0"),
        ("host=db password='it''s x' dbname=app", "host=db password='***' dbname=app"),
        ("?sslpassword=abc", "?sslpassword=***"),
        ('{"client_secret": "a \\" b"}', '{"client_secret": "***"}'),
        ("X-Api-Key: k-1", "X-Api-Key: ***"),
        ("Authorization: Bearer abc", "Authorization: ***"),
        ("PGPASSWORD=abc psql", "PGPASSWORD=*** psql"),
        # cut off by a renderer before its end: what is left of it is redacted
        ("url postgresql://u:verylongpassw…", "url postgresql://u:***…"),
        # a password too long to look for its @: redacted to the whitespace
        ("x redis://:" + "p" * 2000 + "@h/0 y", "x redis://:*** y"),
    ],
)
def test_redacted_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens=500 token_count: 3 tokens=4",
        "idempotency_key=abc cache_key=1 bypass=1",
        'password authentication failed for user "postgres"',
        "postgresql+asyncpg://postgres@127.0.0.1:5432/tasklane",
        "redis://127.0.0.1:6379/0",
        "2026-01-01T00:00:00+00:00 task.completed 01a21650-ec14-744c-a330-ec75111b4da4",
    ],
)
def test_text_that_only_looks_secret_is_unchanged(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("PGPASSWORD", True),
        ("client_secret", True),
        ("id_token", True),
        ("apiKey", True),
        ("X-Api-Key", True),
        ("Proxy-Authorization", True),
        ("db_pass", True),
        ("max_tokens", False),
        ("token_count", False),
        ("idempotency_key", False),
        ("author", False),
        ("bypass", False),
    ],
)
def test_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_a_whole_url_is_redacted_up_to_its_last_at_even_across_spaces() -> None:
    # SQLAlchemy takes anything but @ as a password; text redaction stops at whitespace
    url = "postgresql://app:p w@d@db/x?password=zz"
    assert redact_url(url) == "postgresql://app:***@db/x?password=***"


def test_redact_walks_20000_levels_and_cuts_cycles() -> None:
    value: Any = {"password": "hunter2"}
    for _ in range(20_000):
        value = [value]
    out = redact(value)
    for _ in range(20_000):
        out = out[0]
    assert out == {"password": "***"}

    loop: dict[str, Any] = {"token": "x", "url": "redis://:hunter2@h"}
    loop["self"] = loop
    assert redact(loop) == {"token": "***", "url": "redis://:***@h", "self": "<cycle>"}


def test_max_depth_replaces_what_is_below_with_a_marker() -> None:
    assert redact([[["redis://:hunter2@h"]]], max_depth=2) == [["<nested deeper than 2 levels>"]]


def test_stringify_redacts_the_repr_of_other_objects() -> None:
    out = redact({"error": ValueError("token=hunter2"), "n": 1}, stringify=True)
    assert out == {"error": "ValueError('token=***", "n": 1}
