"""Flow control: priorities, concurrency and rate limits per agent and key, pauses.

- `tasks.priority` (−1000…1000, default 0), `tasks.due_rank` — when the task counts as due for
  ordering: `run_after − priority minutes` (a task of priority p competes as if it had become due
  p minutes earlier; aging: waiting long enough outranks any priority) — and `tasks.limit_key`,
  the task's key under its agent's limits (`metadata.tenant`, say; '' when none). Both are kept by
  a trigger, so rows written with plain SQL get them too.
- `flow_limits`: per queue and agent, the limits the agent's code declares and an operator's live
  overrides (the effective values are generated columns), and the agent-wide rate's state.
- `flow_keys`: per queue, agent and key ('' for the agent as a whole), the rate limit's state
  (`tat`, the theoretical arrival time of the generic cell rate algorithm) and when the key last
  started a task (`last_started_at`: the round-robin among keys).
- `pauses`: what is paused (a queue, an agent of a queue, a key of an agent), why, by whom, until
  when.
- `ix_tasks_pending_agent` becomes (queue, agent_id, limit_key, due_rank) for pending tasks: the
  fair pick among keys and claims from Postgres; `ix_tasks_running_flow` counts running tasks per
  agent and key.

Code written for 0004 knows nothing of limits or pauses and would ignore them, so this migration
declares that the schema no longer serves it: oldest_code_revision = '0005'.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FLOW_TRIGGER = """
CREATE FUNCTION tasklane_task_flow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    source text;
    field text;
BEGIN
    NEW.due_rank := NEW.run_after - make_interval(mins => NEW.priority);
    IF TG_OP = 'INSERT' OR NEW.agent_id IS DISTINCT FROM OLD.agent_id
       OR NEW.queue IS DISTINCT FROM OLD.queue OR NEW.metadata IS DISTINCT FROM OLD.metadata
       OR NEW.input IS DISTINCT FROM OLD.input THEN
        SELECT l.key_source, l.key_field INTO source, field FROM flow_limits AS l
        WHERE l.queue = NEW.queue AND l.agent_id = NEW.agent_id;
        NEW.limit_key := CASE source
            WHEN 'metadata' THEN COALESCE(NEW.metadata ->> field, '')
            WHEN 'input' THEN COALESCE(CASE WHEN jsonb_typeof(NEW.input) = 'object'
                                            THEN NEW.input ->> field END, '')
            ELSE '' END;
    END IF;
    RETURN NEW;
END $$
"""
FLOW_TRIGGER_ON_TASKS = """
CREATE TRIGGER tasklane_task_flow BEFORE INSERT OR UPDATE OF run_after, priority, agent_id, queue,
    metadata, input ON tasks FOR EACH ROW EXECUTE FUNCTION tasklane_task_flow();
"""


def _effective(name: str) -> sa.Computed:
    # An operator's override wins over the code's declaration; -1 is an override to "no limit".
    return sa.Computed(f"NULLIF(COALESCE({name}, declared_{name}), -1)", persisted=True)


def upgrade() -> None:
    op.add_column(
        "tasks", sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column(
        "tasks", sa.Column("limit_key", sa.Text(), server_default=sa.text("''"), nullable=False)
    )
    op.add_column(
        "tasks",
        sa.Column(
            "due_rank", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
    )
    op.execute("UPDATE tasks SET due_rank = run_after")
    op.create_check_constraint(
        op.f("ck_tasks_priority_range"), "tasks", "priority BETWEEN -1000 AND 1000"
    )
    op.create_table(
        "flow_limits",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("declared_concurrency", sa.Integer(), nullable=True),
        sa.Column("declared_per_key", sa.Integer(), nullable=True),
        sa.Column("declared_rate", sa.Double(), nullable=True),
        sa.Column("declared_key_rate", sa.Double(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("per_key", sa.Integer(), nullable=True),
        sa.Column("rate", sa.Double(), nullable=True),
        sa.Column("key_rate", sa.Double(), nullable=True),
        sa.Column("key_source", sa.Text(), nullable=True),
        sa.Column("key_field", sa.Text(), nullable=True),
        sa.Column("units", sa.Text(), server_default=sa.text("'tasks'"), nullable=False),
        sa.Column("estimate", sa.Double(), server_default=sa.text("1"), nullable=False),
        sa.Column("eff_concurrency", sa.Integer(), _effective("concurrency"), nullable=True),
        sa.Column("eff_per_key", sa.Integer(), _effective("per_key"), nullable=True),
        sa.Column("eff_rate", sa.Double(), _effective("rate"), nullable=True),
        sa.Column("eff_key_rate", sa.Double(), _effective("key_rate"), nullable=True),
        sa.Column("overridden_by", sa.Text(), nullable=True),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "key_source IS NULL OR key_source IN ('metadata', 'input')",
            name=op.f("ck_flow_limits_key_source"),
        ),
        sa.CheckConstraint("estimate > 0", name=op.f("ck_flow_limits_estimate_positive")),
        sa.PrimaryKeyConstraint("queue", "agent_id", name=op.f("pk_flow_limits")),
    )
    op.create_table(
        "flow_keys",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("queue", "agent_id", "key", name=op.f("pk_flow_keys")),
    )
    op.create_table(
        "pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("key", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("paused_by", sa.Text(), nullable=False),
        sa.Column(
            "paused_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("queue", "agent_id", "key", name=op.f("pk_pauses")),
    )
    op.execute(FLOW_TRIGGER)
    op.execute(FLOW_TRIGGER_ON_TASKS)
    op.drop_index("ix_tasks_pending_agent", table_name="tasks")
    op.create_index(
        "ix_tasks_pending_agent",
        "tasks",
        ["queue", "agent_id", "limit_key", "due_rank"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_tasks_running_flow",
        "tasks",
        ["queue", "agent_id", "limit_key"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.execute("UPDATE tasklane_schema SET oldest_code_revision = '0005'")


def downgrade() -> None:
    op.execute("UPDATE tasklane_schema SET oldest_code_revision = '0001'")
    op.drop_index("ix_tasks_running_flow", table_name="tasks")
    op.drop_index("ix_tasks_pending_agent", table_name="tasks")
    op.create_index(
        "ix_tasks_pending_agent",
        "tasks",
        ["agent_id", "run_after"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.execute("DROP TRIGGER tasklane_task_flow ON tasks")
    op.execute("DROP FUNCTION tasklane_task_flow()")
    op.drop_table("pauses")
    op.drop_table("flow_keys")
    op.drop_table("flow_limits")
    op.drop_constraint(op.f("ck_tasks_priority_range"), "tasks", type_="check")
    op.drop_column("tasks", "due_rank")
    op.drop_column("tasks", "limit_key")
    op.drop_column("tasks", "priority")
