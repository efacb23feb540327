"""TaskRepository's SQL: the task lifecycle, every step one guarded statement, and its reads.

Each status change here is generated from the transition table in `TaskStatus`: the `WHERE status
IN (…)` guard of a statement moving tasks to X is `TaskStatus.sources_of(X)` (narrowed where the
step itself needs a narrower source, e.g. a claim only takes pending tasks). Run-scoped writes
(heartbeat, finish) are fenced by `runs = :run`: a run that lost its claim changes nothing.

All times come from the database clock (`now()`). `make_interval(secs => …)` turns seconds from
Python into intervals. How the statements compose into transactions, and in which order they take
their locks, is `TaskRepository`'s business (see docs/architecture.md).
"""

from __future__ import annotations

from domain.policies import MAX_BACKOFF_EXPONENT
from domain.value_objects import (
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    AttemptOutcome,
    TaskStatus,
)
from persistence.repositories.flow_sql import limited, paused
from persistence.sql import Sql


def _statuses(statuses: frozenset[TaskStatus] | tuple[TaskStatus, ...]) -> str:
    ordered = [s for s in TaskStatus if s in statuses]
    return "(" + ", ".join(f"'{s.value}'" for s in ordered) + ")"


def _guard(target: TaskStatus, *, only: TaskStatus | None = None) -> str:
    """`IN (…)` of the statuses allowed to move to `target` (optionally narrowed to `only`)."""
    sources = TaskStatus.sources_of(target)
    if only is not None:
        if only not in sources:
            raise AssertionError(f"{only} → {target} is not in the transition table")
        sources = (only,)
    return _statuses(sources)


PENDING, RUNNING, WAITING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
UNFINISHED = _statuses(UNFINISHED_STATUSES)
FINISHED = _statuses(FINISHED_STATUSES)

# A task's max_attempts: its own, else its agent's registered default, else the worker's default.
_MAX_ATTEMPTS = (
    "COALESCE(t.max_attempts, (SELECT a.max_attempts FROM agents AS a WHERE a.id = t.agent_id),"
    " :default_max_attempts)"
)

# Exponential backoff with ±25 % jitter, evaluated in the database for set-based rescues: the
# formula of `domain.policies.retry_delay`, its exponent capped alike (2^64 is past any maximum;
# uncapped, a task with thousands of attempts overflows float8 and fails the whole statement).
_BACKOFF_SECONDS = (
    "LEAST(CAST(:retry_max_seconds AS float8),"
    " CAST(:retry_base_seconds AS float8)"
    f" * power(2, LEAST(GREATEST(t.attempts - 1, 0), {MAX_BACKOFF_EXPONENT})))"
    " * (0.75 + random() * 0.5)"
)


def _due_at(alias: str) -> str:
    """A doorbell's place in its queue (`Doorbell.due_at`): the task's due rank, kept within the
    years Python's datetime holds (a row written with plain SQL may say '-infinity')."""
    return (
        f"LEAST(GREATEST({alias}.due_rank, timestamptz '1970-01-02'),"
        f" timestamptz '9999-01-01') AS due_at"
    )


TASK_COLUMNS = (
    "id, conversation_id, parent_task_id, agent_id, queue, status, input, output, error,"
    " metadata, attempts, max_attempts, run_after, worker_id, lease_expires_at,"
    " idempotency_key, runs, step, version, priority, wait_signals, woke_by, created_at,"
    " started_at, completed_at, updated_at, trace_context"
)

# --- insert ------------------------------------------------------------------------------------

# (parameter, type, column) of each task's values, in insert_params (persistence.mappers).
_INSERT_VALUES = (
    ("ids", "uuid", "id"),
    ("conversation_ids", "uuid", "conversation_id"),
    ("parent_ids", "uuid", "parent_task_id"),
    ("agent_ids", "text", "agent_id"),
    ("queues", "text", "queue"),
    ("inputs", "text", "input"),
    ("metadatas", "text", "metadata"),
    ("max_attempts", "int", "max_attempts"),
    ("priorities", "int", "priority"),
    ("run_afters", "timestamptz", "run_after"),
    ("idempotency_keys", "text", "idempotency_key"),
    ("dispatch_delays", "float8", "dispatch_delay"),
    ("trace_contexts", "text", "trace_context"),
)
# Many tasks: one array per column. One task: its values as scalars, which costs both sides
# less than one-element arrays (a producer's single submit; bench/run.py, submit).
_MANY = "unnest({}) AS n({})".format(
    ", ".join(f"CAST(:{p} AS {t}[])" for p, t, _ in _INSERT_VALUES),
    ", ".join(c for _, _, c in _INSERT_VALUES),
)
_ONE = "(SELECT {}) AS n".format(
    ", ".join(f"CAST(:{p} AS {t}) AS {c}" for p, t, c in _INSERT_VALUES)
)


