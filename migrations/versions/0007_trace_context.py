"""Trace context of a task: where its runs sit in a distributed trace (OpenTelemetry).

A nullable jsonb column holding the W3C trace context (`traceparent`, `tracestate`) that the
producer's span had when it submitted the task; NULL when tracing was off. Adding a nullable
column without a default is a catalog change only (no table rewrite, a brief lock). Code written
for earlier revisions neither writes nor reads it. This migration only extends the schema.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks", sa.Column("trace_context", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("tasks", "trace_context")
