"""Secrets in every shape tasklane must redact, for the property tests of every output path.

A secret is `head + middle + tail`: the middle is any non-blank text (punctuation included, so
that a redaction that stops early is caught), head and tail are letters and digits that no
output contains by chance. A leak of any part of the secret shows its head or its tail, even
where the output escapes the middle (JSON, repr, a URL's percent-encoding).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

# Keys an operator would expect to be treated as secret: query parameters, DSN keywords, dict
# keys, environment variables, HTTP headers.
SECRET_KEYS = (
    "password",
    "sslpassword",
    "access_token",
    "refresh_token",
    "client_secret",
    "db_password",
    "PGPASSWORD",
    "passwd",
    "api_key",
    "X-Api-Key",
    "Authorization",
    "accessToken",
    "clientSecret",
)
_ALNUM = string.ascii_letters + string.digits
_MIDDLE = _ALNUM + string.punctuation + "éß€"


@dataclass(frozen=True)
class Secret:
    head: str
    middle: str
    tail: str

    @property
    def value(self) -> str:
        return self.head + self.middle + self.tail

    @property
    def quoted(self) -> str:
        """As a URL carries it (percent-encoded)."""
        return quote(self.value, safe="")

    def leaks(self, output: str) -> list[str]:
        """The parts of the secret that `output` shows."""
        return [part for part in (self.value, self.quoted, self.head, self.tail) if part in output]


SECRETS = st.builds(
    Secret,
    head=st.text(_ALNUM, min_size=4, max_size=4).map(lambda s: "Hq" + s),
    middle=st.text(_MIDDLE, max_size=12),
    tail=st.text(_ALNUM, min_size=4, max_size=4).map(lambda s: s + "Zx"),
)


def shapes(key: str, secret: Secret) -> list[str]:
    """Texts that carry `secret` in every shape tasklane recognises, `key` naming it."""
    s, q = secret.value, secret.quoted
    return [
        f"postgresql+asyncpg://app:{q}@db.internal:5432/app",
        f"redis://:{q}@cache:6379/0",
        f"postgresql://app@db/app?sslmode=require&{key}={q}&application_name=x",
        f"host=db port=5432 {key}={s} dbname=app",
        f"{key}={s}",
        f"{key}: {s}",
        json.dumps({key: s, "other": 1}),
        repr({key: s, "other": 1}),
        f"Authorization: Bearer {s}",
        f"sent Bearer {s} upstream",
    ]


@st.composite
def secret_texts(draw: st.DrawFn) -> tuple[Secret, str]:
    """A secret and one text carrying it."""
    secret = draw(SECRETS)
    key = draw(st.sampled_from(SECRET_KEYS))
    return secret, draw(st.sampled_from(shapes(key, secret)))


@st.composite
def secret_structures(draw: st.DrawFn) -> tuple[Secret, Any]:
    """A secret inside dicts and lists nested 0 to 150 deep: as a text, or as the value of a
    secret key."""
    secret, text = draw(secret_texts())
    key = draw(st.sampled_from(SECRET_KEYS))
    value: Any = draw(st.sampled_from([text, {key: secret.value}, {key: {"nested": text}}]))
    for step in range(draw(st.integers(0, 150))):
        value = [value, "x"] if step % 2 else {"level": value, "n": step}
    return secret, value