# The insert computes what the trigger `tasklane_task_flow` would (migration 0012): the task's
# key under its agent's limits and its due rank. The trigger then does not fire for it (it fires
# for rows written with plain SQL, which leave them NULL): a trigger call and its lookup of
# flow_limits were a third of the server's work per inserted row. Same rules as the trigger:
# the key is the named field of the metadata or of an object input ('' when missing or when
# the agent has no keyed limit), the due rank `priority` minutes before the task is due
# (tests/integration/test_schema.py holds the two to the same answers).
def _insert(source: str, *, skip_taken_keys: bool) -> Sql:
    conflict = "ON CONFLICT (idempotency_key) DO NOTHING" if skip_taken_keys else ""
    return Sql(f"""
INSERT INTO tasks (id, conversation_id, parent_task_id, agent_id, queue, input, metadata,
                   max_attempts, priority, run_after, idempotency_key, dispatch_after,
                   trace_context, limit_key, due_rank)
SELECT u.id, u.conversation_id, u.parent_task_id, u.agent_id, u.queue, u.input, u.metadata,
       u.max_attempts, u.priority, u.run_after, u.idempotency_key,
       now() + make_interval(secs => u.dispatch_delay), CAST(u.trace_context AS jsonb),
       CASE l.key_source
           WHEN 'metadata' THEN COALESCE(u.metadata ->> l.key_field, '')
           WHEN 'input' THEN COALESCE(CASE WHEN jsonb_typeof(u.input) = 'object'
                                           THEN u.input ->> l.key_field END, '')
           ELSE '' END,
       u.run_after - make_interval(mins => u.priority)
FROM (SELECT id, conversation_id, parent_task_id, agent_id, queue, CAST(input AS jsonb) AS input,
             CAST(metadata AS jsonb) AS metadata, max_attempts, priority,
             COALESCE(run_after, now()) AS run_after, idempotency_key, dispatch_delay,
             trace_context
      FROM {source}) AS u
LEFT JOIN flow_limits AS l ON l.queue = u.queue AND l.agent_id = u.agent_id
{conflict}
RETURNING {TASK_COLUMNS}
""")


# Producers' idempotent variants skip a taken key: it inserts nothing, and the caller reads the
# existing row.
INSERT_TASKS = _insert(_MANY, skip_taken_keys=False)
INSERT_TASKS_SKIP_TAKEN_KEYS = _insert(_MANY, skip_taken_keys=True)
INSERT_ONE_TASK = _insert(_ONE, skip_taken_keys=False)
INSERT_ONE_TASK_SKIP_TAKEN_KEY = _insert(_ONE, skip_taken_keys=True)

# --- claim -------------------------------------------------------------------------------------


# Locks are taken in id order so that two workers claiming overlapping batches cannot deadlock.
# A worker claims only its own queue's tasks (:queue NULL: any queue), whatever queue a doorbell
# reached it on: another queue's workers may not even serve the task's agent. Nothing in a paused
# scope starts; a limited agent's tasks are claimed only through `TaskRepository.claim_limited`
# (flow control), which takes the plain claim without that gate (`CLAIM_LIMITED`).
def _claim(*, gated: bool) -> Sql:
    gate = f"AND NOT {limited('t')}" if gated else ""
    # A flow claim's transaction began before it waited for its agent's lock, and so did its
    # now(): its run starts when the statement runs, after the run whose slot it takes ended.
    started = "now()" if gated else "clock_timestamp()"
    return Sql(f"""
WITH candidates AS (
    SELECT t.id FROM tasks AS t
    WHERE t.id = ANY(CAST(:ids AS uuid[]))
      AND t.status IN {_guard(RUNNING, only=PENDING)}
      AND t.run_after <= now()
      AND (CAST(:queue AS text) IS NULL OR t.queue = CAST(:queue AS text))
      AND NOT {paused("t")} {gate}
    ORDER BY t.id
    FOR UPDATE
), claimed AS (
    UPDATE tasks AS t
    SET status = '{RUNNING}',
        attempts = t.attempts + 1,
        runs = t.runs + 1,
        max_attempts = {_MAX_ATTEMPTS},
        worker_id = :worker_id,
        started_at = {started},
        lease_expires_at = now() + make_interval(secs => :lease_seconds),
        version = t.version + 1,
        updated_at = now()
    FROM candidates AS c
    WHERE t.id = c.id
      AND t.status IN {_guard(RUNNING, only=PENDING)}
      AND t.attempts < {_MAX_ATTEMPTS}
    RETURNING t.*
), history AS (
    INSERT INTO task_attempts (task_id, run, attempt, worker_id, started_at, claim_token)
    SELECT id, runs, attempts, worker_id, started_at, CAST(:claim_token AS uuid) FROM claimed
)
SELECT {TASK_COLUMNS} FROM claimed
""")


