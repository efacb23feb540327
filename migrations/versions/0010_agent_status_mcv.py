"""`stats` estimates every agent's count in a big status with one statement.

The extended statistics `stx_tasks_agent_status` on (agent_id, status) gain a most-common-values
list (`mcv`): after ANALYZE, `pg_stats_ext` holds how often each common (agent, status) pair
occurs, which `ReportRepository.counts_by_agent` reads in one statement where it asked the
planner once per agent and status (an EXPLAIN each: with 8 agents, 27 of them, half of `stats`'s
time on a million tasks). The planner uses the same list for its own estimates. Statistics
objects cannot be altered to add a kind, so the object is created again. Code written for
earlier revisions runs on it unchanged, so `oldest_code_revision` stays as it is.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _statistics(kinds: str) -> None:
    op.execute("DROP STATISTICS IF EXISTS stx_tasks_agent_status")
    op.execute(f"CREATE STATISTICS stx_tasks_agent_status ({kinds}) ON agent_id, status FROM tasks")


def upgrade() -> None:
    _statistics("ndistinct, dependencies, mcv")


def downgrade() -> None:
    _statistics("ndistinct, dependencies")
