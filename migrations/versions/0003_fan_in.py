"""Fan-in at full speed: each task counts its unfinished children.

`tasks.open_children` is kept by the statements that add children and finish them, under the
parent's lock, so that a batch of children finishes in one statement that counts their parents
down instead of each child reading its siblings. Existing parents are counted here.

Code written for 0002 does not keep the count; a parent it leaves with a stale count is still
resumed (the resume checks the children themselves, and the reconciler resumes a waiting parent
whose children are all finished), so this migration only extends the schema.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column("open_children", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_tasks_open_children_not_negative"), "tasks", "open_children >= 0"
    )
    op.execute(
        """
        UPDATE tasks AS p SET open_children = c.n
        FROM (SELECT parent_task_id AS id, count(*) AS n FROM tasks
              WHERE parent_task_id IS NOT NULL AND status IN ('pending', 'running', 'waiting')
              GROUP BY parent_task_id) AS c
        WHERE p.id = c.id
        """
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_tasks_open_children_not_negative"), "tasks", type_="check")
    op.drop_column("tasks", "open_children")
