"""One sweeper per queue: `sweepers` says which worker reconciles a queue, until when.

Code written for earlier revisions does not use the table: each of its workers keeps sweeping
on its own, which is correct (every sweep takes rows with SKIP LOCKED), only costlier. This
migration only extends the schema.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweepers",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_sweepers")),
    )


def downgrade() -> None:
    op.drop_table("sweepers")
