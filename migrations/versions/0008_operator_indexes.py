"""Operator indexes: `stats`, `list` and `prune` read index ranges at millions of rows.

- `ix_tasks_by_status (status, created_at, id)` replaces `ix_tasks_status_created`: `list
  --status` and the per-status ranges of `list` read it backwards, newest first, ties by id.
- `ix_tasks_by_conversation (conversation_id, created_at, id)` replaces `ix_tasks_conversation`.
- `ix_tasks_by_agent (agent_id, status, created_at, id)`: `list --agent`, the per-agent counts of
  `stats` and the skip scan that finds the distinct agents.
- `ix_tasks_finished (status, completed_at, id)` over finished tasks only: `prune` walks it
  oldest first, `stats` reads the last minute's finishes off it.
- `stx_tasks_agent_status`: extended statistics on (agent_id, status), so that the planner's
  estimate of one agent's count in one status (what `stats` prints past its count cap) is not the
  product of two independent guesses.

Every index is built CONCURRENTLY (writers keep going on a big table) and IF NOT EXISTS, each
new one before the one it replaces is dropped; an index a failed concurrent build left invalid is
dropped and built again. This migration only extends what queries can use: code written for
earlier revisions runs on it unchanged, so `oldest_code_revision` stays as it is.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = "('completed', 'failed', 'cancelled')"

NEW_INDEXES = {
    "ix_tasks_by_status": "ON tasks (status, created_at, id)",
    "ix_tasks_by_conversation": "ON tasks (conversation_id, created_at, id)",
    "ix_tasks_by_agent": "ON tasks (agent_id, status, created_at, id)",
    "ix_tasks_finished": f"ON tasks (status, completed_at, id) WHERE status IN {FINISHED}",
}
REPLACED = {
    "ix_tasks_status_created": "ON tasks (status, created_at)",
    "ix_tasks_conversation": "ON tasks (conversation_id, created_at)",
}


def _drop_invalid(names: Sequence[str]) -> None:
    """An index left INVALID by an interrupted concurrent build is not used, and IF NOT EXISTS
    would keep it: drop it so that it is built again."""
    invalid = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE NOT i.indisvalid AND c.relname = ANY(:names)"
            ),
            {"names": list(names)},
        )
        .scalars()
        .all()
    )
    for name in invalid:
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_invalid(list(NEW_INDEXES))
        for name, definition in NEW_INDEXES.items():
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")
        for name in REPLACED:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(
        "CREATE STATISTICS IF NOT EXISTS stx_tasks_agent_status (ndistinct, dependencies) "
        "ON agent_id, status FROM tasks"
    )


def downgrade() -> None:
    op.execute("DROP STATISTICS IF EXISTS stx_tasks_agent_status")
    with op.get_context().autocommit_block():
        _drop_invalid(list(REPLACED))
        for name, definition in REPLACED.items():
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}")
        for name in NEW_INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
