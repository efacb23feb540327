"""DATABASE_URL_FILE and REDIS_URL_FILE: the URLs (and their passwords) read from secret files,
so that they need not appear in the environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings

DATABASE_URL = "postgresql://tasklane:s3cret@db:5432/tasklane"
REDIS_URL = "redis://:r3dis@cache:6379/0"


def secret(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def test_urls_are_read_from_files_without_the_editors_newline(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL_FILE": secret(tmp_path, "db", DATABASE_URL + "\n"),
            "REDIS_URL_FILE": secret(tmp_path, "redis", f"  {REDIS_URL}\r\n"),
        }
    )
    assert settings.database_url == DATABASE_URL
    assert settings.redis_url == REDIS_URL
    described = str(settings.describe())
    assert "s3cret" not in described
    assert "r3dis" not in described


def test_an_empty_file_variable_falls_back_to_the_plain_variable() -> None:
    settings = Settings.from_env({"DATABASE_URL_FILE": " ", "DATABASE_URL": DATABASE_URL})
    assert settings.database_url == DATABASE_URL


@pytest.mark.parametrize(
    ("make_env", "message"),
    [
        (
            lambda tmp: {"DATABASE_URL": DATABASE_URL, "DATABASE_URL_FILE": secret(tmp, "db", "x")},
            "DATABASE_URL and DATABASE_URL_FILE are both set: keep one",
        ),
        (
            lambda tmp: {"REDIS_URL_FILE": str(tmp / "missing")},
            "REDIS_URL_FILE: cannot read {tmp}/missing: No such file or directory",
        ),
        (
            lambda tmp: {"REDIS_URL_FILE": str(tmp)},
            "REDIS_URL_FILE: cannot read {tmp}: Is a directory",
        ),
        (
            lambda tmp: {"DATABASE_URL_FILE": secret(tmp, "db", "\n")},
            "DATABASE_URL_FILE: {tmp}/db is empty",
        ),
        (
            lambda tmp: {"DATABASE_URL_FILE": secret(tmp, "db", "mysql://u:s3cret@h/db")},
            "DATABASE_URL_FILE: must be a postgresql:// URL, got mysql://",
        ),
    ],
    ids=["both-set", "missing", "a-directory", "empty", "not-postgres"],
)
def test_a_bad_secret_file_is_one_clear_line_without_the_secret(
    tmp_path: Path, make_env: Callable[[Path], dict[str, str]], message: str
) -> None:
    env = make_env(tmp_path)
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert message.format(tmp=tmp_path) in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.write_bytes(b"\xff\xfe postgres")
    with pytest.raises(ConfigError, match=f"DATABASE_URL_FILE: {path} is not UTF-8 text"):
        Settings.from_env({"DATABASE_URL_FILE": str(path)})