CLAIM = _claim(gated=True)
CLAIM_LIMITED = _claim(gated=False)

# After a claim whose outcome is unknown (the connection died around its commit): the runs that
# very claim statement started (its claim token), if they still hold their task, taken up again
# with a fresh lease. Fenced by run: a later run of the same task, even by this worker, is not
# adopted; a run this worker gave up on for another reason is left to lease expiry.
ADOPT = Sql(f"""
UPDATE tasks AS t
SET lease_expires_at = now() + make_interval(secs => :lease_seconds), updated_at = now()
FROM unnest(CAST(:ids AS uuid[]), CAST(:claim_tokens AS uuid[])) AS u(id, claim_token)
WHERE t.id = u.id AND t.status = '{RUNNING}'
  AND EXISTS (SELECT 1 FROM task_attempts AS a
              WHERE a.task_id = t.id AND a.run = t.runs AND a.claim_token = u.claim_token)
RETURNING {", ".join("t." + c.strip() for c in TASK_COLUMNS.split(","))}
""")

# Why a doorbell claimed nothing: read once, only on a miss, for the log line.
EXPLAIN_MISS = Sql(f"""
SELECT t.status, t.queue, t.agent_id, t.runs, t.attempts, t.max_attempts,
       EXTRACT(EPOCH FROM t.run_after - now()) AS due_in_seconds,
       {paused("t")} AS paused, {limited("t")} AS limited
FROM tasks AS t WHERE t.id = :id
""")

# --- heartbeat ---------------------------------------------------------------------------------

# Rows another transaction holds (a cancel, a rescue) are skipped rather than waited for: the
# lease has two more heartbeats of slack, and waiting in arbitrary order could deadlock.
HEARTBEAT = Sql(f"""
WITH held AS (
    SELECT h.id, h.run FROM unnest(CAST(:ids AS uuid[]), CAST(:runs AS int[])) AS h(id, run)
), mine AS (
    SELECT t.id FROM tasks AS t JOIN held AS h ON t.id = h.id AND t.runs = h.run
    WHERE t.status = '{RUNNING}'
    ORDER BY t.id
    FOR UPDATE OF t SKIP LOCKED
), extended AS (
    UPDATE tasks AS t SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
    FROM mine WHERE t.id = mine.id
    RETURNING t.id
)
SELECT h.id,
       EXISTS (SELECT 1 FROM tasks AS t
               WHERE t.id = h.id AND t.runs = h.run AND t.status = '{RUNNING}') AS ours
FROM held AS h
""")

# Appended to a statement whose CTE `done` holds tasks that just reached a final state: each
# parent's count of unfinished children goes down by its children in `done`, and a waiting
# parent left with none resumes (pending again, step + 1, fresh attempts) — in this same update,
# for a parent row must change once per transaction: a cancel waiting for its lock would
# otherwise deadlock with the second change. The count says when to look; the look itself
# checks the children (one index probe, those in `done` left out: this statement's snapshot
# still sees them unfinished), so a child added or changed by hand, which no count saw, still
# holds its parent. The caller holds the parents' locks already (parent first, then the child).
# Parents that are in `done` themselves (a cancelled subtree) are left out: theirs are final.
# A waiting task's non-subtask wait is satisfied (durable waits, migration 0006): it waits for
# no signal and no timer, or one of its signals has arrived. (A timer alone is woken by the
# reconciler at its deadline; a signal's arrival resumes it in the signal's own statement.)
_WAIT_SATISFIED = """((p.wait_signals IS NULL AND p.wait_deadline IS NULL)
        OR EXISTS (SELECT 1 FROM task_signals AS s WHERE s.task_id = p.id
                   AND s.consumed_at IS NULL AND s.name = ANY(p.wait_signals)))"""
