"""The dashboard: its audit log, and finished runs by time.

`audit_log` records every action taken through `tasklane web` (who, from where, what, on which
tasks or which filter, how many). `ix_task_attempts_finished` serves the overview's runs per
minute. (The task indexes the dashboard's lists read by — by status, by agent, finished by
completion time — come with migration 0008, which the operators' commands share.) Built
CONCURRENTLY: a busy `task_attempts` table keeps taking writes meanwhile. This migration only
extends the schema.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


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
        op.create_index(
            "ix_task_attempts_finished",
            "task_attempts",
            ["finished_at"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
            postgresql_where=sa.text("finished_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_task_attempts_finished",
            table_name="task_attempts",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_table("audit_log")
