"""Hardening: the domain's rules as CHECKs, fan-in and claim indexes, claim tokens, schema compat.

- `tasks.agent_id` follows the domain's pattern (it allowed tabs and newlines, which the domain
  refuses, so such a row was claimed and could not be loaded); `max_attempts` is bounded; a task
  cannot be its own parent. Unfinished rows that break a new rule are failed first, with the
  reason; finished rows are exempt, so history written before the rules stays as it was.
- `ix_tasks_open_children`: "is any child of this parent unfinished?" reads only unfinished
  children (fan-in was O(N²)). `ix_tasks_pending_agent` orders by due time, for claims straight
  from Postgres while Redis is away.
- `task_attempts.claim_token`: a claim whose answer was lost is adopted only for the run that very
  statement started.
- `workers.abandoned_handlers`: handlers left running past their timeout, for `health`.
- `tasklane_schema.oldest_code_revision`: the oldest code this schema serves. This migration only
  extends the schema, so code written for 0001 still runs on it: '0001'.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AGENT_ID_PATTERN = "^[A-Za-z0-9_][A-Za-z0-9_.:/@-]{0,199}$"
MAX_ATTEMPTS = 10000
UNFINISHED = "('pending', 'running', 'waiting')"


def upgrade() -> None:
    # Unfinished rows that break the new rules would never run right: fail them, saying why.
    op.execute(
        f"""
        UPDATE tasks SET status = 'failed', completed_at = now(), lease_expires_at = NULL,
               error = 'agent id ' || quote_literal(left(agent_id, 60))
                       || ' is not a valid agent id (tasklane migration 0002)',
               version = version + 1, updated_at = now()
        WHERE status IN {UNFINISHED} AND agent_id !~ '{AGENT_ID_PATTERN}'
        """
    )
    op.execute(
        f"""
        UPDATE tasks SET status = 'failed', completed_at = now(), lease_expires_at = NULL,
               error = 'a task cannot be its own parent (tasklane migration 0002)',
               version = version + 1, updated_at = now()
        WHERE status IN {UNFINISHED} AND parent_task_id = id
        """
    )
    op.execute(
        f"""
        UPDATE tasks SET max_attempts = GREATEST({MAX_ATTEMPTS}, attempts)
        WHERE max_attempts > {MAX_ATTEMPTS} AND status IN {UNFINISHED}
        """
    )
    op.drop_constraint(op.f("ck_tasks_agent_id_not_blank"), "tasks", type_="check")
    op.drop_constraint(op.f("ck_tasks_max_attempts_positive"), "tasks", type_="check")
    for name, rule in [
        ("agent_id_format", f"agent_id ~ '{AGENT_ID_PATTERN}'"),
        ("max_attempts_range", f"max_attempts IS NULL OR max_attempts BETWEEN 1 AND {MAX_ATTEMPTS}"),
        ("not_its_own_parent", "parent_task_id IS DISTINCT FROM id"),
    ]:
        op.create_check_constraint(
            op.f(f"ck_tasks_{name}"), "tasks", f"status NOT IN {UNFINISHED} OR {rule}"
        )

    op.drop_index("ix_tasks_pending_agent", table_name="tasks")
    op.create_index(
        "ix_tasks_pending_agent",
        "tasks",
        ["agent_id", "run_after"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_tasks_open_children",
        "tasks",
        ["parent_task_id"],
        postgresql_where=sa.text(f"parent_task_id IS NOT NULL AND status IN {UNFINISHED}"),
    )
    op.add_column("task_attempts", sa.Column("claim_token", sa.Uuid(), nullable=True))
    op.add_column(
        "workers",
        sa.Column("abandoned_handlers", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_table(
        "tasklane_schema",
        sa.Column("oldest_code_revision", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("oldest_code_revision", name=op.f("pk_tasklane_schema")),
    )
    op.execute("INSERT INTO tasklane_schema (oldest_code_revision) VALUES ('0001')")


def downgrade() -> None:
    op.drop_table("tasklane_schema")
    op.drop_column("workers", "abandoned_handlers")
    op.drop_column("task_attempts", "claim_token")
    op.drop_index("ix_tasks_open_children", table_name="tasks")
    op.drop_index("ix_tasks_pending_agent", table_name="tasks")
    op.create_index(
        "ix_tasks_pending_agent",
        "tasks",
        ["agent_id", "created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    for name in ("not_its_own_parent", "max_attempts_range", "agent_id_format"):
        op.drop_constraint(op.f(f"ck_tasks_{name}"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_max_attempts_positive"), "tasks", "max_attempts IS NULL OR max_attempts >= 1"
    )
    op.create_check_constraint(
        op.f("ck_tasks_agent_id_not_blank"), "tasks", "length(btrim(agent_id)) > 0"
    )
