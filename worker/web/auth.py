"""Who may act on the dashboard: the operator token, the signed session, CSRF.

Without a token (`TASKLANE_WEB_TOKEN` or `TASKLANE_WEB_TOKEN_FILE`) the dashboard is read-only.
With one, an operator signs in with the token and a name (the name goes to the audit log); the
session is a cookie signed with a key derived from the token (changing the token signs everyone
out), HttpOnly and SameSite=Strict. Every form carries the session's CSRF token, and a request
a browser marks as cross-site, or whose Origin is another site, is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

TOKEN_VARIABLE = "TASKLANE_WEB_TOKEN"
MIN_TOKEN_CHARS = 16
SESSION_COOKIE = "tasklane_session"
SESSION_SECONDS = 12 * 3600
MAX_NAME_CHARS = 64
_NAME = re.compile(r"^[\w .@+-]{1,64}$")


class TokenError(Exception):
    """The configured token is unusable (one line for the operator)."""


def read_token(env: Mapping[str, str]) -> str | None:
    """The operator token from TASKLANE_WEB_TOKEN or the file TASKLANE_WEB_TOKEN_FILE names;
    None: read-only."""
    file_variable = f"{TOKEN_VARIABLE}_FILE"
    path = env.get(file_variable, "").strip()
    value = env.get(TOKEN_VARIABLE, "").strip()
    if path and value:
        raise TokenError(f"{TOKEN_VARIABLE} and {file_variable} are both set: keep one")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"{file_variable}: cannot read {path}: {exc}") from None
        if not value:
            raise TokenError(f"{file_variable}: {path} is empty")
    if not value:
        return None
    if len(value) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"{TOKEN_VARIABLE} must be at least {MIN_TOKEN_CHARS} characters "
            f"(got {len(value)}); e.g. `openssl rand -hex 24`"
        )
    return value


def valid_name(name: str) -> str | None:
    """The name an operator signs in with, trimmed, or None if it is not acceptable."""
    name = " ".join(name.split())
    return name if _NAME.match(name) else None


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    csrf: str


class Access:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self._serializer: URLSafeTimedSerializer | None = None
        if token is not None:
            key = hmac.new(token.encode(), b"tasklane-web-session", hashlib.sha256).hexdigest()
            self._serializer = URLSafeTimedSerializer(key, salt="tasklane-web")

    @property
    def read_only(self) -> bool:
        return self.token is None

    def token_matches(self, offered: str) -> bool:
        if self.token is None:
            return False
        return hmac.compare_digest(offered.strip().encode(), self.token.encode())

    def new_session(self, name: str) -> tuple[Session, str]:
        """A session for `name` and the cookie value that carries it."""
        assert self._serializer is not None
        session = Session(name=name, csrf=secrets.token_urlsafe(24))
        return session, self._serializer.dumps({"name": session.name, "csrf": session.csrf})

    def session(self, cookie: str | None) -> Session | None:
        if self._serializer is None or not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        name, csrf = data.get("name"), data.get("csrf")
        if not isinstance(name, str) or not isinstance(csrf, str):
            return None
        return Session(name, csrf)


def cross_site(headers: Mapping[str, str], scheme: str, host: str) -> str | None:
    """Why a state-changing request is refused as cross-site, or None if it is not."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{host}":
        return "cross-site request refused (Origin is another site)"
    return None


def csrf_matches(session: Session, offered: str | None) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), session.csrf.encode())
