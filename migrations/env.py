"""Alembic environment: async engine, URL from DATABASE_URL, metadata from persistence.models.

`tasklane migrate` runs this too; it passes its own URL through `config.attributes["url"]` and
skips Alembic's logging setup so the CLI's logging stays in charge.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from persistence.models import Base
from persistence.session import create_engine, database_url
from persistence.timeouts import MIGRATION_TIMEOUTS

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/tasklane"

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_setup"):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    return database_url(url).render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(
        _url(),
        pool_size=1,
        max_overflow=0,
        application_name="tasklane-migrate",
        timeouts=MIGRATION_TIMEOUTS,
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
