"""Flow control's settings and state: the limits agents declare, operators' overrides, pauses.

Starting tasks under those limits is the lifecycle's business (`TaskRepository.claim_limited`);
this repository writes and reads what the limits are. Statements are in `flow_sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domain.exceptions import InvalidInputError
from persistence.errors import translated
from persistence.repositories import flow_sql as fq
from persistence.sql import Executor, Row, Sql

# Where a task's key may be read: `metadata.<field>` or `input.<field>`.
KEY_SOURCES = ("metadata", "input")
# An override to "no limit", whatever the code declares.
NO_LIMIT = -1


@dataclass(frozen=True, slots=True)
class Declared:
    """An agent's limits as its code declares them (`@agent(concurrency=…, rate=…)`); rates in
    units per second."""

    agent_id: str
    concurrency: int | None = None
    per_key: int | None = None
    rate: float | None = None
    key_rate: float | None = None
    key: str | None = None  # "metadata.tenant", "input.user"
    units: str = "tasks"
    estimate: float = 1.0

    @property
    def declares(self) -> bool:
        limits = (self.concurrency, self.per_key, self.rate, self.key_rate, self.key)
        return any(v is not None for v in limits)

    @property
    def key_source(self) -> tuple[str | None, str | None]:
        if self.key is None:
            return None, None
        source, _, field = self.key.partition(".")
        return source, field


def parse_key(key: str) -> str:
    """A key's path, or InvalidInputError: `metadata.<field>` or `input.<field>`."""
    source, dot, field = key.partition(".")
    if source not in KEY_SOURCES or not dot or not field or len(field) > 200:
        raise InvalidInputError(
            f"key must be 'metadata.<field>' or 'input.<field>', got {key!r:.80}"
        )
    return key


class FlowRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def _fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        with translated("Flow control"):
            return await self._ex.fetch(stmt, **params)

    # -- the code's declarations -----------------------------------------------------------------

    async def declare(self, queue: str, agents: Sequence[Declared]) -> None:
        """What this worker's agents declare, on its queue (at start-up). An agent whose code
        no longer declares a limit has it cleared; operators' overrides stay. Pending tasks are
        keyed again when an agent's key changed."""
        if not agents:
            return
        sources = [a.key_source for a in agents]
        async with self._ex.atomic():
            await self._fetch(
                fq.DECLARE,
                queue=queue,
                agent_ids=[a.agent_id for a in agents],
                concurrency=[a.concurrency for a in agents],
                per_key=[a.per_key for a in agents],
                rate=[a.rate for a in agents],
                key_rate=[a.key_rate for a in agents],
                key_source=[s for s, _ in sources],
                key_field=[f for _, f in sources],
                units=[a.units for a in agents],
                estimate=[float(a.estimate) for a in agents],
                declares=[a.declares for a in agents],
            )
            await self._fetch(fq.REKEY_PENDING, queue=queue, agent_ids=[a.agent_id for a in agents])

    # -- operators' overrides --------------------------------------------------------------------

    async def set_limits(
        self, queue: str, agent_id: str, changes: dict[str, float | int | None], *, by: str
    ) -> None:
        """Override limits live: `changes` maps concurrency / per_key / rate / key_rate to a
        value (rates in units per second), NO_LIMIT, or None (back to the code's value)."""
        unknown = set(changes) - {"concurrency", "per_key", "rate", "key_rate"}
        if unknown:
            raise InvalidInputError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        await self._fetch(
            fq.SET_LIMITS,
            queue=queue,
            agent_id=agent_id,
            concurrency=_whole(changes.get("concurrency")),
            per_key=_whole(changes.get("per_key")),
            rate=_rate(changes.get("rate")),
            key_rate=_rate(changes.get("key_rate")),
            set_concurrency="concurrency" in changes,
            set_per_key="per_key" in changes,
            set_rate="rate" in changes,
            set_key_rate="key_rate" in changes,
            by=by,
        )

    async def reset_limits(self, agent_id: str, *, queue: str | None = None) -> int:
        """Every override of the agent (on `queue`, or on every queue) gone: the code's limits
        apply again. Returns how many queues' limits were reset."""
        return len(await self._fetch(fq.RESET_LIMITS, agent_id=agent_id, queue=queue))

    async def limits(
        self, *, queue: str | None = None, agent_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every agent's limits (declared, overridden, effective) with its running tasks."""
        return [
            _as_dict(row) for row in await self._fetch(fq.LIMITS, queue=queue, agent_id=agent_id)
        ]

    # -- pauses ------------------------------------------------------------------------------------

    async def pause(
        self,
        queue: str,
        *,
        agent_id: str = "",
        key: str = "",
        reason: str,
        by: str,
        for_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Pause a queue (no agent), an agent of a queue (no key) or one key of an agent: nothing
        new starts there until resumed (or `for_seconds` have passed). Running tasks finish."""
        if key and not agent_id:
            raise InvalidInputError("a key is paused for one agent: give the agent too")
        [row] = await self._fetch(
            fq.PAUSE,
            queue=queue,
            agent_id=agent_id,
            key=key,
            reason=reason,
            paused_by=by,
            for_seconds=None if for_seconds is None else float(for_seconds),
        )
        return _as_dict(row)

    async def resume(self, queue: str, *, agent_id: str = "", key: str = "") -> bool:
        """Lift that pause; its due tasks are rung at the next reconcile tick. False when it was
        not paused."""
        [row] = await self._fetch(fq.RESUME, queue=queue, agent_id=agent_id, key=key)
        return bool(row["n"])

    async def pauses(self, *, queue: str | None = None) -> list[dict[str, Any]]:
        return [_as_dict(row) for row in await self._fetch(fq.PAUSES, queue=queue)]

    # -- the sweeper -------------------------------------------------------------------------------

    async def expire_pauses(self, queue: str) -> int:
        """Pauses of `queue` whose time is up, removed; their due tasks rung at once."""
        [row] = await self._fetch(fq.EXPIRE_PAUSES, queue=queue)
        return int(row["n"])

    async def ready(self, queue: str) -> list[str]:
        """Limited agents of `queue` with due work and room to start one now."""
        return [row["agent_id"] for row in await self._fetch(fq.READY, queue=queue)]

    # -- explaining a task -------------------------------------------------------------------------

    async def hold_of(self, task_id: Any) -> dict[str, Any] | None:
        """What may hold a pending task: its scope's pause, its agent's limits and their use."""
        rows = await self._fetch(fq.HOLD_OF, id=task_id)
        return _as_dict(rows[0]) if rows else None


def _whole(value: float | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != NO_LIMIT):
        raise InvalidInputError(f"a concurrency limit must be a whole number ≥ 1, got {value!r}")
    return value


def _rate(value: float | int | None) -> float | None:
    if value is None:
        return None
    if value == NO_LIMIT:
        return float(NO_LIMIT)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise InvalidInputError(f"a rate must be a positive number per second, got {value!r}")
    return float(value)


def _as_dict(row: Row) -> dict[str, Any]:
    return dict(row.items())
