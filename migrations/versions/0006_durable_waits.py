"""Durable waits: signals, timers, progress.

- `task_signals`: a signal delivered to a task (by `TaskClient.signal`, `tasklane signal`, or a
  plain SQL INSERT from another service). A trigger refuses a signal for a finished task, and
  resumes a task waiting for that name (whose subtasks, if any, have all finished) in the same
  statement: exactly one resume however many signals race.
- `tasks.wait_signals` (the names a waiting task waits for; NULL: none), `tasks.wait_deadline`
  (a timer, or a signal wait's timeout), `tasks.wait_on_timeout` ('resume' or 'fail'),
  `tasks.woke_by` (what resumed it last: children, signal, timeout, timer, timeout_fail) and
  `tasks.progress` (the latest `ctx.progress`).

Code written for 0005 knows nothing of signal waits and would resume such a task as a parent
whose children all finished: oldest_code_revision = '0006'.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNAL_TRIGGER = """
CREATE FUNCTION tasklane_task_signal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current text;
BEGIN
    SELECT status INTO current FROM tasks WHERE id = NEW.task_id;
    IF current IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'task % is %: a finished task takes no signal', NEW.task_id, current
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ck_task_signals_task_unfinished';
    END IF;
    UPDATE tasks AS p
    SET status = 'pending', attempts = 0, step = p.step + 1, run_after = now(),
        dispatch_after = now(), woke_by = 'signal', version = p.version + 1, updated_at = now()
    WHERE p.id = NEW.task_id AND p.status = 'waiting' AND NEW.name = ANY(p.wait_signals)
      AND NOT EXISTS (SELECT 1 FROM tasks AS c WHERE c.parent_task_id = p.id
                      AND c.status IN ('pending', 'running', 'waiting'));
    RETURN NEW;
END $$
"""
SIGNAL_TRIGGER_ON_SIGNALS = """
CREATE TRIGGER tasklane_task_signal BEFORE INSERT ON task_signals
    FOR EACH ROW EXECUTE FUNCTION tasklane_task_signal()
"""


def upgrade() -> None:
    op.add_column("tasks", sa.Column("wait_signals", postgresql.ARRAY(sa.Text()), nullable=True))
    op.add_column("tasks", sa.Column("wait_deadline", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("wait_on_timeout", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("woke_by", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("progress", postgresql.JSONB(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tasks_wait_on_timeout"),
        "tasks",
        "wait_on_timeout IS NULL OR wait_on_timeout IN ('resume', 'fail')",
    )
    op.create_index(
        "ix_tasks_wait_deadline",
        "tasks",
        ["wait_deadline"],
        postgresql_where=sa.text("status = 'waiting' AND wait_deadline IS NOT NULL"),
    )
    op.create_table(
        "task_signals",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=True),
        sa.Column("sent_by", sa.Text(), server_default=sa.text("'sql'"), nullable=False),
        sa.Column(
            "sent_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consumed_step", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "length(name) BETWEEN 1 AND 200", name=op.f("ck_task_signals_name_length")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_task_signals_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_signals")),
    )
    op.create_index("ix_task_signals_task", "task_signals", ["task_id", "name"])
    op.execute(SIGNAL_TRIGGER)
    op.execute(SIGNAL_TRIGGER_ON_SIGNALS)
    op.execute("UPDATE tasklane_schema SET oldest_code_revision = '0006'")


def downgrade() -> None:
    op.execute("UPDATE tasklane_schema SET oldest_code_revision = '0005'")
    op.execute("DROP TRIGGER tasklane_task_signal ON task_signals")
    op.execute("DROP FUNCTION tasklane_task_signal()")
    op.drop_index("ix_task_signals_task", table_name="task_signals")
    op.drop_table("task_signals")
    op.drop_index("ix_tasks_wait_deadline", table_name="tasks")
    op.drop_constraint(op.f("ck_tasks_wait_on_timeout"), "tasks", type_="check")
    for column in ("progress", "woke_by", "wait_on_timeout", "wait_deadline", "wait_signals"):
        op.drop_column("tasks", column)
