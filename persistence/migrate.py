"""Alembic's upgrade, for `tasklane migrate` (and `dev`, `demo`) and the tests' template database.

The migrations are the `migrations` package installed beside this one, so no alembic.ini is
needed. Alembic's logging setup is skipped: the caller's logging stays in charge.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration for the database at `database_url` (any postgresql:// URL)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = database_url  # read by migrations/env.py
    config.attributes["skip_logging_setup"] = True
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to `revision`. Alembic runs its own event loop: call this outside
    one (from a thread, in async code)."""
    command.upgrade(alembic_config(database_url), revision)