_WOKE_BY = "CASE WHEN p.wait_signals IS NULL THEN 'children' ELSE 'signal' END"
_RESUMES = f"""(p.status IN {_guard(PENDING, only=WAITING)} AND p.open_children - counted.n <= 0
        AND {_WAIT_SATISFIED}
        AND NOT EXISTS (SELECT 1 FROM tasks AS c
                        WHERE c.parent_task_id = p.id AND c.status IN {UNFINISHED}
                          AND c.id NOT IN (SELECT id FROM done)))"""
_COUNT_DOWN = f"""
, counted AS (
    SELECT parent_task_id AS id, count(*) AS n FROM done
    WHERE parent_task_id IS NOT NULL GROUP BY parent_task_id
), parents AS (
    UPDATE tasks AS p
    SET open_children = GREATEST(p.open_children - counted.n, 0),
        status = CASE WHEN {_RESUMES} THEN '{PENDING}' ELSE p.status END,
        attempts = CASE WHEN {_RESUMES} THEN 0 ELSE p.attempts END,
        step = CASE WHEN {_RESUMES} THEN p.step + 1 ELSE p.step END,
        run_after = CASE WHEN {_RESUMES} THEN now() ELSE p.run_after END,
        dispatch_after = CASE WHEN {_RESUMES}
                         THEN now() + make_interval(secs => :dispatch_delay)
                         ELSE p.dispatch_after END,
        woke_by = CASE WHEN {_RESUMES} THEN {_WOKE_BY} ELSE p.woke_by END,
        version = p.version + 1, updated_at = now()
    FROM counted
    WHERE p.id = counted.id AND p.id NOT IN (SELECT id FROM done)
    RETURNING p.id, p.runs, p.queue, {_due_at("p")}, p.status = '{PENDING}' AS resumed
)"""
# The final SELECT of such a statement: each landed task and, when it resumed its parent, the
# parent's doorbell.
_LANDED = """
SELECT done.id, done.parent_task_id, COALESCE(parents.resumed, false) AS parent_resumed,
       parents.runs AS parent_runs, parents.queue AS parent_queue,
       parents.due_at AS parent_due_at
FROM done LEFT JOIN parents ON parents.id = done.parent_task_id
"""

# --- finish (fenced by the run number) ---------------------------------------------------------

# Roots complete in batches; this also serves one child inside its parent-locked transaction.
COMPLETE = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{COMPLETED}', output = CAST(f.output AS jsonb), error = NULL,
        completed_at = now(), lease_expires_at = NULL,
        version = t.version + 1, updated_at = now()
    FROM unnest(CAST(:ids AS uuid[]), CAST(:runs AS int[]), CAST(:outputs AS text[]))
         AS f(id, run, output)
    WHERE t.id = f.id AND t.runs = f.run AND t.status IN {_guard(COMPLETED)}
    RETURNING t.id, t.runs, t.parent_task_id
), history AS (
    UPDATE task_attempts AS a SET finished_at = now(), outcome = '{AttemptOutcome.COMPLETED}'
    FROM done WHERE a.task_id = done.id AND a.run = done.runs
){_COUNT_DOWN}{_LANDED}""")

FAIL = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{FAILED}', error = :error, completed_at = now(), lease_expires_at = NULL,
        version = t.version + 1, updated_at = now()
    WHERE t.id = :id AND t.runs = :run AND t.status IN {_guard(FAILED)}
    RETURNING t.id, t.runs, t.parent_task_id
), history AS (
    UPDATE task_attempts AS a
    SET finished_at = now(), outcome = '{AttemptOutcome.FAILED}', error = :error
    FROM done WHERE a.task_id = done.id AND a.run = done.runs
){_COUNT_DOWN}{_LANDED}""")

