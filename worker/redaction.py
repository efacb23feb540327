"""Secrets never print: the one redaction every output path uses.

Log lines (both renderers, library logs too), exception texts and tracebacks, every line and
document the CLI prints, and the handler errors stored in `tasks.error` / `task_attempts.error`
pass through here. What is redacted:

- the password of a URL's user part: `postgresql://app:***@db/x`, `redis://:***@cache:6379`;
- the value after a secret-looking key in text: query strings (`?sslpassword=***`), key=value
  DSNs (`host=db password=***`), headers (`Authorization: ***`, `X-Api-Key: ***`), reprs and
  JSON text (`{'client_secret': '***'}`);
- the word after `Bearer` anywhere;
- the value of a secret-looking key in a dict, at any depth.

A key looks secret when it contains password, passwd, passphrase or secret (`PGPASSWORD`,
`client_secret`, `db_password`), or ends with token, auth, authorization, cookie, credential(s),
jwt, pwd, pass, or an api/private/access/signing/encryption/client/master/session/ssh key
(`access_token`, `X-Api-Key`, `apiKey`). `max_tokens` or `token_count` are not secrets.

When unsure, this redacts too much rather than too little: a value runs to the next
whitespace (or its closing quote), a URL's password to the last `@` before whitespace.

Standard library only, so any layer may use it. Cheap on the hot path: a string that contains
none of the trigger words is returned after one lower-casing and a few substring tests.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

REDACTED = "***"

_ANYWHERE = r"pass(?:word|wd|phrase)|secret"
_AT_END = (
    r"token|auth|authorization|cookie|credentials?|jwt|pwd|(?<![a-z0-9])pass"
    r"|(?:api|private|access|signing|encryption|client|master|session|ssh)[_-]?key"
)
# Every part that can repeat is bounded (64 characters of a key around its secret word, 1024 of
# a URL password or a quoted value) or possessive, so that no text, however long or crafted,
# makes the scan worse than linear: a log line is redacted in the worker's event loop. Past a
# bound the redaction runs to the next whitespace.
_KEY = rf"[\w.-]{{0,64}}?(?:{_ANYWHERE})[\w.-]{{0,64}}+|[\w.-]{{0,64}}?(?:{_AT_END})"
_SECRET_KEY = re.compile(_KEY, re.IGNORECASE)

# A quoted value ends at its closing quote only where something else begins after it, and not
# after a backslash: in text escaped twice (JSON inside a repr) an escaped quote looks like a
# closing one, and then the value runs to the next whitespace instead. A quote never closed
# (the text was cut) runs to the end.
_QUOTED = r"""
    (?:"(?:[^"\\]|\\.){0,1024}+(?<!\\)"|'(?:[^'\\]|\\.|''){0,1024}+(?<!\\)')(?=[\s,;&)}\]]|$)
    | "[^"]{0,1024}+$ | '[^']{0,1024}+$
"""
_SECRETS_IN_TEXT = re.compile(
    rf"""
    (?<![\w+.-])(?P<url>[a-z][a-z0-9+.-]{{0,31}}://[^\s:/@]{{0,256}}+:)  # scheme://user:
        (?P<password>(?:[^\s@]{{0,1024}}+@)+  # to the last @,
        | [^\s@…]{{0,1024}}+…                  # or to where the text was cut,
        | [^\s@]{{1024}}\S*+)                  # or, when too long to tell, to the whitespace
    | (?<![\w.-])(?P<key>{_KEY})(?P<sep>\\{{0,4}}["']?\s{{0,8}}[=:]\s{{0,8}})
        (?P<value>{_QUOTED}|(?:(?:bearer|basic|token|digest)\s{{1,8}})?\S+)
    | \b(?P<scheme>bearer\s{{1,8}})(?P<token>\S+)
    """,
    re.IGNORECASE | re.VERBOSE,
)


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a value stored under `key` (a dict key, a header, an environment variable) is a
    secret. Cached: the same few keys come by on every log line."""
    return _SECRET_KEY.fullmatch(key) is not None


def redact_text(text: str) -> str:
    """`text` with every secret this module recognises replaced by ***."""
    if not _may_hold_secret(text.lower()):
        return text
    return _SECRETS_IN_TEXT.sub(_replace, text)


def _may_hold_secret(lowered: str) -> bool:
    """The cheap pre-test (most log values are ids, names and numbers): every pattern above
    needs one of these. Spelled out, it is about twice as fast as `any()` over a tuple."""
    return (
        "pass" in lowered
        or "pwd" in lowered
        or "secret" in lowered
        or "token" in lowered
        or "auth" in lowered
        or "cookie" in lowered
        or "credential" in lowered
        or "jwt" in lowered
        or "key" in lowered
        or "bearer" in lowered
        or "://" in lowered
    )


def _replace(match: re.Match[str]) -> str:
    if match["url"] is not None:
        end = match["password"][-1]
        return match["url"] + REDACTED + (end if end in "@…" else "")
    if match["scheme"] is not None:
        return match["scheme"] + REDACTED
    value = match["value"]
    quote = value[0] if value[0] in "'\"" else ""
    closing = quote if quote and len(value) > 1 and value.endswith(quote) else ""
    return match["key"] + match["sep"] + quote + REDACTED + closing


def redact_url(url: str) -> str:
    """A URL (a whole one, e.g. DATABASE_URL) with its passwords replaced by ***.

    Knowing that the whole string is one URL, the user part's password runs to the last `@`
    even across spaces (SQLAlchemy accepts any character but `@` there).
    """
    head, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon and "/" not in user:
            url = f"{head}://{user}:{REDACTED}@{host}"
    return redact_text(url)


def redact(value: Any, *, stringify: bool = False, max_depth: int | None = None) -> Any:
    """A copy of `value` with secrets redacted: strings through `redact_text`, dict values under
    secret keys replaced, dicts and lists walked at any depth (iteratively: no recursion limit).

    Tuples and sets become lists. With `stringify`, any other object (an exception, a URL
    object, a dataclass) becomes its redacted repr — what a log renderer would print for it.
    With `max_depth`, containers nested deeper are replaced by a marker. A container that holds
    itself is replaced by a marker where it recurs.
    """
    root: list[Any] = [value]
    # Slots still to fill: (the container holding the original, its key, the depth). A _LEAVE
    # entry closes a container once everything below it is done (to recognise cycles).
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    open_containers: set[int] = set()
    while stack:
        holder, key, depth = stack.pop()
        if holder is _LEAVE:
            open_containers.discard(key)
            continue
        original = holder[key]
        if isinstance(original, str):
            holder[key] = redact_text(original)
        elif isinstance(original, dict | list | tuple | set | frozenset):
            if id(original) in open_containers:
                holder[key] = "<cycle>"
                continue
            if max_depth is not None and depth >= max_depth:
                holder[key] = f"<nested deeper than {max_depth} levels>"
                continue
            open_containers.add(id(original))
            stack.append((_LEAVE, id(original), depth))
            copy: Any
            if isinstance(original, dict):
                copy = {}
                for k, v in original.items():
                    if isinstance(k, str):
                        if is_secret_key(k):
                            copy[redact_text(k)] = REDACTED
                            continue
                        k = redact_text(k)
                    copy[k] = v
                    stack.append((copy, k, depth + 1))
            else:
                copy = list(original)
                stack.extend((copy, i, depth + 1) for i in range(len(copy)))
            holder[key] = copy
        elif stringify and not isinstance(original, int | float | bool | None):
            holder[key] = redact_text(repr(original))
    return root[0]


_LEAVE: Any = object()
