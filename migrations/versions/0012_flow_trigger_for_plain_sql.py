"""The flow trigger fires on insert only for rows that did not bring their limit key and due rank.

`tasklane_task_flow` (migration 0005) keeps `limit_key` and `due_rank` right for every row,
including rows written with plain SQL. Every task tasklane inserts now computes both in its
INSERT (persistence/repositories/task_sql.py: a join with flow_limits, set-based), where the
trigger called a function and looked up flow_limits once per row: about a third of the server's
work per inserted task (README, Performance). So:

- the columns lose their defaults: a row that omits them reaches the trigger with NULLs, and
  NOT NULL (checked after BEFORE triggers) still guarantees that every row has both;
- on INSERT the trigger fires only `WHEN (NEW.limit_key IS NULL OR NEW.due_rank IS NULL)`, and
  then computes both as before; on UPDATE it fires as before.

Code written for earlier revisions inserts through the trigger still (its INSERT omits both),
so `oldest_code_revision` stays as it is.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ON_UPDATE = "UPDATE OF run_after, priority, agent_id, queue, metadata, input"


def upgrade() -> None:
    op.execute("DROP TRIGGER tasklane_task_flow ON tasks")
    op.execute(
        "ALTER TABLE tasks ALTER COLUMN limit_key DROP DEFAULT,"
        " ALTER COLUMN due_rank DROP DEFAULT"
    )
    op.execute(
        "CREATE TRIGGER tasklane_task_flow_on_insert BEFORE INSERT ON tasks FOR EACH ROW"
        " WHEN (NEW.limit_key IS NULL OR NEW.due_rank IS NULL)"
        " EXECUTE FUNCTION tasklane_task_flow()"
    )
    op.execute(
        f"CREATE TRIGGER tasklane_task_flow BEFORE {ON_UPDATE} ON tasks FOR EACH ROW"
        " EXECUTE FUNCTION tasklane_task_flow()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tasklane_task_flow_on_insert ON tasks")
    op.execute("DROP TRIGGER tasklane_task_flow ON tasks")
    op.execute(
        "ALTER TABLE tasks ALTER COLUMN limit_key SET DEFAULT '',"
        " ALTER COLUMN due_rank SET DEFAULT now()"
    )
    op.execute(
        f"CREATE TRIGGER tasklane_task_flow BEFORE INSERT OR {ON_UPDATE} ON tasks FOR EACH ROW"
        " EXECUTE FUNCTION tasklane_task_flow()"
    )