# The reconciler sends the doorbell once the backoff has passed (dispatch_after = run_after).
RETRY_LATER = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{PENDING}', error = :error,
        run_after = now() + make_interval(secs => :delay_seconds),
        dispatch_after = now(),
        lease_expires_at = NULL, version = t.version + 1, updated_at = now()
    WHERE t.id = :id AND t.runs = :run AND t.status IN {_guard(PENDING, only=RUNNING)}
      AND t.attempts < COALESCE(t.max_attempts, t.attempts + 1)
    RETURNING t.id, t.runs
), history AS (
    UPDATE task_attempts AS a
    SET finished_at = now(), outcome = '{AttemptOutcome.RETRY}', error = :error
    FROM done WHERE a.task_id = done.id AND a.run = done.runs
)
SELECT id, runs FROM done
""")

# Handed back without spending an attempt (a graceful shutdown; a worker that lacks the agent
# while another one has it): pending again, due after :delay_seconds; the run's history says why.
RELEASE = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{PENDING}', attempts = GREATEST(t.attempts - 1, 0),
        run_after = now() + make_interval(secs => :delay_seconds),
        dispatch_after = now(), lease_expires_at = NULL,
        version = t.version + 1, updated_at = now()
    WHERE t.id = :id AND t.runs = :run AND t.status IN {_guard(PENDING, only=RUNNING)}
    RETURNING t.id, t.runs
), history AS (
    UPDATE task_attempts AS a
    SET finished_at = now(), outcome = '{AttemptOutcome.RELEASED}', error = :reason
    FROM done WHERE a.task_id = done.id AND a.run = done.runs
)
SELECT id, runs FROM done
""")

# With :children, the subtasks the same transaction inserts next: the count it waits on.
WAIT = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{WAITING}', lease_expires_at = NULL, open_children = t.open_children + :children,
        wait_signals = CAST(:signals AS text[]),
        wait_deadline = now() + make_interval(secs => CAST(:deadline_seconds AS float8)),
        wait_on_timeout = CAST(:on_timeout AS text), woke_by = NULL,
        version = t.version + 1, updated_at = now()
    WHERE t.id = :id AND t.runs = :run AND t.status IN {_guard(WAITING)}
    RETURNING t.id, t.runs
), history AS (
    UPDATE task_attempts AS a SET finished_at = now(), outcome = '{AttemptOutcome.WAITING}'
    FROM done WHERE a.task_id = done.id AND a.run = done.runs
)
SELECT id FROM done
""")

# After a finish whose answer was lost: which of these runs already ended with the outcome we were
# writing. Only the run itself gives its history row completed, failed, retry, waiting or released
# (a rescue writes lost, a cancel cancelled), so this outcome means our own write landed.
RUNS_WITH_OUTCOME = Sql("""
SELECT a.task_id FROM task_attempts AS a
JOIN unnest(CAST(:ids AS uuid[]), CAST(:runs AS int[])) AS r(id, run)
  ON a.task_id = r.id AND a.run = r.run
WHERE a.outcome = :outcome
""")

# --- subtasks ----------------------------------------------------------------------------------

# Taken before any child of this parent changes to a final state: parent first, then the child.
LOCK_TASK = Sql("SELECT id, status, parent_task_id FROM tasks WHERE id = :id FOR UPDATE")

# Resume waiting parents whose children have all finished. Run after the children's change, in
# the same transaction that holds the parents' locks, so siblings finishing at once serialise and
# exactly one of them sees "no unfinished child left". The count (`open_children`) says when to
# look; the check itself reads the open children (one index probe), so a child inserted or
# changed by hand with SQL, which no count saw, still holds its parent.
RESUME_IF_DONE = Sql(f"""
UPDATE tasks AS p
SET status = '{PENDING}', attempts = 0, step = p.step + 1, run_after = now(),
    dispatch_after = now() + make_interval(secs => :dispatch_delay), open_children = 0,
    woke_by = {_WOKE_BY}, version = p.version + 1, updated_at = now()
WHERE p.id = ANY(CAST(:ids AS uuid[])) AND p.status IN {_guard(PENDING, only=WAITING)}
  AND {_WAIT_SATISFIED}
  AND NOT EXISTS (SELECT 1 FROM tasks AS c
                  WHERE c.parent_task_id = p.id AND c.status IN {UNFINISHED})
