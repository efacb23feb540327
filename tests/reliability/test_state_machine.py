"""Scenario 11: the lifecycle statements against a model, driven by hypothesis.

A `RuleBasedStateMachine` plays three simulated workers (their own worker ids, default
max_attempts and rescue backoff), an operator and the clock against one real database, through
the code the worker and the client run: `Lifecycle` (claim, heartbeat, complete, fail,
retry_later, release, wait, rescue, resume_stranded, dispatch marking), each step a unit of work
around `TaskRepository`, and `TaskRepository` in a `UnitOfWork` (cancel, operator retry). Each
worker remembers every run it ever claimed, so stale runs keep writing after their task was
rescued, cancelled or claimed again.

The model is the domain itself: one `domain.Task` per task, moved by its own methods (`start`,
`complete`, `fail`, `retry`, `release`, `wait`, `resume`, `expire_lease`, `cancel`) — the
executable spec of the lifecycle, whose transition table also generates the SQL guards — plus
what only a test sees: whether the lease ran out, whether the task is dispatchable, how each run
ended. After every step the database must match the entities exactly, every status change must be
in the transition table, and final states must stay final (an operator's retry of a failed task
aside). Time is the database's: leases expire by back-dating `lease_expires_at` and `run_after`,
as River's rescuer tests do; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from domain.entities import Task
from domain.exceptions import AttemptsExhaustedError, InvalidInputError
from domain.value_objects import ALLOWED_TRANSITIONS, TaskStatus
from persistence import pg
from persistence.lifecycle import Lifecycle, LifecycleConfig
from persistence.session import UnitOfWork, create_engine, create_session_factory
from tests.support.invariants import check_invariants

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

T = TypeVar("T")

QUEUE = "sm"
OTHER_QUEUE = "sm-other"  # claimed by nobody here: our workers serve QUEUE only
REDISPATCH = 3600.0  # a rung doorbell is not rung again within the run of an example
AGENT_DEFAULTS = {"sm": None, "sm_once": 1}  # registered agents' max_attempts
MAX_TASKS = 30

PENDING, RUNNING, WAITING = "pending", "running", "waiting"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
UNFINISHED = {PENDING, RUNNING, WAITING}


@dataclass(frozen=True)
class WorkerSpec:
    """A simulated worker: what its LifecycleStore is configured with."""

    id: str
    default_max_attempts: int
    retry_base_seconds: float  # 0: a rescued task is due at once; 3600: only after time passes
    busy: bool = False  # claims and root completions go through the store's batch statements


WORKERS = (
    WorkerSpec("worker-a", 2, 0.0),
    WorkerSpec("worker-b", 3, 3600.0, busy=True),
    WorkerSpec("worker-c", 1, 0.0),
)
BUSY = next(i for i, spec in enumerate(WORKERS) if spec.busy)


# What a producer submits: a root task, usually due, usually on our queue.
SUBMISSION = {
    "agent": st.sampled_from(sorted(AGENT_DEFAULTS)),
    "max_attempts": st.sampled_from([None, 1, 2, 3]),
    "later": st.sampled_from([False, False, True]),  # run_after an hour from now
    "rung": st.booleans(),  # its doorbell rung after commit: the reconciler leaves it alone
    "other_queue": st.sampled_from([False, False, False, False, True]),
}
SUBMISSIONS = st.fixed_dictionaries(SUBMISSION)


# -- the model ------------------------------------------------------------------------------------


# The model's clock: entity methods take the time of a change; only "due or not" is compared.
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)
LEASE = timedelta(seconds=30)


@dataclass
class Model:
    """What one task should look like in the database: the domain entity, plus what the
    database knows and the entity does not."""

    task: Task
    dispatchable: bool  # dispatch_after <= now()
    lease_expired: bool = False
    outcomes: dict[int, str | None] = field(default_factory=dict)  # run → how it ended
    children: list[UUID] = field(default_factory=list)

    @property
    def id(self) -> UUID:
        return self.task.id

    @property
    def status(self) -> str:
        return self.task.status.value

    @property
    def parent(self) -> UUID | None:
        return self.task.parent_task_id

    @property
    def due(self) -> bool:
        return self.task.run_after is None or self.task.run_after <= NOW

    def ended(self, outcome: str) -> None:
        """The current run ended this way (the lease goes with it)."""
        self.outcomes[self.task.runs] = outcome
        self.lease_expired = False

    def __repr__(self) -> str:
        t = self.task
        return (
            f"Model(…{str(t.id)[-6:]} {t.agent_id} {t.queue} {t.status.value} "
            f"attempts={t.attempts}/{t.max_attempts} runs={t.runs} step={t.step} "
            f"holder={t.worker_id} due={self.due} dispatchable={self.dispatchable} "
            f"expired={self.lease_expired} outcomes={self.outcomes})"
        )


@dataclass(frozen=True)
class Run:
    """A run a simulated worker claimed: the Task the claim returned (its fencing token)."""

    worker: int
    task: Task

    def __repr__(self) -> str:
        return (
            f"Run({WORKERS[self.worker].id}, task …{str(self.task.id)[-6:]}, run {self.task.runs})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))


# -- the environment: one database, pools and stores shared by all examples ------------------------


class Env:
    def __init__(self, url: str, runner: asyncio.Runner) -> None:
        self.url = url
        self.runner = runner
        self.pool: asyncpg.Pool
        self.admin: asyncpg.Connection
        self.engine: AsyncEngine
        self.sessions: async_sessionmaker[AsyncSession]
        self.lifecycles: list[Lifecycle] = []
        self.conversation_id: UUID

    def run(self, aw: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(aw)

    async def open(self) -> None:
        self.pool = await pg.create_pool(self.url, max_size=4, application_name="state-machine")
        self.admin = await pg.connect(self.url)
        self.engine = create_engine(self.url, pool_size=2, max_overflow=0)
        self.sessions = create_session_factory(self.engine)
        self.lifecycles = [
            Lifecycle(
                self.pool,
                LifecycleConfig(
                    worker_id=spec.id,
                    lease_seconds=30.0,
                    default_max_attempts=spec.default_max_attempts,
                    retry_base_seconds=spec.retry_base_seconds,
                    retry_max_seconds=3600.0,
                    redispatch_seconds=REDISPATCH,
                    queue=QUEUE,
                ),
                busy=lambda busy=spec.busy: busy,
            )
            for spec in WORKERS
        ]
        for agent, default in AGENT_DEFAULTS.items():
            await self.admin.execute(
                "INSERT INTO agents (id, max_attempts) VALUES ($1, $2)", agent, default
            )
        self.conversation_id = await self.admin.fetchval(
            "INSERT INTO conversations (user_id) VALUES ('state-machine') RETURNING id"
        )

    async def reset(self) -> None:
        """Every example starts from no tasks (and no recorded transitions)."""
        await self.admin.execute("TRUNCATE tasks, task_attempts, task_signals, test_transitions")

    async def close(self) -> None:
        await self.admin.close()
        await self.pool.close()
        await self.engine.dispose()

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.sessions)


# -- the machine ----------------------------------------------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[UUID, Model] = {}
        self.runs: list[Run] = []
        self.seen: dict[UUID, str] = {}  # status at the last check, for the transition check
        self.operator_actions = 0

    # -- helpers ----------------------------------------------------------------------------------

    def run(self, aw: Coroutine[Any, Any, T]) -> T:
        return self.env.run(aw)

    def lifecycle(self, worker: int) -> Lifecycle:
        return self.env.lifecycles[worker]

    @staticmethod
    def default_max(m: Model, worker: int) -> int:
        """What a claim resolves a task's missing max_attempts to: its agent's, else the
        worker's."""
        return AGENT_DEFAULTS[m.task.agent_id] or WORKERS[worker].default_max_attempts

    def holds(self, run: Run) -> bool:
        """The run still holds its task's claim: a fenced write of it lands."""
        t = self.tasks[run.task.id].task
        return t.status is TaskStatus.RUNNING and t.runs == run.task.runs

    def resume_if_done(self, parent_id: UUID | None) -> set[UUID]:
        """A waiting parent whose children are all finished runs again."""
        if parent_id is None:
            return set()
        p = self.tasks[parent_id]
        if p.task.status is not TaskStatus.WAITING or any(
            not self.tasks[c].task.is_finished for c in p.children
        ):
            return set()
        p.task.resume(at=NOW)
        p.dispatchable = False  # rung at once, so not dispatched again for a while
        return {p.id}

    def descendants(self, task_id: UUID) -> list[UUID]:
        found, frontier = [task_id], [task_id]
        while frontier:
            for child in self.tasks[frontier.pop()].children:
                found.append(child)
                frontier.append(child)
        return found

    def new_children(self, parent: Model, n: int, data: st.DataObject) -> list[Task]:
        children = [
            Task(
                conversation_id=self.env.conversation_id,
                agent_id=data.draw(st.sampled_from(sorted(AGENT_DEFAULTS)), label="agent"),
                input={"child": i},
                parent_task_id=parent.id,
                max_attempts=data.draw(st.sampled_from([None, 1, 2]), label="max_attempts"),
                queue=parent.task.queue,
            )
            for i in range(n)
        ]
        for child in children:
            # Rung after the commit: the reconciler leaves it alone.
            self.tasks[child.id] = Model(replace(child, run_after=NOW), dispatchable=False)
            parent.children.append(child.id)
        return children

    # -- setup ------------------------------------------------------------------------------------

    @initialize(
        specs=st.lists(SUBMISSIONS, min_size=1, max_size=8), operator_actions=st.integers(0, 8)
    )
    def reset(self, specs: list[dict[str, Any]], operator_actions: int) -> None:
        self.run(self.env.reset())
        self.operator_actions = operator_actions  # an operator steps in now and then, not always
        for spec in specs:
            self.submit(**spec)

    # -- producers --------------------------------------------------------------------------------

    @precondition(lambda self: len(self.tasks) < MAX_TASKS)
    @rule(**SUBMISSION)
    def submit(
        self, agent: str, max_attempts: int | None, later: bool, rung: bool, other_queue: bool
    ) -> None:
        task = Task(
            conversation_id=self.env.conversation_id,
            agent_id=agent,
            input={"n": len(self.tasks)},
            max_attempts=max_attempts,
            run_after=datetime.now(UTC) + timedelta(hours=1) if later else None,
            queue=OTHER_QUEUE if other_queue else QUEUE,
        )

        async def insert() -> list[Task]:
            async with self.env.uow() as uow:
                created = await uow.tasks.create_many(
                    [task], dispatch_delays=[REDISPATCH if rung else 0.0]
                )
                await uow.commit()
            return created

        [created] = self.run(insert())
        assert (created.status, created.runs) == (TaskStatus.PENDING, 0)
        model_task = replace(task, run_after=LATER if later else NOW)
        self.tasks[task.id] = Model(model_task, dispatchable=not rung)

    # -- workers: claim and heartbeat -------------------------------------------------------------

    def can_claim(self, m: Model, worker: int) -> bool:
        """A claim starts the task, as its entity would: pending, due, on our queue, with an
        attempt left once its max_attempts is resolved."""
        if not (m.task.status is TaskStatus.PENDING and m.due and m.task.queue == QUEUE):
            return False
        try:
            replace(m.task).start(
                worker_id=WORKERS[worker].id,
                lease_expires_at=NOW + LEASE,
                at=NOW,
                default_max_attempts=self.default_max(m, worker),
            )
        except AttemptsExhaustedError:
            return False
        return True

    def claimed(self, worker: int, m: Model, task: Task | None) -> None:
        """The claim the model expects went through: check what it returned, remember the run."""
        assert task is not None, f"not claimed: {m}"
        m.task.start(
            worker_id=WORKERS[worker].id,
            lease_expires_at=NOW + LEASE,
            at=NOW,
            default_max_attempts=self.default_max(m, worker),
        )
        m.outcomes[m.task.runs] = None
        m.lease_expired = False
        t = m.task
        assert (task.id, task.runs, task.attempts) == (t.id, t.runs, t.attempts)
        assert (task.worker_id, task.max_attempts) == (t.worker_id, t.max_attempts)
        self.runs.append(Run(worker, task))

    def expect_claim(self, worker: int, task_id: UUID) -> None:
        m = self.tasks[task_id]
        claimable = self.can_claim(m, worker)
        task = self.run(self.lifecycle(worker).claim(task_id))
        if claimable:
            self.claimed(worker, m, task)
        else:
            assert task is None, f"claimed {m}"
            self.check_miss(worker, m)

    def pick_task(self, data: st.DataObject) -> UUID:
        """Any task, its status drawn first, so that rare statuses get picked as often."""
        statuses = sorted({m.status for m in self.tasks.values()})
        status = data.draw(st.sampled_from(statuses), label="status")
        return data.draw(
            st.sampled_from(sorted(i for i, m in self.tasks.items() if m.status == status)),
            label="task",
        )

    def claimable(self) -> list[UUID]:
        return sorted(
            i
            for i, m in self.tasks.items()
            if m.status == PENDING and m.due and m.task.queue == QUEUE
        )

    def check_miss(self, worker: int, m: Model) -> None:
        """The reason a worker logs for a doorbell that claimed nothing is the model's."""
        reason = self.run(self.lifecycle(worker).explain_miss(m.id)).reason
        if m.task.queue != QUEUE:
            assert reason.startswith(f"belongs to queue {m.task.queue!r}"), reason
        elif m.status == PENDING and not m.due:
            assert reason.startswith("pending but not due"), reason
        elif m.status == PENDING:
            assert reason.startswith("pending with all"), reason
        else:
            assert reason == f"already {m.status} (run {m.task.runs})", reason

    @precondition(lambda self: self.tasks)
    @rule(worker=st.integers(0, len(WORKERS) - 1), data=st.data())
    def claim(self, worker: int, data: st.DataObject) -> None:
        """Doorbells: mostly for due tasks of our queue; sometimes for any task (a stale or
        duplicate doorbell, a task not due yet or on another queue), which claims nothing."""
        for _ in range(data.draw(st.integers(1, 3), label="doorbells")):
            due = self.claimable()
            if due and data.draw(st.integers(0, 3), label="fresh") > 0:
                self.expect_claim(worker, data.draw(st.sampled_from(due), label="task"))
            else:
                self.expect_claim(worker, self.pick_task(data))

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def doorbell_burst(self, data: st.DataObject) -> None:
        """Doorbells arriving together at the busy worker: one claim statement for all of them.
        Of duplicates, only the first gets the claim."""
        due = self.claimable()
        ids = data.draw(
            st.lists(st.sampled_from(due or sorted(self.tasks)), min_size=2, max_size=5),
            label="doorbells",
        )
        if data.draw(st.booleans(), label="with a stale one"):
            ids.append(self.pick_task(data))
        # Decided before any of them runs: the first doorbell of each claimable task gets it.
        winners = {
            ids.index(task_id) for task_id in set(ids) if self.can_claim(self.tasks[task_id], BUSY)
        }

        async def claims() -> list[Task | None]:
            return await asyncio.gather(*(self.lifecycle(BUSY).claim(i) for i in ids))

        for index, (task_id, task) in enumerate(zip(ids, self.run(claims()), strict=True)):
            if index in winners:
                self.claimed(BUSY, self.tasks[task_id], task)
            else:
                assert task is None, (task_id, index)

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def finish_burst(self, data: st.DataObject) -> None:
        """Runs of different tasks (holding or stale, roots and subtasks) finishing at the same
        time, on several connections: siblings race to resume their parent, which must resume
        exactly once; root completions of the busy worker share one statement."""
        by_task: dict[UUID, Run] = {}
        runs = st.lists(st.sampled_from(self.runs), min_size=2, max_size=5)
        for run in data.draw(runs, label="runs"):
            by_task.setdefault(run.task.id, run)
        items = [
            (run, data.draw(st.sampled_from([COMPLETED, COMPLETED, FAILED]), label="outcome"))
            for run in by_task.values()
        ]
        if data.draw(st.booleans(), label="one twice"):  # the same write sent twice at once
            items.append(data.draw(st.sampled_from(items), label="twice"))
        worker = data.draw(st.sampled_from([BUSY, 0]), label="worker")
        expected = [self.holds(run) or self.landed_before(run, kind) for run, kind in items]

        async def finishes() -> list[Any]:
            lifecycle = self.lifecycle(worker)
            return await asyncio.gather(
                *(
                    lifecycle.complete(run.task, '{"burst":true}')
                    if kind == COMPLETED
                    else lifecycle.fail(run.task, "burst")
                    for run, kind in items
                )
            )

        results = self.run(finishes())
        assert [f.landed for f in results] == expected, items
        parents = set()
        for run, kind in items:  # (a write sent twice lands once: holds() is False then)
            if self.holds(run):
                m = self.tasks[run.task.id]
                if kind == COMPLETED:
                    m.task.complete({"burst": True}, at=NOW)
                else:
                    m.task.fail("burst", at=NOW)
                m.ended(kind)
                parents.add(m.parent)
        resumed = set().union(*(self.resume_if_done(p) for p in sorted(parents, key=str)))
        rung = [d.task_id for f in results for d in f.doorbells]
        assert sorted(rung) == sorted(resumed), "each resumed parent is rung exactly once"

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        """A worker extends the leases of the runs it thinks it holds; stale ones come back as
        lost, and must not extend anything (above all not the lease of the run that holds the
        task now, once that one's lease has run out)."""
        superseded = [
            r for r in self.runs if not self.holds(r) and self.tasks[r.task.id].status == RUNNING
        ]
        pool = superseded if superseded and data.draw(st.booleans(), label="stale") else self.runs
        runs = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4), label="held")
        held = {r.task.id: r.task.runs for r in runs}
        lost = self.run(self.lifecycle(runs[0].worker).heartbeat(held))
        expected = set()
        for task_id, run in held.items():
            m = self.tasks[task_id]
            if m.status == RUNNING and m.task.runs == run:
                m.lease_expired = False
            else:
                expected.add(task_id)
        assert lost == expected

    # -- workers: finishing a run (current or stale) ----------------------------------------------

    def landed_before(self, run: Run, outcome: str) -> bool:
        """The repository treats a finish whose run already ended this way as its own retry."""
        return self.tasks[run.task.id].outcomes.get(run.task.runs) == outcome

    FINISHES = ("complete", "complete", "fail", "retry_later", "release", "wait", "wait")

    def finish_with(self, kind: str, run: Run, data: st.DataObject) -> None:
        finishes = {
            "complete": self.complete,
            "fail": self.fail,
            "retry_later": self.retry_later,
            "release": self.release,
            "wait": self.wait,
        }
        finishes[kind](run, data)

    @precondition(lambda self: any(self.holds(r) for r in self.runs))
    @rule(kind=st.sampled_from(FINISHES), data=st.data())
    def finish_a_run(self, kind: str, data: st.DataObject) -> None:
        """A run that holds its task writes its outcome."""
        holding = [r for r in self.runs if self.holds(r)]
        self.finish_with(kind, data.draw(st.sampled_from(holding), label="run"), data)

    @precondition(lambda self: any(not self.holds(r) for r in self.runs))
    @rule(kind=st.sampled_from(FINISHES), data=st.data())
    def stale_write(self, kind: str, data: st.DataObject) -> None:
        """A run that lost its claim (rescued, cancelled, finished already) writes an outcome:
        it must change nothing, most of all while another run holds the task."""
        stale = [r for r in self.runs if not self.holds(r)]
        superseded = [r for r in stale if self.tasks[r.task.id].status == RUNNING]
        recent = superseded and data.draw(st.integers(0, 3), label="superseded") > 0
        pool = superseded if recent else stale
        self.finish_with(kind, data.draw(st.sampled_from(pool), label="run"), data)

    def complete(self, run: Run, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, 2), label="children") if len(self.tasks) < MAX_TASKS else 0
        m = self.tasks[run.task.id]
        holds, before = self.holds(run), self.landed_before(run, COMPLETED)
        children = self.new_children(m, n, data) if holds else []
        finish = self.run(self.lifecycle(run.worker).complete(run.task, '{"done":true}', children))
        assert finish.landed == (holds or before)
        if not holds:
            assert finish.doorbells == []
            return
        m.task.complete({"done": True}, at=NOW)
        m.ended(COMPLETED)
        expected = {c.id for c in children} | self.resume_if_done(m.parent)
        assert {d.task_id for d in finish.doorbells} == expected

    def fail(self, run: Run, data: st.DataObject) -> None:
        m = self.tasks[run.task.id]
        holds, before = self.holds(run), self.landed_before(run, FAILED)
        finish = self.run(self.lifecycle(run.worker).fail(run.task, "boom"))
        assert finish.landed == (holds or before)
        if not holds:
            assert finish.doorbells == []
            return
        m.task.fail("boom", at=NOW)
        m.ended(FAILED)
        assert {d.task_id for d in finish.doorbells} == self.resume_if_done(m.parent)

    def retry_later(self, run: Run, data: st.DataObject) -> None:
        later = data.draw(st.booleans(), label="backoff of an hour")
        m = self.tasks[run.task.id]
        applies = self.holds(run)
        if applies:
            try:
                m.task.retry(at=NOW, run_after=LATER if later else NOW)
            except AttemptsExhaustedError:  # a retry with no attempt left is a failure
                applies = False
        before = self.landed_before(run, "retry")
        landed = self.run(
            self.lifecycle(run.worker).retry_later(
                run.task, "try again", delay_seconds=3600.0 if later else 0.0
            )
        )
        assert landed == (applies or before)
        if applies:
            m.ended("retry")
            m.dispatchable = True

    def release(self, run: Run, data: st.DataObject) -> None:
        m = self.tasks[run.task.id]
        holds, before = self.holds(run), self.landed_before(run, "released")
        landed = self.run(self.lifecycle(run.worker).release(run.task))
        assert landed == (holds or before)
        if holds:
            m.task.release(at=NOW)
            m.ended("released")
            m.dispatchable = True

    def wait(self, run: Run, data: st.DataObject) -> None:
        room = len(self.tasks) < MAX_TASKS
        n = data.draw(st.sampled_from([1, 1, 2, 3]), label="children") if room else 0
        m = self.tasks[run.task.id]
        holds, before = self.holds(run), self.landed_before(run, WAITING)
        children = self.new_children(m, n, data) if holds else []
        if not children:  # waiting for nothing is refused, whoever asks: nothing changes
            with pytest.raises(InvalidInputError, match="spawned none"):
                self.run(self.lifecycle(run.worker).wait(run.task, children))
            return
        finish = self.run(self.lifecycle(run.worker).wait(run.task, children))
        assert finish.landed == (holds or before)
        if not holds:
            assert finish.doorbells == []
            return
        m.task.wait(at=NOW)
        m.ended(WAITING)
        assert {d.task_id for d in finish.doorbells} == {c.id for c in children}

    # -- the reconciler ---------------------------------------------------------------------------

    @precondition(lambda self: any(m.status == RUNNING for m in self.tasks.values()))
    @rule(data=st.data())
    def lease_runs_out(self, data: st.DataObject) -> None:
        """The holder stopped heartbeating (killed, blocked): back-date its lease. Often a
        reconciler tick follows at once."""
        running = sorted(i for i, m in self.tasks.items() if m.status == RUNNING)
        subtasks = [i for i in running if self.tasks[i].parent is not None]
        pool = subtasks if subtasks and data.draw(st.booleans(), label="subtask") else running
        task_id = data.draw(st.sampled_from(pool), label="task")
        self.run(
            self.env.admin.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                task_id,
            )
        )
        self.tasks[task_id].lease_expired = True
        if data.draw(st.booleans(), label="tick"):
            self.reconcile(data.draw(st.integers(0, len(WORKERS) - 1), label="worker"), False)

    @precondition(
        lambda self: any(m.status == PENDING and m.task.attempts for m in self.tasks.values())
    )
    @rule(data=st.data())
    def operator_caps_attempts(self, data: st.DataObject) -> None:
        """An operator lowers max_attempts of a pending task to the attempts it has used: no
        claim may take it any more."""
        tried = sorted(i for i, m in self.tasks.items() if m.status == PENDING and m.task.attempts)
        m = self.tasks[data.draw(st.sampled_from(tried), label="task")]
        self.run(
            self.env.admin.execute("UPDATE tasks SET max_attempts = attempts WHERE id = $1", m.id)
        )
        m.task.max_attempts = m.task.attempts

    def rescue(self, worker: int) -> None:
        rescued, doorbells = self.run(self.lifecycle(worker).rescue_expired(limit=1000))
        expired = [m for m in self.tasks.values() if m.status == RUNNING and m.lease_expired]
        assert {r.task_id for r in rescued} == {m.id for m in expired}
        resumed: set[UUID] = set()
        by_id = {r.task_id: r for r in rescued}
        # Roots first, then children one by one (each under its parent's lock), as the lifecycle.
        for m in sorted(expired, key=lambda m: m.parent is not None):
            backoff = 0.0 if WORKERS[worker].retry_base_seconds == 0 else 3600.0
            m.task.expire_lease(at=NOW, backoff_seconds=backoff)
            m.ended("lost")
            if m.task.status is TaskStatus.PENDING:
                m.dispatchable = True
            else:
                resumed |= self.resume_if_done(m.parent)
            assert by_id[m.id].status is m.task.status
            assert by_id[m.id].runs == m.task.runs
        assert {d.task_id for d in doorbells} == resumed

    def resume_stranded(self, worker: int) -> None:
        """Every change that finishes a child resumes its parent at once: nothing is stranded."""
        assert self.run(self.lifecycle(worker).resume_stranded(min_age_seconds=0, limit=100)) == []

    def dispatch(self, worker: int) -> None:
        rung = self.run(self.lifecycle(worker).mark_due_dispatched(queue=QUEUE, limit=1000))
        expected = [
            m
            for m in self.tasks.values()
            if m.status == PENDING and m.task.queue == QUEUE and m.due and m.dispatchable
        ]
        assert sorted((d.task_id, d.runs) for d in rung) == sorted(
            (m.id, m.task.runs) for m in expected
        )
        for m in expected:
            m.dispatchable = False

    @rule(worker=st.integers(0, len(WORKERS) - 1), later=st.booleans())
    def reconcile(self, worker: int, later: bool) -> None:
        """One reconciler tick of a worker, in its order: rescue, resume stranded, dispatch;
        `later`: after every backoff, schedule and redispatch delay has run out."""
        if later:
            self.time_passes()
        self.rescue(worker)
        self.resume_stranded(worker)
        self.dispatch(worker)

    def time_passes(self) -> None:
        self.run(
            self.env.admin.execute(
                "UPDATE tasks SET run_after = least(run_after, now() - interval '1 second'),"
                " dispatch_after = least(dispatch_after, now() - interval '1 second')"
            )
        )
        for m in self.tasks.values():
            m.task.run_after = min(m.task.run_after or NOW, NOW)
            m.dispatchable = True

    # -- the operator -----------------------------------------------------------------------------

    @precondition(lambda self: self.tasks and self.operator_actions > 0)
    @rule(data=st.data())
    def operator(self, data: st.DataObject) -> None:
        """An operator retries or cancels a task, whatever its status, or cancels a subtask
        that a waiting parent awaits."""
        self.operator_actions -= 1
        awaited = sorted(
            c
            for m in self.tasks.values()
            if m.status == WAITING
            for c in m.children
            if self.tasks[c].status in UNFINISHED
        )
        action = data.draw(st.sampled_from(["cancel awaited", "cancel", "retry"]), label="action")
        if awaited and (action == "cancel awaited" or data.draw(st.booleans(), label="awaited")):
            self.cancel(data.draw(st.sampled_from(awaited), label="task"))  # a parent may resume
        elif action.startswith("cancel"):
            self.cancel(self.pick_task(data))
        else:
            self.operator_retry(self.pick_task(data))

    def cancel(self, task_id: UUID) -> None:

        async def cancel() -> Any:
            async with self.env.uow() as uow:
                result = await uow.tasks.cancel(task_id, dispatch_delay=REDISPATCH)
                await uow.commit()
            return result

        result = self.run(cancel())
        changed = [t for t in self.descendants(task_id) if self.tasks[t].status in UNFINISHED]
        for t in changed:
            m = self.tasks[t]
            if m.status == RUNNING:
                m.outcomes[m.task.runs] = CANCELLED
            m.task.cancel(at=NOW)
            m.lease_expired = False
        assert result.cancelled == len(changed)
        assert result.task.status is self.tasks[task_id].task.status
        resumed = self.resume_if_done(self.tasks[task_id].parent) if task_id in changed else set()
        assert {d.task_id for d in result.doorbells} == resumed

    def operator_retry(self, task_id: UUID) -> None:

        async def retry() -> Any:
            async with self.env.uow() as uow:
                result = await uow.tasks.retry(task_id, dispatch_delay=REDISPATCH)
                await uow.commit()
            return result

        result = self.run(retry())
        m = self.tasks[task_id]
        assert result.retried == (m.status == FAILED)
        if result.retried:
            m.task.retry(at=NOW)
            m.dispatchable = False
            assert [d.task_id for d in result.doorbells] == [task_id]
        assert result.task.status is m.task.status

    # -- after every step: the database is the model ----------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        rows = self.run(
            self.env.admin.fetch(
                "SELECT id, status, attempts, max_attempts, runs, step, worker_id, queue,"
                " parent_task_id, lease_expires_at IS NOT NULL AS leased,"
                " lease_expires_at < now() AS expired, run_after <= now() AS due,"
                " dispatch_after <= now() AS dispatchable FROM tasks"
            )
        )
        history = self.run(
            self.env.admin.fetch("SELECT task_id, run, outcome FROM task_attempts ORDER BY run")
        )
        assert {r["id"] for r in rows} == set(self.tasks)
        outcomes: dict[UUID, dict[int, str | None]] = {t: {} for t in self.tasks}
        for a in history:
            outcomes[a["task_id"]][a["run"]] = a["outcome"]
        for r in rows:
            m = self.tasks[r["id"]]
            t = m.task
            where = f"{m}\n  row {dict(r)}"
            assert r["status"] == m.status, where
            assert (r["attempts"], r["runs"], r["step"]) == (t.attempts, t.runs, t.step), where
            if t.max_attempts is not None:
                assert r["max_attempts"] == t.max_attempts, where
                assert r["attempts"] <= r["max_attempts"], where
            assert (r["queue"], r["parent_task_id"]) == (t.queue, t.parent_task_id), where
            assert r["leased"] == (m.status == RUNNING), where
            if m.status == RUNNING:
                assert r["worker_id"] == t.worker_id, where
                assert r["expired"] == m.lease_expired, where
            if m.status == PENDING:
                assert (r["due"], r["dispatchable"]) == (m.due, m.dispatchable), where
            assert outcomes[m.id] == m.outcomes, where
            # Every status change goes by the transition table; final states stay final.
            previous = self.seen.get(m.id, PENDING)
            if previous != m.status:
                allowed = ALLOWED_TRANSITIONS[TaskStatus(previous)]
                assert TaskStatus(m.status) in allowed, f"{previous} → {m.status}: {where}"
            self.seen[m.id] = m.status

    def teardown(self) -> None:
        self.run(check_invariants(self.env.url, all_final=False, operator_retries=True))


def test_the_lifecycle_matches_its_model(database_url: str) -> None:
    with asyncio.Runner() as runner:
        env = Env(database_url, runner)
        runner.run(env.open())
        try:
            machine = type("LifecycleMachineOnDb", (LifecycleMachine,), {"env": env})
            run_state_machine_as_test(
                machine,
                # Examples and steps per example: the loaded profile's (tests/conftest.py).
                settings=settings(suppress_health_check=[HealthCheck.too_slow]),
            )
        finally:
            runner.run(env.close())
