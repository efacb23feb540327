"""The guarantees in the README ("Guarantees, and the tests that prove them") and in
docs/architecture.md ("The failure model"), checked against what the database recorded.

The test template database carries an audit trigger (`AUDIT_DDL`, installed by
`tests/support/databases.py`, never by migrations) that writes every change of a task's status
or attempts to `test_transitions`, inside the same transaction. `check_invariants` replays that
history against the transition table of the domain: it sees every transition that committed,
whatever process made it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from uuid import UUID

from domain.value_objects import ALLOWED_TRANSITIONS, FINISHED_STATUSES, TaskStatus
from tests.support import db

AUDIT_DDL = """
CREATE TABLE test_transitions (
    id bigserial PRIMARY KEY,
    task_id uuid NOT NULL,
    old_status text,
    new_status text NOT NULL,
    old_attempts int,
    new_attempts int NOT NULL,
    max_attempts int,
    runs int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION test_record_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO test_transitions (task_id, new_status, new_attempts, max_attempts, runs)
        VALUES (NEW.id, NEW.status, NEW.attempts, NEW.max_attempts, NEW.runs);
    ELSIF NEW.status IS DISTINCT FROM OLD.status OR NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        INSERT INTO test_transitions
            (task_id, old_status, new_status, old_attempts, new_attempts, max_attempts, runs)
        VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts, NEW.max_attempts,
                NEW.runs);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_transitions AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION test_record_transition();
"""

FINAL = {s.value for s in FINISHED_STATUSES}


async def check_invariants(
    url: str,
    *,
    task_ids: Sequence[UUID] | None = None,
    operator_retries: bool = False,
    all_final: bool = True,
    logs: Iterable[str] = (),
    secrets: Iterable[str] = (),
) -> None:
    """Assert every guarantee for `task_ids` (default: every task in the database).

    - every task is finished (`all_final`);
    - every recorded status change is allowed by the transition table;
    - completed and cancelled never change again; failed only by an operator retry
      (`operator_retries`), and at most one final transition per task otherwise;
    - attempts never exceed max_attempts and only go down where the lifecycle says so
      (resume, operator retry, release on shutdown);
    - no task is running past its lease plus slack;
    - task_attempts runs are numbered 1…n without gaps, only a running task has an open run,
      and a completed task has exactly one completed run;
    - no secret appears in the logs.
    """
    rows = await db.query(
        url,
        "SELECT * FROM tasks WHERE $1::uuid[] IS NULL OR id = ANY($1::uuid[])",
        list(task_ids) if task_ids is not None else None,
    )
    if task_ids is not None:
        assert len(rows) == len(set(task_ids)), "some tasks are missing"
    ids = [r["id"] for r in rows]
    tasks = {r["id"]: r for r in rows}
    problems: list[str] = []

    if all_final:
        for r in rows:
            if r["status"] not in FINAL:
                problems.append(f"{r['id']} ({r['agent_id']}) is still {r['status']}")

    history: dict[UUID, list[object]] = defaultdict(list)
    for t in await db.query(
        url, "SELECT * FROM test_transitions WHERE task_id = ANY($1::uuid[]) ORDER BY id", ids
    ):
        history[t["task_id"]].append(t)
    for task_id, transitions in history.items():
        problems.extend(_check_history(task_id, transitions, operator_retries))

    stuck = await db.query(
        url,
        "SELECT id, lease_expires_at FROM tasks WHERE status = 'running'"
        " AND lease_expires_at < now() - interval '30 seconds' AND id = ANY($1::uuid[])",
        ids,
    )
    problems.extend(f"{s['id']} running past its lease ({s['lease_expires_at']})" for s in stuck)

    attempts: dict[UUID, list[object]] = defaultdict(list)
    for a in await db.query(
        url, "SELECT * FROM task_attempts WHERE task_id = ANY($1::uuid[]) ORDER BY run", ids
    ):
        attempts[a["task_id"]].append(a)
    for task_id, task in tasks.items():
        problems.extend(_check_attempts(task, attempts.get(task_id, [])))

    text = "\n".join(logs)
    problems.extend(f"secret {s[:3]}… found in the logs" for s in secrets if s and s in text)
    assert not problems, "invariants broken:\n  " + "\n  ".join(problems[:50])


def _check_history(task_id: UUID, transitions: list[object], operator_retries: bool) -> list[str]:
    problems: list[str] = []
    finals = 0
    for t in transitions:
        old, new = t["old_status"], t["new_status"]  # type: ignore[index]
        old_attempts, new_attempts = t["old_attempts"], t["new_attempts"]  # type: ignore[index]
        maximum = t["max_attempts"]  # type: ignore[index]
        where = f"{task_id}: {old} → {new}"
        if maximum is not None and new_attempts > maximum:
            problems.append(f"{where}: attempts {new_attempts} > max_attempts {maximum}")
        if old is None:
            continue
        if old != new and TaskStatus(new) not in ALLOWED_TRANSITIONS[TaskStatus(old)]:
            problems.append(f"{where} is not in the transition table")
        if old == "failed" and new == "pending" and not operator_retries:
            problems.append(f"{where}: a failed task was retried, but no operator did so")
        if new in FINAL and old != new:
            finals += 1
        if old_attempts is not None and new_attempts < old_attempts:
            allowed = (old, new) in {("waiting", "pending"), ("failed", "pending")} or (
                (old, new) == ("running", "pending") and new_attempts == old_attempts - 1
            )
            if not allowed:
                problems.append(f"{where}: attempts went down {old_attempts} → {new_attempts}")
    retries = sum(
        1
        for t in transitions
        if (t["old_status"], t["new_status"]) == ("failed", "pending")  # type: ignore[index]
    )
    if finals > 1 + retries:
        problems.append(f"{task_id}: {finals} final transitions")
    return problems


def _check_attempts(task: object, runs: list[object]) -> list[str]:
    task_id, status = task["id"], task["status"]  # type: ignore[index]
    problems: list[str] = []
    numbers = [r["run"] for r in runs]  # type: ignore[index]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"{task_id}: runs numbered {numbers}")
    if len(runs) != task["runs"]:  # type: ignore[index]
        problems.append(f"{task_id}: {len(runs)} attempt rows but runs = {task['runs']}")  # type: ignore[index]
    open_runs = [r for r in runs if r["outcome"] is None]  # type: ignore[index]
    if open_runs and status != "running":
        problems.append(f"{task_id} is {status} with an unfinished run {open_runs[0]['run']}")  # type: ignore[index]
    if len(open_runs) > 1:
        problems.append(f"{task_id} has {len(open_runs)} unfinished runs")
    completed = [r for r in runs if r["outcome"] == "completed"]  # type: ignore[index]
    if status == "completed" and len(completed) != 1:
        problems.append(f"{task_id} is completed with {len(completed)} completed runs")
    return problems


IDLE_IN_TRANSACTION = (
    "SELECT pid, application_name, state, query, state_change FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND state LIKE 'idle in transaction%'"
)


async def idle_in_transaction(url: str, settle: float = 2.0) -> list[object]:
    """Connections to this database left inside a transaction (a leaked session or lock).

    A live worker between two statements of a transaction is idle in it for a moment, and on a
    busy machine the moment can be caught: a connection counts only if it is still idle in the
    same state `settle` seconds later. One that was left there never moves on."""
    seen = await db.query(url, IDLE_IN_TRANSACTION)
    if not seen:
        return []
    await asyncio.sleep(settle)
    before = {(r["pid"], r["state_change"]) for r in seen}
    after = await db.query(url, IDLE_IN_TRANSACTION)
    return [r for r in after if (r["pid"], r["state_change"]) in before]