RETURNING p.id, p.runs, p.queue, {_due_at("p")}
""")

# Safety net for the reconciler: waiting parents whose children all finished but which nobody
# resumed (children changed by hand in SQL, a crash between two transactions).
STRANDED_WAITING = Sql(f"""
SELECT p.id FROM tasks AS p
WHERE p.status = '{WAITING}'
  AND p.updated_at < now() - make_interval(secs => :min_age_seconds)
  AND {_WAIT_SATISFIED}
  AND NOT EXISTS (SELECT 1 FROM tasks AS c
                  WHERE c.parent_task_id = p.id AND c.status IN {UNFINISHED})
ORDER BY p.updated_at
LIMIT :limit
""")

CHILDREN = Sql(f"""
SELECT {TASK_COLUMNS} FROM tasks WHERE parent_task_id = :id ORDER BY created_at, id
""")

PARENT_OF = Sql("SELECT id, parent_task_id FROM tasks WHERE id = :id")

# Subtasks added to parents (from outside, or a failed one retried): their counts go up.
COUNT_UP = Sql("""
UPDATE tasks AS p SET open_children = p.open_children + a.n
FROM unnest(CAST(:ids AS uuid[]), CAST(:counts AS int[])) AS a(id, n)
WHERE p.id = a.id
""")

# --- cancel ------------------------------------------------------------------------------------

# The one walk down a task tree: the task at :id (depth 0) and every descendant with its depth.
# CYCLE stops at a parent loop made by hand with SQL. Any depth: the recursion is Postgres's.
SUBTREE = """
WITH RECURSIVE tree(id, depth) AS (
    SELECT id, 0 FROM tasks WHERE id = :id
    UNION ALL
    SELECT c.id, tree.depth + 1 FROM tasks AS c JOIN tree ON c.parent_task_id = tree.id
) CYCLE id SET is_cycle USING path
"""

# One level of a subtree, locked in id order (TaskRepository._lock_family walks it down).
LOCK_CHILDREN = Sql("""
SELECT id FROM tasks WHERE parent_task_id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE
""")

# Parents that a submit attaches children to, locked in id order, with their status.
LOCK_PARENTS = Sql("""
SELECT id, status FROM tasks WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE
""")

CANCEL_MANY = Sql(f"""
WITH done AS (
    UPDATE tasks AS t
    SET status = '{CANCELLED}', completed_at = now(), lease_expires_at = NULL,
        error = CASE WHEN t.id = CAST(:root_id AS uuid) THEN 'cancelled'
                     ELSE 'cancelled with ancestor ' || CAST(CAST(:root_id AS uuid) AS text) END,
        version = t.version + 1, updated_at = now()
    WHERE t.id = ANY(CAST(:ids AS uuid[])) AND t.status IN {_guard(CANCELLED)}
    RETURNING t.id, t.runs, t.parent_task_id
), history AS (
    UPDATE task_attempts AS a SET finished_at = now(), outcome = '{AttemptOutcome.CANCELLED}'
    FROM done WHERE a.task_id = done.id AND a.run = done.runs AND a.outcome IS NULL
){_COUNT_DOWN}{_LANDED}""")

# --- operator retry ----------------------------------------------------------------------------

OPERATOR_RETRY = Sql(f"""
UPDATE tasks AS t
SET status = '{PENDING}', attempts = 0, error = NULL, output = NULL, completed_at = NULL,
    run_after = now(), dispatch_after = now() + make_interval(secs => :dispatch_delay),
    version = t.version + 1, updated_at = now()
