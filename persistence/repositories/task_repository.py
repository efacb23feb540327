"""Task persistence, the lifecycle included: the one place that writes the `tasks` table.

Every lifecycle step (claim, heartbeat, each finish outcome, release, cancel, retry, rescue,
dispatch bookkeeping) is a method here, built from the guarded statements of `task_sql` and
atomic on its own: a step of several statements runs them in one transaction (`Executor.atomic`),
so it commits or fails as a whole whether it runs in a unit of work's session or on one of the
worker's pooled connections. Domain `Task`s go in and come out.

Steps that touch a subtask lock rows in one order, written once in `_lock_family`: the parent,
then the task, then its subtree by depth and id (see docs/architecture.md). Siblings finishing
at the same time serialise on their parent's row, so exactly one of them resumes it.

A fenced write that changes nothing either lost its claim or already landed on an earlier try
whose answer was lost with its connection: `_landed_before` tells them apart by the run's history
row, which only the run itself ever gives that outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, NamedTuple
from uuid import UUID

import asyncpg
from sqlalchemy import String, cast, func, update

from domain.entities import Doorbell, Task, TaskAttempt
from domain.exceptions import (
    ConcurrentUpdateError,
    EntityNotFoundError,
    InvalidInputError,
    SignalRefusedError,
    TaskNotEditableError,
)
from domain.interfaces import (
    CancelResult,
    ExpiredChild,
    Finish,
    FlowClaim,
    ITaskRepository,
    Miss,
    Page,
    Rescued,
    RetryResult,
)
from domain.payload import encode_json
from domain.policies import Backoff
from domain.value_objects import AttemptOutcome, TaskStatus
from persistence.errors import find_postgres_error
from persistence.mappers import attempt_from_row, task_from_row
from persistence.models import TaskModel
from persistence.repositories import flow_sql as fq
from persistence.repositories import task_sql as q
from persistence.repositories.base_repository import BaseRepository
from persistence.repositories.task_insert_repository import TaskInsertRepository
from persistence.sql import Executor, Row

# What an operator may change on a task that has not started (`update`). Everything else moves
# only through the lifecycle's fenced statements.
EDITABLE_FIELDS = ("run_after", "max_attempts", "metadata", "priority")
# A flow claim weighs at most this many of an agent's keys with due work (the first by key
# order): fairness is exact up to that many waiting keys per agent.
FLOW_MAX_KEYS = 200


# Creating tasks (`create_many`, `_count_up`) is inherited from TaskInsertRepository, which
# imports no SQLAlchemy: `tasklane submit` inserts through it alone.
class TaskRepository(BaseRepository[TaskModel, Task], TaskInsertRepository, ITaskRepository):
    filterable_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "id",
            "conversation_id",
            "parent_task_id",
            "agent_id",
            "queue",
            "status",
            "worker_id",
            "idempotency_key",
            "attempts",
            "max_attempts",
            "step",
        }
    )

    def __init__(self, ex: Executor) -> None:
        super().__init__(ex, TaskModel, "Task")

    # -- read -----------------------------------------------------------------------------------

    async def get_by_id(self, task_id: UUID) -> Task | None:
        found = await self._entities(q.TASK_BY_ID, id=task_id)
        return found[0] if found else None

    async def find_pending_for_agent(
        self,
        agent_id: str | Sequence[str],
        *,
        limit: int = 100,
        queue: str | None = None,
        skip_locked: bool = False,
    ) -> list[Task]:
        """Due pending tasks of an agent (or of any of several), oldest due first, optionally of
        one queue. With `skip_locked` the rows are locked until the caller's transaction ends and
        rows others hold are skipped, so concurrent claimers split the work."""
        agents = [agent_id] if isinstance(agent_id, str) else list(agent_id)
        stmt = q.PENDING_FOR_AGENTS_LOCKED if skip_locked else q.PENDING_FOR_AGENTS
        return await self._entities(stmt, agent_ids=agents, queue=queue, limit=limit)

    async def get_subtasks(self, parent_task_id: UUID) -> list[Task]:
        """Children in creation order (id breaks ties, so the order is stable)."""
        return await self._entities(q.CHILDREN, id=parent_task_id)

    async def search(
        self,
        *,
        conversation_id: UUID | None = None,
        agent_id: str | None = None,
        status: TaskStatus | None = None,
        text: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Newest first. `text` matches anywhere in the input's JSON text, case-insensitively."""
        filters = {
            k: v
            for k, v in (
                ("conversation_id", conversation_id),
                ("agent_id", agent_id),
                ("status", status.value if status is not None else None),
            )
            if v is not None
        }
        stmt = self._select(filters, (self.table.c.created_at.desc(), self.table.c.id))
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            stmt = stmt.where(cast(self.table.c.input, String).ilike(pattern + "%", escape="\\"))
        return await self._entities(stmt.limit(limit))

    async def find_paginated(
        self,
        *,
        page: int = 1,
        page_size: int = 50,
        filters: Mapping[str, Any] | None = None,
    ) -> Page[Task]:
        items, total = await self._find_paginated(
            filters,
            page=page,
            page_size=page_size,
            order_by=(self.table.c.created_at.desc(), self.table.c.id),
        )
        return Page(items, total, page, page_size)

    async def list_attempts(self, task_id: UUID) -> list[TaskAttempt]:
        return [attempt_from_row(row) for row in await self._fetch(q.ATTEMPTS_OF, id=task_id)]

    # -- an operator's edit ---------------------------------------------------------------------

    async def update(self, task: Task) -> Task:
        """Write an operator's edit of a task that has not started: `run_after`, `max_attempts`,
        `metadata` and `priority` (EDITABLE_FIELDS), if nobody changed the row since it was read.

        Raises `ConcurrentUpdateError` when the row's version moved on, `EntityNotFoundError`
        when it is gone, `InvalidTransitionError` when it is no longer pending. Lifecycle columns
        (status, attempts, lease, run) move only through the lifecycle's fenced statements.
        """
        encode_json(task.metadata, what="metadata")  # a clear error before any SQL
        if task.max_attempts is not None and task.max_attempts < task.attempts:
            raise InvalidInputError(
                f"max_attempts {task.max_attempts} is below the {task.attempts} attempt(s) used"
            )
        table = self.table
        stmt = (
            update(table)
            .where(
                table.c.id == task.id,
                table.c.version == task.version,
                table.c.status == TaskStatus.PENDING.value,
            )
            .values(
                run_after=func.coalesce(task.run_after, func.now()),
                max_attempts=task.max_attempts,
                metadata=task.metadata,
                priority=task.priority,
                # Its schedule may have moved: the reconciler looks at it again once it is due.
                dispatch_after=func.now(),
                version=table.c.version + 1,
                updated_at=func.now(),
            )
            .returning(*table.c)
        )
        found = await self._entities(stmt)
        if found:
            return found[0]
        current = await self.get_by_id(task.id)
        if current is None:
            raise EntityNotFoundError("Task", task.id)
        if current.version != task.version:
            raise ConcurrentUpdateError("Task", task.id, task.version)
        raise TaskNotEditableError(task.id, current.status.value)

    # -- claim and heartbeat --------------------------------------------------------------------

    async def claim(
        self,
        ids: Sequence[UUID],
        *,
        worker_id: str,
        lease_seconds: float,
        default_max_attempts: int,
        queue: str | None = None,
        claim_token: UUID | None = None,
    ) -> list[Task]:
        """pending (and due) → running for each id that still can be (and is in `queue`, if
        given): attempts + 1, a new run (the fencing token), a lease; the others are skipped.
        `claim_token` marks the runs this statement starts (see `adopt`)."""
        rows = await self._fetch(
            q.CLAIM,
            ids=sorted(set(ids)),
            worker_id=worker_id,
            lease_seconds=float(lease_seconds),
            default_max_attempts=default_max_attempts,
            queue=queue,
            claim_token=claim_token,
        )
        return await self._loaded(rows)

    async def adopt(
        self, unsure: Sequence[tuple[UUID, UUID]], *, lease_seconds: float
    ) -> list[Task]:
        """Claims that committed although their answer was lost: of the tasks in `unsure`
        ((task id, claim token of a statement whose answer was lost) pairs), those whose
        current run such a statement started, their leases renewed."""
        if not unsure:
            return []
        rows = await self._fetch(
            q.ADOPT,
            ids=[task_id for task_id, _ in unsure],
            claim_tokens=[token for _, token in unsure],
            lease_seconds=float(lease_seconds),
        )
        return await self._loaded(rows)

    async def _loaded(self, claimed: Sequence[Row]) -> list[Task]:
        """Claimed rows as entities. A row the domain refuses to load (written with plain SQL
        past a rule) fails at once, with the reason: left running, it would burn every attempt
        on lease expiry and end "lease expired", its real trouble never said."""
        tasks: list[Task] = []
        for row in claimed:
            try:
                tasks.append(task_from_row(row))
            except (InvalidInputError, ValueError, TypeError) as exc:
                run = _Run(_uuid(row["id"]), row["runs"], _maybe_uuid(row["parent_task_id"]))
                error = f"the task cannot be loaded: {exc}"

                async def change(run: _Run = run, error: str = error) -> Sequence[Row]:
                    return await self._fetch(
                        q.FAIL, id=run.id, run=run.runs, error=error, dispatch_delay=0.0
                    )

                await self._finish_in_family(run, change, AttemptOutcome.FAILED, dispatch_delay=0)
        return tasks

    async def claim_limited(
        self,
        *,
        queue: str,
        agent_id: str,
        worker_id: str,
        lease_seconds: float,
        default_max_attempts: int,
    ) -> FlowClaim:
        """A limited agent's next start, if its limits allow one (flow control; the rules are in
        `flow_sql`): under the agent's `flow_limits` row lock, its running tasks are counted,
        the key whose turn it is picked, its most due task claimed with the plain fenced claim,
        and the rate states pushed on — all in one transaction."""
        async with self._ex.atomic():
            limits = await self._fetch(fq.LOCK_LIMITS, queue=queue, agent_id=agent_id)
            if not limits or not limits[0]["limited"]:
                return FlowClaim(None, held="not limited")
            lim = limits[0]
            if lim["paused"]:
                return FlowClaim(None, held="paused")
            now: datetime = lim["now"]
            if lim["eff_rate"] is not None and lim["tat"] is not None and lim["tat"] > now:
                return FlowClaim(None, held="rate limited", retry_at=lim["tat"])
            concurrency = lim["eff_concurrency"]
            if concurrency is not None:
                # The common answer under load, from one index count (ix_tasks_running_flow),
                # before the pick weighs every key.
                [running] = await self._fetch(fq.RUNNING, queue=queue, agent_id=agent_id)
                if running["n"] >= concurrency:
                    return FlowClaim(None, held=f"at its limit ({concurrency} running)")
            rows = await self._fetch(
                fq.CANDIDATES, queue=queue, agent_id=agent_id, max_keys=FLOW_MAX_KEYS
            )
            if not rows:
                return FlowClaim(None, held="nothing due")
            if concurrency is not None and rows[0]["total_running"] >= concurrency:
                return FlowClaim(None, held=f"at its limit ({concurrency} running)")
            open_keys = _keys_in_turn(rows, per_key=lim["eff_per_key"], now=now)
            if not open_keys:
                return _held_by_keys(rows, lim, now)
            estimate = float(lim["estimate"])
            step = _rate_step(lim["eff_rate"], estimate)
            key_step = _rate_step(lim["eff_key_rate"], estimate)
            for candidate in open_keys[:3]:
                claimed = await self._fetch(
                    q.CLAIM_LIMITED,
                    ids=[candidate["task_id"]],
                    worker_id=worker_id,
                    lease_seconds=float(lease_seconds),
                    default_max_attempts=default_max_attempts,
                    queue=queue,
                    claim_token=None,
                )
                tasks = await self._loaded(claimed)
                if not tasks:
                    continue  # cancelled (or unloadable) meanwhile: the next key's turn
                key = candidate["key"]
                await self._fetch(
                    fq.STARTED,
                    queue=queue,
                    agent_id=agent_id,
                    key=key,
                    step=step,
                    key_step=key_step,
                )
                room = concurrency is None or rows[0]["total_running"] + 1 < concurrency
                return FlowClaim(
                    tasks[0],
                    more=room and (len(open_keys) > 1 or step is None),
                    key=key,
                    unit_seconds=None if step is None else step / estimate,
                    key_unit_seconds=None if key_step is None else key_step / estimate,
                    estimate=estimate,
                )
            return FlowClaim(None, held="nothing due", more=True)

    async def consumed(
        self,
        *,
        queue: str,
        agent_id: str,
        key: str,
        step: float | None,
        key_step: float | None,
    ) -> None:
        """A run reported what it really used (`ctx.consume`): the rate states moved by the
        difference from its estimate, in seconds (negative: it used less)."""
        async with self._ex.atomic():
            # The agent's row first, as a claim locks it: no deadlock with a claim.
            await self._fetch(fq.LOCK_LIMITS, queue=queue, agent_id=agent_id)
            await self._fetch(
                fq.CONSUMED, queue=queue, agent_id=agent_id, key=key, step=step, key_step=key_step
            )

    async def rate_limited(
        self, task: Task, *, delay_seconds: float, reason: str, paused_by: str
    ) -> bool:
        """A run that met its provider's rate limit (`RateLimited(after)`): handed back without
        spending its attempt, due after `delay_seconds`, and its key (its agent, without keys)
        paused as long, so that nothing else of that key starts meanwhile."""
        async with self._ex.atomic():
            landed = await self.release(task, delay_seconds=delay_seconds, reason=reason)
            if landed:
                await self._fetch(
                    fq.PAUSE_KEY_OF,
                    id=task.id,
                    reason=reason,
                    paused_by=paused_by,
                    delay_seconds=float(delay_seconds),
                )
            return landed

    async def explain_miss(self, task_id: UUID, *, queue: str | None = None) -> Miss:
        rows = await self._fetch(q.EXPLAIN_MISS, id=task_id)
        if not rows:
            return Miss("no such task")
        row = rows[0]
        if queue is not None and row["queue"] != queue:
            return Miss(f"belongs to queue {row['queue']!r}, not {queue!r}: left to its workers")
        status = row["status"]
        due_in = float(row["due_in_seconds"])
        if status == TaskStatus.PENDING and due_in > 0:
            return Miss(f"pending but not due for {due_in:.1f}s", due_in_seconds=due_in)
        if status == TaskStatus.PENDING and row["paused"]:
            return Miss("pending in a paused scope (tasklane limits)")
        if status == TaskStatus.PENDING and row["limited"]:
            return Miss(
                f"agent {row['agent_id']!r} is limited: a flow claim starts its next task",
                flow=(row["queue"], row["agent_id"]),
            )
        max_attempts = row["max_attempts"]
        if (
            status == TaskStatus.PENDING
            and max_attempts is not None
            and row["attempts"] >= max_attempts
        ):
            return Miss(
                f"pending with all {max_attempts} attempts used; raise max_attempts or cancel it"
            )
        return Miss(f"already {status} (run {row['runs']})")

    async def heartbeat(self, held: Mapping[UUID, int], *, lease_seconds: float) -> set[UUID]:
        """Extend the lease of every run in `held` (task id → run); return the ids no longer
        ours (cancelled, rescued, finished)."""
        if not held:
            return set()
        ids = list(held)
        rows = await self._fetch(
            q.HEARTBEAT, ids=ids, runs=[held[i] for i in ids], lease_seconds=float(lease_seconds)
        )
        return {_uuid(row["id"]) for row in rows if not row["ours"]}

    # -- finish ---------------------------------------------------------------------------------

    async def complete_roots(self, items: Sequence[tuple[Task, str]]) -> set[UUID]:
        """running → completed for many root tasks at once, each (task, output JSON) fenced by
        its run. Returns the ids whose write landed (now or on an earlier try)."""
        rows = await self._fetch(
            q.COMPLETE,
            ids=[task.id for task, _ in items],
            runs=[task.runs for task, _ in items],
            outputs=[output for _, output in items],
            dispatch_delay=0.0,  # roots have no parent to resume
        )
        landed = {_uuid(row["id"]) for row in rows}
        missed = [task for task, _ in items if task.id not in landed]
        return landed | await self._runs_with_outcome(missed, AttemptOutcome.COMPLETED)

    async def complete_children(
        self, items: Sequence[tuple[Task, str]], *, dispatch_delay: float
    ) -> tuple[set[UUID], list[Doorbell]]:
        """running → completed for many subtasks at once, in one transaction: their parents
        locked first (in id order), the children completed and their parents counted down in
        one statement, the parents left awaiting no child resumed. No child reads its siblings.
        Returns the ids whose write landed (now or on an earlier try) and the resumed parents'
        doorbells."""
        parents = sorted({t.parent_task_id for t, _ in items if t.parent_task_id is not None})
        async with self._ex.atomic():
            await self._fetch(q.LOCK_PARENTS, ids=parents)
            rows = await self._fetch(
                q.COMPLETE,
                ids=[task.id for task, _ in items],
                runs=[task.runs for task, _ in items],
                outputs=[output for _, output in items],
                dispatch_delay=float(dispatch_delay),
            )
            doorbells = _resumed_parents(rows)
        landed = {_uuid(row["id"]) for row in rows}
        missed = [task for task, _ in items if task.id not in landed]
        return landed | await self._runs_with_outcome(missed, AttemptOutcome.COMPLETED), doorbells

    async def complete(
        self, task: Task, output_json: str, children: Sequence[Task] = (), *, dispatch_delay: float
    ) -> Finish:
        """running → completed, with any fire-and-forget subtasks created in the same
        transaction; the parent resumes if this was its last unfinished child."""

        async def change() -> Sequence[Row]:
            return await self._fetch(
                q.COMPLETE,
                ids=[task.id],
                runs=[task.runs],
                outputs=[output_json],
                dispatch_delay=float(dispatch_delay),
            )

        return await self._finish_in_family(
            task, change, AttemptOutcome.COMPLETED, children, dispatch_delay=dispatch_delay
        )

    async def fail(self, task: Task, error: str, *, dispatch_delay: float) -> Finish:
        """running → failed with `error`; the parent resumes if this was its last open child."""

        async def change() -> Sequence[Row]:
            return await self._fetch(
                q.FAIL, id=task.id, run=task.runs, error=error, dispatch_delay=float(dispatch_delay)
            )

        return await self._finish_in_family(
            task, change, AttemptOutcome.FAILED, dispatch_delay=dispatch_delay
        )

    async def retry_later(self, task: Task, error: str, *, delay_seconds: float) -> bool:
        """running → pending after `delay_seconds` (the reconciler rings it once due)."""
        rows = await self._fetch(
            q.RETRY_LATER,
            id=task.id,
            run=task.runs,
            error=error,
            delay_seconds=float(delay_seconds),
        )
        return bool(rows) or await self._landed_before(task, AttemptOutcome.RETRY)

    async def release(
        self, task: Task, *, delay_seconds: float = 0.0, reason: str | None = None
    ) -> bool:
        """running → pending, due after `delay_seconds`, the attempt given back (a graceful
        shutdown; a worker without the task's agent while another worker has it). `reason`
        goes in the run's history."""
        rows = await self._fetch(
            q.RELEASE, id=task.id, run=task.runs, delay_seconds=float(delay_seconds), reason=reason
        )
        return bool(rows) or await self._landed_before(task, AttemptOutcome.RELEASED)

    async def wait(
        self,
        task: Task,
        children: Sequence[Task],
        *,
        dispatch_delay: float,
        signals: Sequence[str] | None = None,
        deadline_seconds: float | None = None,
        on_timeout: str | None = None,
    ) -> Finish:
        """running → waiting, in one transaction: for its new subtasks, for one of `signals`,
        until `deadline_seconds` from now (a timer, or the signals' timeout), or together —
        then it resumes once its subtasks have all finished and a signal arrived (or the
        deadline passed). Waiting for nothing is refused: it would resume at once, forever. A
        signal delivered before the wait is consumed by it at once."""
        if not children and not signals and deadline_seconds is None:
            raise InvalidInputError(f"task {task.id} cannot wait for subtasks: it spawned none")
        async with self._ex.atomic():
            waited = await self._fetch(
                q.WAIT,
                id=task.id,
                run=task.runs,
                children=len(children),
                signals=list(signals) if signals else None,
                deadline_seconds=deadline_seconds,
                on_timeout=on_timeout,
            )
            if not waited:
                # Lost its claim, or a retry whose first try landed (children and all: the
                # reconciler rings their doorbells).
                return Finish(await self._landed_before(task, AttemptOutcome.WAITING))
            doorbells = await self._insert_children(children, dispatch_delay=dispatch_delay)
            if signals and not children:  # a signal sent before the wait resumes it now
                doorbells += await self._resume_if_done([task.id], dispatch_delay=0.0)
            return Finish(True, doorbells)

    async def wake_due(self, *, queue: str, limit: int, dispatch_delay: float) -> list[Doorbell]:
        """Timers and signal timeouts of `queue` whose deadline passed: pending again."""
        rows = await self._fetch(
            q.WAKE_DUE, queue=queue, limit=limit, dispatch_delay=float(dispatch_delay)
        )
        return [_doorbell(row) for row in rows]

    async def take_signals(self, task: Task) -> list[dict[str, Any]]:
        """The signals this step of a resumed task reads (`ctx.signals`), marked taken by it."""
        rows = await self._fetch(
            q.TAKE_SIGNALS, id=task.id, step=task.step, names=list(task.wait_signals or ())
        )
        return [dict(row.items()) for row in rows]

    async def signal(
        self, task_id: UUID, name: str, payload_json: str | None, *, sent_by: str
    ) -> tuple[int, Doorbell | None]:
        """Deliver a signal: kept for the task's next wait, or resuming it now if it waits for
        `name` (and its subtasks have all finished). Refused for a finished task. Returns the
        signal's id and, if it resumed the task, its doorbell."""
        async with self._ex.atomic():
            try:
                [sent] = await self._fetch(
                    q.SEND_SIGNAL, id=task_id, name=name, payload=payload_json, sent_by=sent_by
                )
            except Exception as exc:
                refused = find_postgres_error(exc)
                if refused is None:
                    raise
                if isinstance(refused, asyncpg.ForeignKeyViolationError):
                    raise EntityNotFoundError("Task", task_id) from None
                if isinstance(refused, asyncpg.CheckViolationError):
                    status = str(refused).split(" is ", 1)[-1].split(":", 1)[0]
                    raise SignalRefusedError(task_id, status) from None
                raise
            [row] = await self._fetch(q.RESUMED_BY_SIGNAL, id=task_id)
        resumed = row["status"] == TaskStatus.PENDING and row["woke_by"] == "signal"
        return int(sent["id"]), _doorbell(row) if resumed else None

    async def progress(self, task: Task, progress_json: str) -> bool:
        """The latest progress of a running run (fenced by its run number)."""
        rows = await self._fetch(q.PROGRESS, id=task.id, run=task.runs, progress=progress_json)
        return bool(rows)

    async def _finish_in_family(
        self,
        task: Task | _Run,
        change: Any,
        outcome: AttemptOutcome,
        children: Sequence[Task] = (),
        *,
        dispatch_delay: float,
    ) -> Finish:
        """One transaction: lock the family in order, change the task, create its children, and
        resume the parent if this task was its last unfinished child. A root task with no
        children is a single statement and needs no transaction."""
        parent_id = task.parent_task_id
        if parent_id is None and not children:
            return Finish(bool(await change()) or await self._landed_before(task, outcome))
        async with self._ex.atomic():
            await self._lock_family(parent_id)
            landed = await change()
            if not landed:
                return Finish(await self._landed_before(task, outcome))
            doorbells = await self._insert_children(children, dispatch_delay=dispatch_delay)
            return Finish(True, doorbells + _resumed_parents(landed))

    async def _landed_before(self, task: Task | _Run, outcome: AttemptOutcome) -> bool:
        """A fenced finish found nothing to change: had this very run's write already landed (a
        retry whose first try lost its answer with its connection)?"""
        return task.id in await self._runs_with_outcome([task], outcome)

    async def _runs_with_outcome(
        self, tasks: Sequence[Task | _Run], outcome: AttemptOutcome
    ) -> set[UUID]:
        if not tasks:
            return set()
        rows = await self._fetch(
            q.RUNS_WITH_OUTCOME,
            ids=[t.id for t in tasks],
            runs=[t.runs for t in tasks],
            outcome=outcome.value,
        )
        return {_uuid(row["task_id"]) for row in rows}

    # -- subtasks and the lock order ------------------------------------------------------------

    async def _lock_family(
        self, parent_id: UUID | None, subtree_of: UUID | None = None
    ) -> list[UUID]:
        """The one lock order of every transaction that changes a task with relatives: its
        parent first, then the task (by the statement that changes it, or, for `subtree_of`,
        the task and every descendant, a level at a time, by depth and id). Returns the
        subtree's ids.

        A level is read only once the level above is locked, each by a statement of its own:
        whoever adds children to a task (a handler's wait or completion, a submit naming it as
        parent) holds that task's lock until it commits, so the next statement sees them. One
        statement walking the whole tree would read it as it was before the locks were taken,
        and miss children committed while it waited."""
        if parent_id is not None:
            await self._fetch(q.LOCK_TASK, id=parent_id)
        if subtree_of is None:
            return []
        subtree: list[UUID] = []
        level = [_uuid(row["id"]) for row in await self._fetch(q.LOCK_TASK, id=subtree_of)]
        seen = set(level)
        while level:
            subtree += level
            rows = await self._fetch(q.LOCK_CHILDREN, ids=level)
            level = [i for i in (_uuid(row["id"]) for row in rows) if i not in seen]
            seen.update(level)  # a parent loop made by hand stops here
        return subtree

    async def _resume_if_done(
        self, parent_ids: Sequence[UUID], *, dispatch_delay: float
    ) -> list[Doorbell]:
        """waiting → pending for each of `parent_ids` none of whose children is unfinished;
        inside the transaction that holds their locks."""
        if not parent_ids:
            return []
        rows = await self._fetch(
            q.RESUME_IF_DONE, ids=list(parent_ids), dispatch_delay=float(dispatch_delay)
        )
        return [_doorbell(row) for row in rows]

    async def _insert_children(
        self, children: Sequence[Task], *, dispatch_delay: float
    ) -> list[Doorbell]:
        """Insert spawned subtasks; the doorbells to ring once the transaction commits. A child
        scheduled for later (`run_after` set) is left to the reconciler, which rings it once due."""
        if not children:
            return []
        delays = [0.0 if child.run_after is not None else dispatch_delay for child in children]
        inserted = await self.create_many(children, dispatch_delays=delays)
        return [Doorbell.for_task(t) for t, d in zip(inserted, delays, strict=True) if d]

    async def stranded_waiting(self, *, min_age_seconds: float, limit: int) -> list[UUID]:
        """Waiting parents whose children all finished but which nobody resumed (children
        changed by hand in SQL, a crash between two transactions)."""
        rows = await self._fetch(
            q.STRANDED_WAITING, min_age_seconds=float(min_age_seconds), limit=limit
        )
        return [_uuid(row["id"]) for row in rows]

    async def resume_parent(self, parent_id: UUID, *, dispatch_delay: float) -> list[Doorbell]:
        """Resume a waiting parent, under its lock, if none of its children is unfinished."""
        async with self._ex.atomic():
            await self._lock_family(parent_id)
            return await self._resume_if_done([parent_id], dispatch_delay=dispatch_delay)

    # -- operator actions -----------------------------------------------------------------------

    async def cancel(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> CancelResult:
        """Cancel the task and every unfinished descendant, in one transaction; the parent
        resumes if this was its last unfinished child. A finished task changes nothing
        (`CancelResult.cancelled == 0`)."""
        async with self._ex.atomic():
            rows = await self._fetch(q.PARENT_OF, id=task_id)
            if not rows:
                raise EntityNotFoundError("Task", task_id)
            parent = rows[0]["parent_task_id"]
            parent_id = _uuid(parent) if parent is not None else None
            subtree = await self._lock_family(parent_id, subtree_of=task_id)
            done = await self._fetch(
                q.CANCEL_MANY, ids=subtree, root_id=task_id, dispatch_delay=float(dispatch_delay)
            )
            doorbells = _resumed_parents(done)
            task = await self.get_by_id(task_id)
        assert task is not None
        return CancelResult(task=task, cancelled=len(done), doorbells=doorbells)

    async def retry(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> RetryResult:
        """Operator retry: failed → pending with fresh attempts. Any other state: unchanged.
        A subtask is retried under its parent's lock, like every other change of a child."""
        async with self._ex.atomic():
            parent = await self._fetch(q.PARENT_OF, id=task_id)
            parent_id = _maybe_uuid(parent[0]["parent_task_id"]) if parent else None
            await self._lock_family(parent_id)
            rows = await self._fetch(
                q.OPERATOR_RETRY, id=task_id, dispatch_delay=float(dispatch_delay)
            )
            if rows and parent_id is not None:  # an unfinished child again: counted
                await self._count_up([parent_id])
        if rows:
            retried = task_from_row(rows[0])
            return RetryResult(retried, True, [Doorbell.for_task(retried)])
        task = await self.get_by_id(task_id)
        if task is None:
            raise EntityNotFoundError("Task", task_id)
        return RetryResult(task, False, [])

    # -- the reconciler -------------------------------------------------------------------------

    async def rescue_roots(self, *, limit: int, backoff: Backoff) -> list[Rescued]:
        """Root tasks whose lease ran out: pending again after a backoff, or failed with their
        attempts spent. One statement for up to `limit` of them."""
        rows = await self._fetch(
            q.RESCUE_ROOTS,
            limit=limit,
            retry_base_seconds=float(backoff.base_seconds),
            retry_max_seconds=float(backoff.max_seconds),
            dispatch_delay=0.0,  # roots have no parent to resume
        )
        return [_rescued(row) for row in rows]

    async def expired_roots(self, *, limit: int) -> list[tuple[UUID, int]]:
        """Root tasks whose lease ran out, (id, run): for rescuing one by one."""
        rows = await self._fetch(q.EXPIRED_ROOTS, limit=limit)
        return [(_uuid(r["id"]), r["runs"]) for r in rows]

    async def rescue_root(self, task_id: UUID, run: int, *, backoff: Backoff) -> Rescued | None:
        rows = await self._fetch(
            q.RESCUE_ONE,
            id=task_id,
            run=run,
            retry_base_seconds=float(backoff.base_seconds),
            retry_max_seconds=float(backoff.max_seconds),
            dispatch_delay=0.0,  # a root: no parent to resume
        )
        return _rescued(rows[0]) if rows else None

    async def expired_children(self, *, limit: int) -> list[ExpiredChild]:
        rows = await self._fetch(q.EXPIRED_CHILDREN, limit=limit)
        return [ExpiredChild(_uuid(r["id"]), r["runs"], _uuid(r["parent_task_id"])) for r in rows]

    async def rescue_child(
        self, expired: ExpiredChild, *, backoff: Backoff, dispatch_delay: float
    ) -> tuple[Rescued | None, Doorbell | None]:
        """Rescue one expired subtask under its parent's lock; the parent resumes if the child
        failed for good and was its last unfinished one."""
        async with self._ex.atomic():
            await self._lock_family(expired.parent_id)
            rows = await self._fetch(
                q.RESCUE_ONE,
                id=expired.task_id,
                run=expired.run,
                retry_base_seconds=float(backoff.base_seconds),
                retry_max_seconds=float(backoff.max_seconds),
                dispatch_delay=float(dispatch_delay),
            )
            if not rows:
                return None, None
            resumed = _resumed_parents(rows)  # it failed for good, the last unfinished child
            return _rescued(rows[0]), resumed[0] if resumed else None

    async def mark_due_dispatched(
        self, *, queue: str, limit: int, redispatch_seconds: float
    ) -> list[Doorbell]:
        """Up to `limit` due pending tasks of `queue` that have no live doorbell, marked as
        dispatched (not again for `redispatch_seconds`): the caller rings them after this
        commits, and hands back with `unmark_dispatched` those it could not ring."""
        rows = await self._fetch(
            q.MARK_DUE_DISPATCHED,
            queue=queue,
            limit=limit,
            redispatch_seconds=float(redispatch_seconds),
        )
        return [_doorbell(row) for row in rows]

    async def due_for_dispatch(self, *, queue: str, limit: int) -> list[UUID]:
        """What `mark_due_dispatched` would take, for marking one by one."""
        rows = await self._fetch(q.DUE_FOR_DISPATCH, queue=queue, limit=limit)
        return [_uuid(row["id"]) for row in rows]

    async def mark_dispatched(self, task_id: UUID, *, redispatch_seconds: float) -> Doorbell | None:
        rows = await self._fetch(
            q.MARK_DISPATCHED, id=task_id, redispatch_seconds=float(redispatch_seconds)
        )
        return _doorbell(rows[0]) if rows else None

    async def unmark_dispatched(self, ids: Sequence[UUID]) -> None:
        if ids:
            await self._fetch(q.UNMARK_DISPATCHED, ids=list(ids))


class _Run(NamedTuple):
    """A run of a task, for writes that need no more of it than its fence and family."""

    id: UUID
    runs: int
    parent_task_id: UUID | None


def _uuid(value: Any) -> UUID:
    # asyncpg returns its own UUID type; entities hold the standard library's.
    return value if type(value) is UUID else UUID(str(value))


def _maybe_uuid(value: Any) -> UUID | None:
    return None if value is None else _uuid(value)


def _doorbell(row: Row) -> Doorbell:
    return Doorbell(_uuid(row["id"]), row["runs"], row["queue"], row["due_at"])


def _resumed_parents(landed: Sequence[Row]) -> list[Doorbell]:
    """The doorbells of the parents a finishing statement resumed (each once)."""
    resumed = {
        _uuid(row["parent_task_id"]): Doorbell(
            _uuid(row["parent_task_id"]),
            row["parent_runs"],
            row["parent_queue"],
            row["parent_due_at"],
        )
        for row in landed
        if row["parent_resumed"]
    }
    return list(resumed.values())


def _rescued(row: Row) -> Rescued:
    return Rescued(_uuid(row["id"]), row["runs"], TaskStatus(row["status"]), row["queue"])


def _rate_step(rate: float | None, estimate: float) -> float | None:
    """Seconds a start pushes a rate's state on: its estimated units at `rate` units/second."""
    return None if rate is None else estimate / rate


def _keys_in_turn(rows: Sequence[Row], *, per_key: int | None, now: datetime) -> list[Row]:
    """The keys that may start now, whose turn first: fewest running, then least recently
    started (round-robin), then the most due task."""
    allowed = [
        r
        for r in rows
        if (per_key is None or r["running"] < per_key) and (r["tat"] is None or r["tat"] <= now)
    ]
    never = datetime.min.replace(tzinfo=now.tzinfo)
    return sorted(
        allowed, key=lambda r: (r["running"], r["last_started_at"] or never, r["due_rank"])
    )


def _held_by_keys(rows: Sequence[Row], lim: Row, now: datetime) -> FlowClaim:
    """Every key with due work is at its per-key limit or waiting out its key rate."""
    waits = [r["tat"] for r in rows if r["tat"] is not None and r["tat"] > now]
    per_key = lim["eff_per_key"]
    if per_key is not None and all(r["running"] >= per_key for r in rows):
        return FlowClaim(None, held=f"every key at its limit ({per_key} running each)")
    return FlowClaim(None, held="every key rate limited", retry_at=min(waits) if waits else None)
