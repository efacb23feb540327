"""The dashboard: its audit log, and the indexes its pages read by.

`audit_log` records every action taken through `tasklane web` (who, from where, what, on which
tasks or which filter, how many). The indexes serve the dashboard's bounded reads: the task list
by status or by agent in creation order (keyset pages), finished tasks by completion time (the
overview's failures and the failure rates), and finished runs by time (runs per minute). The
status index replaces `ix_tasks_status_created` (same leading columns, plus `id` for the keyset).
They are built CONCURRENTLY: a busy `tasks` table keeps taking writes meanwhile. This migration
only extends the schema.

Revision ID: 0007
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = "status IN ('completed', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("matched", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("changed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'done', 'failed')", name=op.f("ck_audit_log_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.get_context().autocommit_block():
        _create("ix_tasks_by_status", "tasks", ["status", "created_at", "id"])
        _create("ix_tasks_by_agent", "tasks", ["agent_id", "status", "created_at", "id"])
        _create("ix_tasks_finished", "tasks", ["status", "completed_at", "id"], where=FINISHED)
        _create(
            "ix_task_attempts_finished",
            "task_attempts",
            ["finished_at"],
            where="finished_at IS NOT NULL",
        )
        op.drop_index(
            "ix_tasks_status_created",
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _create("ix_tasks_status_created", "tasks", ["status", "created_at"])
        for name, table in (
            ("ix_task_attempts_finished", "task_attempts"),
            ("ix_tasks_finished", "tasks"),
            ("ix_tasks_by_agent", "tasks"),
            ("ix_tasks_by_status", "tasks"),
        ):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    op.drop_table("audit_log")


def _create(name: str, table: str, columns: list[str], where: str | None = None) -> None:
    op.create_index(
        name,
        table,
        columns,
        unique=False,
        postgresql_concurrently=True,
        if_not_exists=True,
        **({"postgresql_where": sa.text(where)} if where else {}),
    )