WHERE t.id = :id AND t.status IN {_guard(PENDING, only=FAILED)}
RETURNING {TASK_COLUMNS}
""")

# --- reconciler: rescue and dispatch -----------------------------------------------------------

_HAS_ATTEMPTS_LEFT = "t.attempts < COALESCE(t.max_attempts, t.attempts + 1)"
_RESCUED_STATUS = f"CASE WHEN {_HAS_ATTEMPTS_LEFT} THEN '{PENDING}' ELSE '{FAILED}' END"
_LEASE_ERROR = "'lease expired on worker ' || COALESCE(t.worker_id, '?')"


# Running tasks whose lease ran out go back to pending (after a backoff) or, with their attempts
# spent, to failed. Root tasks in one statement (or one by one, when that statement fails on a
# row); children one by one, under their parent's lock.
def _rescue(source: str, where: str) -> Sql:
    return Sql(f"""
{source}rescued AS (
    UPDATE tasks AS t
    SET status = {_RESCUED_STATUS},
        error = {_LEASE_ERROR},
        run_after = now() + make_interval(secs => {_BACKOFF_SECONDS}),
        dispatch_after = now(),
        completed_at = CASE WHEN {_HAS_ATTEMPTS_LEFT} THEN NULL ELSE now() END,
        lease_expires_at = NULL, version = t.version + 1, updated_at = now()
    {where}
    RETURNING t.id, t.runs, t.status, t.queue, t.worker_id, t.parent_task_id
), history AS (
    UPDATE task_attempts AS a
    SET finished_at = now(), outcome = '{AttemptOutcome.LOST}',
        error = 'lease expired on worker ' || COALESCE(r.worker_id, '?')
    FROM rescued AS r WHERE a.task_id = r.id AND a.run = r.runs AND a.outcome IS NULL
), done AS (
    SELECT id, parent_task_id FROM rescued WHERE status = '{FAILED}'
){_COUNT_DOWN}
SELECT r.id, r.runs, r.status, r.queue, r.parent_task_id,
       COALESCE(parents.resumed, false) AS parent_resumed,
       parents.runs AS parent_runs, parents.queue AS parent_queue,
       parents.due_at AS parent_due_at
