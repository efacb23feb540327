"""Flow control's tables: limits per agent, their running state per key, and pauses.

The rules they serve are in docs/architecture.md ("Flow control") and the README's section of
that name. Claims read them in `TaskRepository.claim_limited`, under the agent's `flow_limits`
row lock, so that a limit holds across any number of workers.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Computed, DateTime, Double, Integer, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


def _effective(name: str) -> Computed:
    # An operator's override wins over the code's declaration; -1 is an override to "no limit".
    return Computed(f"NULLIF(COALESCE({name}, declared_{name}), -1)", persisted=True)


class FlowLimitModel(Base):
    """An agent's limits on one queue: what its code declares (`@agent(concurrency=…)`, written
    by each worker at start-up) and what an operator set live (`tasklane limits set`)."""

    __tablename__ = "flow_limits"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_id: Mapped[str] = mapped_column(Text, primary_key=True)
    declared_concurrency: Mapped[int | None] = mapped_column(Integer)
    declared_per_key: Mapped[int | None] = mapped_column(Integer)
    declared_rate: Mapped[float | None] = mapped_column(Double)  # units per second
    declared_key_rate: Mapped[float | None] = mapped_column(Double)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    per_key: Mapped[int | None] = mapped_column(Integer)
    rate: Mapped[float | None] = mapped_column(Double)
    key_rate: Mapped[float | None] = mapped_column(Double)
    # Where a task's key is read: metadata or input (a JSON object), at `key_field`.
    key_source: Mapped[str | None] = mapped_column(Text)
    key_field: Mapped[str | None] = mapped_column(Text)
    units: Mapped[str] = mapped_column(Text, server_default=text("'tasks'"))
    estimate: Mapped[float] = mapped_column(Double, server_default=text("1"))  # units per task
    eff_concurrency: Mapped[int | None] = mapped_column(Integer, _effective("concurrency"))
    eff_per_key: Mapped[int | None] = mapped_column(Integer, _effective("per_key"))
    eff_rate: Mapped[float | None] = mapped_column(Double, _effective("rate"))
    eff_key_rate: Mapped[float | None] = mapped_column(Double, _effective("key_rate"))
    overridden_by: Mapped[str | None] = mapped_column(Text)
    # The agent-wide rate's theoretical arrival time (GCRA): the next start once it has passed.
    tat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(
            "key_source IS NULL OR key_source IN ('metadata', 'input')", name="key_source"
        ),
        CheckConstraint("estimate > 0", name="estimate_positive"),
    )


class FlowKeyModel(Base):
    """Per agent and key ('' for the agent as a whole): the rate limit's theoretical arrival time
    (GCRA: the next start is allowed once it has passed) and the key's last start (the
    round-robin among keys)."""

    __tablename__ = "flow_keys"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_id: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    tat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PauseModel(Base):
    """What is paused: a queue (agent ''), an agent of a queue (key ''), or one key of an agent.
    Nothing new starts in a paused scope; running tasks finish. `until` NULL: until resumed."""

    __tablename__ = "pauses"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    agent_id: Mapped[str] = mapped_column(Text, primary_key=True, server_default=text("''"))
    key: Mapped[str] = mapped_column(Text, primary_key=True, server_default=text("''"))
    reason: Mapped[str] = mapped_column(Text)
    paused_by: Mapped[str] = mapped_column(Text)
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