FROM rescued AS r LEFT JOIN parents ON parents.id = r.parent_task_id
""")


RESCUE_ROOTS = _rescue(
    f"""WITH expired AS (
    SELECT t.id FROM tasks AS t
    WHERE t.status = '{RUNNING}' AND t.lease_expires_at < now() AND t.parent_task_id IS NULL
    ORDER BY t.lease_expires_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), """,
    "FROM expired WHERE t.id = expired.id",
)

RESCUE_ONE = _rescue(
    "WITH ",
    f"""WHERE t.id = :id AND t.runs = :run AND t.status = '{RUNNING}'
      AND t.lease_expires_at < now()""",
)

_EXPIRED = f"""
SELECT id, runs, parent_task_id FROM tasks
WHERE status = '{RUNNING}' AND lease_expires_at < now() AND parent_task_id IS {{}} NULL
ORDER BY lease_expires_at
LIMIT :limit
"""
EXPIRED_ROOTS = Sql(_EXPIRED.format(""))
EXPIRED_CHILDREN = Sql(_EXPIRED.format("NOT"))

# A due task worth a doorbell of its own: not paused (its doorbell would only miss; it is rung
# when its pause ends) and not of a limited agent (those start through flow doorbells, rung as
# slots free: see persistence/repositories/flow_sql.py).
_RINGABLE = f"NOT {paused('t')} AND NOT {limited('t')}"

# Due pending tasks of a queue that have no live doorbell: never dispatched (plain SQL insert),
# dispatched too long ago (Redis lost it, a producer died after commit) or waiting out a backoff.
# Marked dispatched in the same statement (rows others hold are skipped), so that the doorbells
# are rung after the commit: no Redis call ever waits inside a Postgres transaction.
MARK_DUE_DISPATCHED = Sql(f"""
WITH due AS (
    SELECT t.id FROM tasks AS t
    WHERE t.status = '{PENDING}' AND t.queue = :queue
      AND greatest(t.run_after, t.dispatch_after) <= now() AND {_RINGABLE}
    ORDER BY greatest(t.run_after, t.dispatch_after)
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET dispatch_after = now() + make_interval(secs => :redispatch_seconds)
FROM due WHERE t.id = due.id
RETURNING t.id, t.runs, t.queue, {_due_at("t")}
""")

# The same, one task at a time: when the statement above fails on a row, the others still go.
DUE_FOR_DISPATCH = Sql(f"""
SELECT t.id FROM tasks AS t
WHERE t.status = '{PENDING}' AND t.queue = :queue
  AND greatest(t.run_after, t.dispatch_after) <= now() AND {_RINGABLE}
ORDER BY greatest(t.run_after, t.dispatch_after)
LIMIT :limit
""")

MARK_DISPATCHED = Sql(f"""
UPDATE tasks AS t SET dispatch_after = now() + make_interval(secs => :redispatch_seconds)
WHERE t.id = :id AND t.status = '{PENDING}' AND greatest(t.run_after, t.dispatch_after) <= now()
  AND {_RINGABLE}
RETURNING t.id, t.runs, t.queue, {_due_at("t")}
""")

# Doorbells that could not be rung after all: due for the next tick again.
UNMARK_DISPATCHED = Sql(f"""
UPDATE tasks SET dispatch_after = now()
WHERE id = ANY(CAST(:ids AS uuid[])) AND status = '{PENDING}'
""")

# --- durable waits -----------------------------------------------------------------------------

# Timers and signal timeouts whose deadline passed, the task's subtasks (if any) all finished:
# pending again, saying why. A timeout with on_timeout='fail' resumes as 'timeout_fail': the
# worker fails that run without calling the handler, through the usual fail (its parent counts
# down as for any failure).
WAKE_DUE = Sql(f"""
WITH due AS (
    SELECT p.id FROM tasks AS p
    WHERE p.status = '{WAITING}' AND p.wait_deadline <= now() AND p.queue = :queue
      AND NOT EXISTS (SELECT 1 FROM tasks AS c
                      WHERE c.parent_task_id = p.id AND c.status IN {UNFINISHED})
    ORDER BY p.wait_deadline
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS p
SET status = '{PENDING}', attempts = 0, step = p.step + 1, run_after = now(),
    dispatch_after = now() + make_interval(secs => :dispatch_delay), open_children = 0,
    woke_by = CASE WHEN p.wait_signals IS NULL THEN 'timer'
                   WHEN p.wait_on_timeout = 'fail' THEN 'timeout_fail'
                   ELSE 'timeout' END,
    version = p.version + 1, updated_at = now()
FROM due WHERE p.id = due.id AND p.status = '{WAITING}'
RETURNING p.id, p.runs, p.queue, {_due_at("p")}
""")

# The signals a resumed step reads: those its wait took (marked with the step), again on a retry
# of the same step.
TAKE_SIGNALS = Sql("""
UPDATE task_signals
SET consumed_at = COALESCE(consumed_at, now()), consumed_step = COALESCE(consumed_step, :step)
WHERE task_id = :id
  AND ((consumed_at IS NULL AND name = ANY(CAST(:names AS text[]))) OR consumed_step = :step)
RETURNING name, payload, sent_by, sent_at
""")

SEND_SIGNAL = Sql("""
WITH sent AS (
    INSERT INTO task_signals (task_id, name, payload, sent_by)
    VALUES (:id, :name, CAST(:payload AS jsonb), :sent_by)
    RETURNING task_id, id, sent_at
)
SELECT sent.id, sent.sent_at FROM sent
""")

RESUMED_BY_SIGNAL = Sql(f"""
SELECT t.id, t.runs, t.queue, {_due_at("t")}, t.status, t.woke_by FROM tasks AS t
WHERE t.id = :id
""")

PROGRESS = Sql(f"""
UPDATE tasks SET progress = CAST(:progress AS jsonb)
WHERE id = :id AND runs = :run AND status = '{RUNNING}'
""")

# --- reads -------------------------------------------------------------------------------------

TASK_BY_ID = Sql(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id")

TASKS_BY_KEYS = Sql(
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ANY(CAST(:keys AS text[]))"
)

# Due pending tasks of some agents, oldest due first (ix_tasks_pending_agent). With FOR UPDATE
# SKIP LOCKED (the `_LOCKED` variant) inside a transaction, two claimers never get the same row.
_PENDING_FOR_AGENTS = f"""
SELECT {TASK_COLUMNS} FROM tasks AS t
WHERE t.status = '{PENDING}' AND t.agent_id = ANY(CAST(:agent_ids AS text[]))
  AND t.run_after <= now()
  AND (CAST(:queue AS text) IS NULL OR t.queue = CAST(:queue AS text))
  AND {_RINGABLE}
ORDER BY t.due_rank, t.id
LIMIT :limit
"""
PENDING_FOR_AGENTS = Sql(_PENDING_FOR_AGENTS)
PENDING_FOR_AGENTS_LOCKED = Sql(_PENDING_FOR_AGENTS + "FOR UPDATE SKIP LOCKED")

ATTEMPTS_OF = Sql("""
SELECT task_id, run, attempt, worker_id, started_at, finished_at, outcome, error
FROM task_attempts WHERE task_id = :id ORDER BY run
""")
