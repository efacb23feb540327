"""Scenario 10: bad input, fuzzed with hypothesis, against a real worker, Postgres and Redis.

Every outcome must be one of: a clear domain error with nothing written, or a task that ends
`completed` (an `echo` returns exactly its input) or `failed` with a reason. The worker never
dies and keeps serving real tasks; the guarantees (README, Guarantees) hold afterwards.

One database, one queue and one in-process worker serve all the examples of a test (the
function-scoped fixtures are shared on purpose, hence the suppressed health check).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import pickle
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from arq.constants import job_key_prefix
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.entities import MAX_ATTEMPTS_LIMIT, Conversation, Task, check_agent_id
from domain.exceptions import EntityNotFoundError, InvalidFilterError, InvalidInputError
from domain.value_objects import TaskStatus
from persistence.repositories import TaskRepository
from persistence.session import UnitOfWork, create_session_factory
from tests.reliability.fuzz_agents import BAD_CHILDREN
from tests.support import db
from tests.support.invariants import check_invariants
from tests.support.workers import stop_worker
from worker.agents import load_agents
from worker.app import TasklaneWorker, worker_options
from worker.client import TaskClient
from worker.config import Settings
from worker.runtime import WorkerRuntime
from worker.serialization import serialize

pytestmark = pytest.mark.reliability

SHARED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def fuzz() -> Any:
    """The loaded profile's settings (tests/conftest.py), with fixtures shared by examples."""
    return hypothesis_settings(suppress_health_check=SHARED)


# -- a worker whose liveness the test can see -----------------------------------------------------


Live = tuple[TasklaneWorker, "asyncio.Task[None]"]  # the worker and its run: done = dead


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Live]:
    """An arq worker in this event loop, with its run task: `run.done()` means it died."""
    worker = TasklaneWorker(**{**worker_options(settings), "handle_signals": False})
    run = asyncio.create_task(worker.async_run())
    for _ in range(750):
        if "tasklane" in worker.ctx or run.done():
            break
        await asyncio.sleep(0.02)
    if run.done():
        run.result()
    assert "tasklane" in worker.ctx, "in-process worker did not start"
    try:
        yield worker, run
    finally:
        await stop_worker(worker, run)


@pytest.fixture
async def live_worker(
    settings: Settings, client: TaskClient, conversation: Conversation, database_url: str
) -> AsyncIterator[Live]:
    """One worker for all the examples of a test. Afterwards it must still be alive and serving,
    and the invariants must hold for every task the examples left behind."""
    modules = (*settings.agent_modules, "tests.reliability.fuzz_agents")
    async with serving(replace(settings, agent_modules=modules)) as live:
        yield live
        await assert_still_serving(client, conversation, live, database_url)
        await check_invariants(database_url)


async def served(client: TaskClient, task_id: uuid.UUID, live: Live) -> Task:
    """Wait for the task to finish; fail at once, with the worker's own error, if it died."""
    run = live[1]
    for _ in range(300):
        if run.done():
            error = run.exception() if not run.cancelled() else "cancelled"
            raise AssertionError(f"the worker died: {error!r}")
        task = await client.get(task_id)
        if task.is_finished:
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} not finished within 15s")


async def assert_still_serving(
    client: TaskClient, conversation: Conversation, live: Live, database_url: str
) -> None:
    """The worker's poll loop is alive and runs a real task submitted now, and one inserted by
    plain SQL (so the reconciler is alive too)."""
    worker, run = live
    assert not run.done(), f"the worker died: {run.exception() if run.done() else ''}"
    task = await client.submit("echo", {"alive": True}, conversation_id=conversation.id)
    assert (await client.wait(task.id, timeout=15)).output == {"echo": {"alive": True}}
    by_sql = await db.value(
        database_url,
        "INSERT INTO tasks (conversation_id, agent_id, input, queue)"
        " VALUES ($1, 'echo', '[\"sql\"]', $2) RETURNING id",
        conversation.id,
        client.settings.queue,
    )
    [row] = await db.wait_final(database_url, [by_sql], timeout=15)
    assert row["status"] == "completed", dict(row)
    assert not run.done()
    runtime: WorkerRuntime = worker.ctx["tasklane"]
    # Nothing stays in flight. (A run leaves `in_flight` just after its finish commits, and a
    # duplicate doorbell the reconciler rang may still be missing its claim: allow a moment.)
    for _ in range(100):
        if runtime.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert runtime.in_flight == 0


# -- JSON values, odd on purpose ------------------------------------------------------------------

ODD_STRINGS = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\\u0000",
        "\\\\u0000",
        "\\\x00",
        "\ud800",
        "x\udfff",
        "\ud83d\ude00",  # a surrogate *pair* in a Python str is still two lone surrogates
        "😀",
        "\u2028\u2029",
        "\ufeff",
        "\U0010ffff",
        "'; DROP TABLE tasks; --",
        '"}]',
        "\\",
        "\r\n\t\x1b[31m",
    ]
)
# Text that is not valid UTF-8, as Python would hand it over from bytes read with
# surrogateescape: lone surrogates.
NON_UTF8 = st.binary(min_size=1, max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
HUGE_STRINGS = st.sampled_from([10_000, 200_000, 262_000, 300_000]).map(lambda n: "x" * n)
STRINGS = st.one_of(st.text(max_size=30), ODD_STRINGS, NON_UTF8, HUGE_STRINGS)

ODD_NUMBERS = st.sampled_from(
    [
        0,
        -0.0,
        1e300,
        -1e300,
        5e-324,
        1.7976931348623157e308,
        2**63,
        -(2**63) - 1,
        10**100,
        math.nan,
        math.inf,
        -math.inf,
        0.1,
        1 / 3,
    ]
)
# Python's int↔str limit is 4300 digits: around it (built lazily: their repr would raise).
HUGE_INTS = st.sampled_from([4000, 4299, 4300, 5000]).map(lambda digits: 10**digits)
NUMBERS = st.one_of(st.integers(), st.floats(), ODD_NUMBERS, HUGE_INTS)
NOT_JSON = st.one_of(
    st.binary(max_size=8),
    st.sets(st.integers(), max_size=3),
    st.just(Decimal("1.5")),
    st.just(object()),
    st.just(complex(1, 2)),
)
KEYS = st.one_of(STRINGS, st.integers(), st.booleans(), st.none(), st.floats(), st.just((1, 2)))


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"d": value}
    return value


DEEP = st.sampled_from([50, 200, 500, 900, 980, 1000, 1500, 20_000]).map(nested)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)


class Payload:
    """A drawn value with a repr that cannot fail (hypothesis prints every example it runs;
    a 20 000-deep list or a 5000-digit int has no printable repr)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        try:
            text = repr(self.value)
        except (ValueError, RecursionError) as exc:
            text = f"<{type(self.value).__name__}: {type(exc).__name__}>"
        return f"Payload({text[:300]})"


JSON_ISH = st.one_of(
    st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(KEYS, children, max_size=4),
        ),
        max_leaves=12,
    ),
    DEEP,
    NOT_JSON,
    st.lists(NOT_JSON, min_size=1, max_size=2),
).map(Payload)


def same_json(expected: Any, got: Any) -> bool:
    """`got` (read back from jsonb) is the JSON value `expected` was. jsonb keeps numbers as
    exact decimals, so a float comes back as the number its JSON text wrote (1e300 as the
    integer 10**300: the same JSON number); tuples are JSON arrays. Iterative: inputs nest
    deeper than Python's recursion limit."""
    stack = [(expected, got)]
    while stack:
        e, g = stack.pop()
        if isinstance(e, bool) or e is None or isinstance(e, str):
            if type(g) is not type(e) or g != e:
                return False
        elif isinstance(e, int | float):
            if isinstance(g, bool) or not isinstance(g, int | float) or _number(e) != _number(g):
                return False
        elif isinstance(e, list | tuple):
            if not isinstance(g, list) or len(g) != len(e):
                return False
            stack.extend(zip(e, g, strict=True))
        elif isinstance(e, dict):
            if not isinstance(g, dict) or g.keys() != e.keys():
                return False
            stack.extend((v, g[k]) for k, v in e.items())
        else:
            return False
    return True


def _number(value: int | float) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


async def count_tasks(database_url: str) -> int:
    return int(await db.value(database_url, "SELECT count(*) FROM tasks"))


# -- task input through the client ----------------------------------------------------------------


@fuzz()
@given(payload=JSON_ISH)
async def test_any_input_through_the_client_is_refused_clearly_or_echoed_exactly(
    payload: Payload,
    client: TaskClient,
    conversation: Conversation,
    live_worker: Live,
    database_url: str,
) -> None:
    value = payload.value
    before = await count_tasks(database_url)
    refused: InvalidInputError | None = None
    try:
        task = await client.submit("echo", value, conversation_id=conversation.id)
    except InvalidInputError as exc:
        refused = exc
    if refused is not None:
        assert str(refused), "an error that explains itself"
        assert await count_tasks(database_url) == before, "a refused input wrote something"
        return
    done = await served(client, task.id, live_worker)
    assert done.status is TaskStatus.COMPLETED, (done.status, done.error)
    assert isinstance(done.output, dict)
    assert same_json(value, done.output["echo"]), "the echo differs from the input"


async def test_the_client_edge_cases_by_name(
    client: TaskClient, conversation: Conversation, live_worker: Live
) -> None:
    refused = {
        "nested too deeply": nested(1000),
        "digits": {"n": 10**5000},  # over Python's int/str limit
        "over the limit": "x" * (256 * 1024),
        "Out of range float": [1, math.nan],
        "object keys are strings": {0: None, "0": 1},  # would be stored as one key
        "lone surrogate": {"k": "\udc80"},
        "NUL character": {"k": "a\x00b"},
    }
    for reason, value in refused.items():
        with pytest.raises(InvalidInputError, match=reason):
            await client.submit("echo", value, conversation_id=conversation.id)
    echoed = [nested(500), {"n": 10**4000}, "x" * 262_000, {"k": 1e300}, {"\\u0000": "\\"}]
    for value in echoed:
        task = await client.submit("echo", value, conversation_id=conversation.id)
        done = await served(client, task.id, live_worker)
        assert done.status is TaskStatus.COMPLETED, done.error
        assert same_json(value, done.output["echo"])


# -- rows inserted with plain SQL ------------------------------------------------------------------

REGISTERED = frozenset(load_agents(("worker.demo_agents", "tests.agents")))


def storable(value: Any) -> str:
    """JSON text of a value jsonb accepts (no NUL, no lone surrogate, no NaN)."""
    return json.dumps(value, ensure_ascii=False)


JSONB_STRINGS = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
JSONB_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSONB_STRINGS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSONB_STRINGS, children),
    max_leaves=12,
)
# JSON texts Postgres stores happily but that are odd for Python: numbers beyond float range or
# over Python's 4300-digit int limit, nesting deeper than its recursion limit, duplicate keys,
# escaped surrogate pairs, scalars, megabytes.
ODD_JSONB = st.sampled_from(
    [
        "9" * 5000,
        "-" + "9" * 4301,
        "[" + "1" * 4300 + "]",
        "1e400",
        "-1E-400",
        "123456789012345678901234567890.123456789012345678901234567890",
        "-0",
        "0.0000",
        "[" * 2000 + "]" * 2000,
        '{"a":' * 1500 + "1" + "}" * 1500,
        '{"a": 1, "a": 2}',
        '"\\ud83d\\ude00 \\u00e9 \\\\u0000"',
        "null",
        "[]",
        "{}",
        '""',
        "true",
        '{"": {"": [null, {"": ""}]}}',
        '"' + "x" * 2_000_000 + '"',
        '{"k": [' + ",".join(["1e308"] * 1000) + "]}",
    ]
)
ODD_AGENT_IDS = st.one_of(
    st.sampled_from(
        [" echo", "echo ", "ECHO", "e\u0301cho", "'; DROP TABLE tasks; --", "x" * 2000, "ø" * 1000]
    ),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1),
).filter(lambda a: bool(a.strip()) and a not in REGISTERED)


def unique_key(text: str) -> str:
    return f"{text}:{uuid.uuid4()}"


@st.composite
def sql_rows(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "agent_id": draw(st.one_of(st.just("echo"), ODD_AGENT_IDS)),
        "input": draw(st.one_of(JSONB_VALUES.map(storable), ODD_JSONB)),
        "metadata": draw(
            st.sampled_from(["{}", "null", "[]", '"s"', "1", '{"k": [1e400]}', "9" * 5000])
        ),
        "max_attempts": draw(st.sampled_from([None, 1, 2**31 - 1])),
        "run_after": draw(st.sampled_from([None, "-infinity", "0001-01-01 00:00:00+00", "epoch"])),
        "own_parent": draw(st.booleans()),
        "idempotency_key": draw(st.one_of(st.none(), JSONB_STRINGS.map(unique_key))),
    }


class Row(dict[str, Any]):
    def __repr__(self) -> str:  # megabyte inputs: print their size, not their text
        short = {k: v if len(repr(v)) < 200 else f"<{len(v)} chars>" for k, v in self.items()}
        return repr(short)


async def insert_row(
    database_url: str, task_id: uuid.UUID, row: Row, settings: Settings, conversation: Conversation
) -> None:
    await db.query(
        database_url,
        "INSERT INTO tasks (id, conversation_id, queue, agent_id, input, metadata, max_attempts,"
        " run_after, idempotency_key, parent_task_id)"
        " VALUES ($1::uuid, $2, $3, $4, $5::text::jsonb, $6::text::jsonb, $7,"
        " COALESCE($8::text::timestamptz, now()), $9, CASE WHEN $10 THEN $1::uuid END)",
        task_id,
        conversation.id,
        settings.queue,
        row["agent_id"],
        row["input"],
        row["metadata"],
        row["max_attempts"],
        row["run_after"],
        row["idempotency_key"],
        row["own_parent"],
    )


@fuzz()
@given(row=sql_rows().map(Row))
async def test_rows_inserted_with_sql_run_or_fail_with_a_reason(
    row: Row,
    settings: Settings,
    conversation: Conversation,
    live_worker: Live,
    database_url: str,
) -> None:
    task_id = uuid.uuid4()
    # The CHECK constraints state the domain's rules for a task that may still run: a row that
    # breaks one is refused by name, and nothing is written.
    refused_by = set()
    if row["own_parent"]:
        refused_by.add("ck_tasks_not_its_own_parent")
    if row["max_attempts"] is not None and row["max_attempts"] > MAX_ATTEMPTS_LIMIT:
        refused_by.add("ck_tasks_max_attempts_range")
    try:
        check_agent_id(row["agent_id"])
    except InvalidInputError:
        refused_by.add("ck_tasks_agent_id_format")
    if refused_by:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await insert_row(database_url, task_id, row, settings, conversation)
        assert refused.value.constraint_name in refused_by, refused.value.constraint_name
        count = "SELECT count(*) FROM tasks WHERE id = $1"
        assert await db.value(database_url, count, task_id) == 0
        return
    await insert_row(database_url, task_id, row, settings, conversation)
    [done] = await db.wait_final(database_url, [task_id], timeout=20)
    error = done["error"] or ""
    if row["agent_id"] == "echo":
        if done["status"] == "completed":
            # Exactly what Python reads from the stored input: a number beyond a float's range
            # or precision is rounded on the way in (-1e-400 is read as -0.0), not by tasklane.
            assert same_json(done["input"], done["output"]["echo"]), "the echo differs"
        else:
            # Python cannot load every value jsonb holds: such a task fails saying why, at once
            # (not by losing its lease, which would take attempts × lease to say nothing).
            assert done["status"] == "failed", done["status"]
            assert "cannot be loaded" in error or "return value" in error, error
    else:
        assert done["status"] == "failed", done["status"]
        assert "unknown agent" in error, error
    assert done["attempts"] == 1, "a bad row is failed at its first run, not retried"
    assert not live_worker[1].done()


HUGE_INT_TEXT = "9" * 5000  # over Python's 4300-digit int/str limit
SQL_EDGE_CASES = [
    # agent, input and metadata as JSON text, the outcome, words of its reason
    ("echo", HUGE_INT_TEXT, "{}", "failed", "input cannot be loaded in Python: Exceeds the limit"),
    ("echo", "[" * 2000 + "]" * 2000, "{}", "failed", "input cannot be loaded in Python: nested"),
    ("echo", "{}", HUGE_INT_TEXT, "failed", "metadata cannot be loaded in Python"),
    ("echo", "1e400", "{}", "completed", None),  # jsonb writes the number out: an int for Python
    ("echo", '"' + "x" * 500_000 + '"', "null", "completed", None),
    ("echo", '"' + "x" * 2_000_000 + '"', "null", "failed", "TASKLANE_MAX_OUTPUT_BYTES"),
    ("no-such-agent", HUGE_INT_TEXT, "{}", "failed", "unknown agent 'no-such-agent'"),
]


async def test_sql_edge_cases_by_name(
    settings: Settings, conversation: Conversation, live_worker: Live, database_url: str
) -> None:
    ids = [
        await db.value(
            database_url,
            "INSERT INTO tasks (conversation_id, queue, agent_id, input, metadata)"
            " VALUES ($1, $2, $3, $4::text::jsonb, $5::text::jsonb) RETURNING id",
            conversation.id,
            settings.queue,
            agent_id,
            input_text,
            metadata_text,
        )
        for agent_id, input_text, metadata_text, _, _ in SQL_EDGE_CASES
    ]
    rows = {r["id"]: r for r in await db.wait_final(database_url, ids, timeout=20)}
    for task_id, (agent_id, text, _, status, reason) in zip(ids, SQL_EDGE_CASES, strict=True):
        row, case = rows[task_id], f"{agent_id} {text[:30]!r}"
        assert row["status"] == status, (case, row["error"])
        assert row["attempts"] == 1, case
        assert reason is None or reason in row["error"], (case, row["error"])


# -- junk in the arq queue -------------------------------------------------------------------------

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=6,
)
JOB_KEYS = ("f", "a", "k", "t", "et")
# Right keys, any values; right shape, any contents; and the real job with an odd argument.
MALFORMED_JOBS = st.dictionaries(st.sampled_from([*JOB_KEYS, "x"]), ANY_JSON, max_size=6)
SHAPED_JOBS = st.fixed_dictionaries(
    {
        "f": st.one_of(st.sampled_from(["run_task", "os.system", "", "startup"]), st.text()),
        "a": st.lists(ANY_JSON, max_size=3),
        "k": st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=3),
        "t": st.one_of(st.none(), st.integers()),
        "et": st.integers(),
    }
)
PICKLED = st.one_of(
    st.just({"f": "run_task", "a": [str(uuid.UUID(int=0))], "k": {}, "t": 1, "et": 1}),
    ANY_JSON,
).flatmap(lambda obj: st.integers(0, pickle.HIGHEST_PROTOCOL).map(lambda p: pickle.dumps(obj, p)))
JUNK_PAYLOADS = st.one_of(
    st.binary(max_size=64),
    PICKLED,
    MALFORMED_JOBS.map(serialize),
    SHAPED_JOBS.map(serialize),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
JOB_IDS = st.one_of(
    st.text(min_size=1, max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(min_size=1, max_size=20),
)
SCORES = st.one_of(st.just(1.0), st.floats(allow_nan=False, max_value=1e12))


class Junk(list[tuple[bytes, bytes | None, float]]):
    def __repr__(self) -> str:
        return "Junk(" + ", ".join(f"({i!r}, {p!r:.120}, {s!r})" for i, p, s in self) + ")"


JUNK = st.lists(
    st.tuples(JOB_IDS, st.one_of(st.none(), JUNK_PAYLOADS), SCORES), min_size=1, max_size=4
).map(Junk)


@fuzz()
@given(junk=JUNK)
async def test_junk_in_the_queue_never_stops_the_worker(
    junk: Junk,
    client: TaskClient,
    settings: Settings,
    conversation: Conversation,
    live_worker: Live,
) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        for job_id, payload, score in junk:
            member = uuid.uuid4().hex.encode() + job_id  # unique: examples never shadow each other
            if payload is not None:  # None: a queue entry without a job
                await redis.set(job_key_prefix.encode() + member, payload)
            await redis.zadd(settings.queue, {member: score})
    finally:
        await redis.aclose()
    task = await client.submit("echo", {"after": "junk"}, conversation_id=conversation.id)
    done = await served(client, task.id, live_worker)
    assert done.output == {"echo": {"after": "junk"}}


@pytest.mark.parametrize(
    ("member", "payload", "score"),
    [
        (
            b"\xff\xfe-not-utf8",
            serialize({"f": "run_task", "a": ["x"], "k": {}, "t": None, "et": 1}),
            1.0,
        ),
        (
            b"minus-inf",
            serialize({"f": "run_task", "a": ["x"], "k": {}, "t": None, "et": 1}),
            -math.inf,
        ),
        (
            b"far-future-et",
            serialize({"f": "run_task", "a": ["x"], "k": {}, "t": None, "et": 10**20}),
            1.0,
        ),
    ],
    ids=["name-not-utf8", "score-minus-inf", "enqueue-time-out-of-range"],
)
async def test_queue_entries_that_ended_arqs_poll_loop_are_discarded(
    member: bytes,
    payload: bytes,
    score: float,
    client: TaskClient,
    settings: Settings,
    conversation: Conversation,
    live_worker: Live,
) -> None:
    # Each of these raised inside arq's poll loop (UnicodeDecodeError, OverflowError,
    # ValueError from a datetime) and ended the worker process.
    member += uuid.uuid4().hex.encode()  # arq's in-progress keys are not per queue
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(job_key_prefix.encode() + member, payload)
        await redis.zadd(settings.queue, {member: score})
        task = await client.submit("echo", 1, conversation_id=conversation.id)
        assert (await served(client, task.id, live_worker)).output == {"echo": 1}

        async def score_of_junk() -> float | None:
            return await redis.zscore(settings.queue, member)  # type: ignore[no-any-return]

        await db.eventually(score_of_junk, lambda s: s is None, what="the junk entry removed")
        assert not live_worker[1].done()
    finally:
        await redis.aclose()


# -- random strings as task ids and agent ids ------------------------------------------------------

ODD_IDS = st.one_of(
    st.text(max_size=80),
    st.uuids().map(str),
    NON_UTF8,
    ODD_STRINGS,
    st.sampled_from(["None", "null", "0", "0" * 32, "-" * 36, "{}", "urn:uuid:", "x" * 10_000]),
    st.integers(),
    st.none(),
)


def id_variants(task_id: uuid.UUID) -> list[str]:
    """Spellings of one UUID that `uuid.UUID` accepts."""
    text = str(task_id)
    return [text, text.upper(), f"{{{text}}}", f"urn:uuid:{text}", task_id.hex, f"  {text}\n"]


def doorbell(raw: Any) -> bytes:
    return serialize({"f": "run_task", "a": [raw], "k": {}, "t": None, "et": 1})


@pytest.fixture
async def finished(client: TaskClient, conversation: Conversation, live_worker: Live) -> Task:
    task = await client.submit("echo", {"done": True}, conversation_id=conversation.id)
    return await served(client, task.id, live_worker)


@fuzz()
@given(raw=ODD_IDS, variant=st.integers(0, 5))
async def test_random_task_ids_get_a_clear_answer(
    raw: Any,
    variant: int,
    client: TaskClient,
    settings: Settings,
    conversation: Conversation,
    live_worker: Live,
    finished: Task,
) -> None:
    for value in (raw, id_variants(finished.id)[variant]):
        try:
            parsed: uuid.UUID | None = uuid.UUID(str(value).strip())
        except ValueError:
            parsed = None
        for operation in (client.get, client.cancel, client.retry, client.attempts):
            outcome: Any
            try:
                outcome = await operation(value)
            except (InvalidInputError, EntityNotFoundError) as exc:
                outcome = exc
            if parsed is None:
                assert isinstance(outcome, InvalidInputError), (operation, outcome)
            elif parsed == finished.id:
                assert not isinstance(outcome, Exception), (operation, outcome)
            else:
                assert isinstance(outcome, EntityNotFoundError | list), (operation, outcome)
        with contextlib.suppress(InvalidInputError, EntityNotFoundError):
            await client.submit("echo", 1, conversation_id=value)
            assert parsed == conversation.id
    # The finished task is untouched by all of that.
    assert await client.get(finished.id) == finished
    # The same strings as doorbells: logged and dropped; the worker serves the next task.
    redis = Redis.from_url(settings.redis_url)
    try:
        for value in (raw, id_variants(finished.id)[variant]):
            member = f"odd-id-{uuid.uuid4()}"
            await redis.set(job_key_prefix + member, doorbell(value))
            await redis.zadd(settings.queue, {member: 1})
    finally:
        await redis.aclose()
    task = await client.submit("echo", "next", conversation_id=conversation.id)
    assert (await served(client, task.id, live_worker)).output == {"echo": "next"}


AGENT_IDS = st.one_of(
    st.text(max_size=40),
    ODD_STRINGS,
    NON_UTF8,
    st.sampled_from([" ", "\t\n", "x" * 3000, "é" * 2000, "x" * 100_000, "echo\x00"]),
    st.binary(min_size=1500, max_size=1500).map(bytes.hex),  # long and incompressible
    st.integers(),
    st.none(),
).filter(lambda a: a not in REGISTERED)


@fuzz()
@given(agent_id=AGENT_IDS)
async def test_random_agent_ids_are_refused_or_fail_naming_the_agent(
    agent_id: Any,
    client: TaskClient,
    conversation: Conversation,
    live_worker: Live,
    database_url: str,
) -> None:
    before = await count_tasks(database_url)
    refused: InvalidInputError | None = None
    try:
        task = await client.submit(agent_id, {"x": 1}, conversation_id=conversation.id)
    except InvalidInputError as exc:
        refused = exc
    if refused is not None:
        assert str(refused)
        assert await count_tasks(database_url) == before, "a refused agent id wrote something"
        return
    done = await served(client, task.id, live_worker)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None
    assert done.error.startswith(f"unknown agent {agent_id!r:.60}"), done.error[:200]
    assert done.attempts == 1


IDEMPOTENCY_KEYS = st.one_of(
    st.text(max_size=40),
    ODD_STRINGS,
    NON_UTF8,
    st.binary(min_size=1500, max_size=1500).map(bytes.hex),
    st.integers(),
)


@fuzz()
@given(key=IDEMPOTENCY_KEYS)
async def test_random_idempotency_keys_are_refused_or_deduplicate(
    key: Any, client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    before = await count_tasks(database_url)
    key = f"{uuid.uuid4()}{key}" if isinstance(key, str) and key.strip() else key
    outcomes: list[Any] = []
    for _ in range(2):
        try:
            task = await client.submit(
                "echo", {"k": 1}, conversation_id=conversation.id, idempotency_key=key
            )
        except InvalidInputError as exc:
            outcomes.append(type(exc))
        else:
            outcomes.append(task.id)
    after = await count_tasks(database_url)
    if outcomes[0] is InvalidInputError:
        assert outcomes == [InvalidInputError] * 2
        assert after == before, "a refused key wrote something"
    else:
        assert outcomes[0] == outcomes[1], "the same key made two tasks"
        assert after == before + 1


# -- user-supplied filters -------------------------------------------------------------------------

ALLOWED_FILTERS = sorted(TaskRepository.filterable_fields)
FILTER_NAMES = st.one_of(
    st.sampled_from(ALLOWED_FILTERS),
    st.sampled_from(
        [
            *("input", "metadata", "output", "created_at", "version", "runs", "__class__"),
            *("__dict__", "_sa_instance_state", "metadata_", "id ", "ID", "status; DROP", ""),
        ]
    ),
    st.text(max_size=20),
    st.integers(),
    st.none(),
)
FILTER_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**31, -(2**31) - 1, 2**63, 10**30]),
    HUGE_INTS,
    st.floats(),
    STRINGS,
    st.uuids(),
    st.uuids().map(str),
    st.sampled_from(["pending", "failed", "echo", "tasklane", str(uuid.UUID(int=0))]),
    st.binary(max_size=8),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FILTER_VALUES = st.one_of(
    FILTER_SCALARS,
    st.lists(FILTER_SCALARS, max_size=4),
    st.tuples(FILTER_SCALARS),
    st.frozensets(st.integers() | st.text(max_size=5), max_size=3),
)


class Filters(dict[Any, Any]):
    def __repr__(self) -> str:
        return "Filters(" + repr(dict(self))[:600] + ")"


@fuzz()
@given(
    filters=st.dictionaries(FILTER_NAMES, FILTER_VALUES, max_size=3).map(Filters),
    page=st.one_of(st.integers(1, 3), st.integers(), st.sampled_from([2**62, 2**64])),
    page_size=st.one_of(st.integers(1, 50), st.integers(-5, 2000)),
)
async def test_user_filters_work_or_are_refused_before_any_sql(
    filters: Filters,
    page: int,
    page_size: int,
    engine: AsyncEngine,
    conversation: Conversation,
    some_tasks: list[Task],
) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    unknown = [name for name in filters if name not in TaskRepository.filterable_fields]
    uow = UnitOfWork(create_session_factory(engine))
    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with uow:
            try:
                found = await uow.tasks.find_paginated(
                    filters=filters, page=page, page_size=page_size
                )
            except InvalidInputError as exc:
                refused: InvalidInputError | None = exc
            else:
                refused = None
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    if isinstance(refused, InvalidFilterError):
        assert refused.field in {str(name) for name in unknown}
    if unknown:
        assert refused is not None, f"{unknown} accepted as filter fields"
        assert statements == [], "SQL was issued for an unknown filter field"
        if len(unknown) == len(filters) and 1 <= page_size <= 1000 and page >= 1:
            assert isinstance(refused, InvalidFilterError)
    elif refused is None:
        assert found.total >= len(found.items)
        assert all(t.conversation_id == conversation.id for t in found.items)


@pytest.fixture
async def some_tasks(client: TaskClient, conversation: Conversation) -> list[Task]:
    return [
        await client.submit("echo", {"i": i}, conversation_id=conversation.id) for i in range(3)
    ]


# -- bad subtasks spawned by a handler -------------------------------------------------------------


async def test_a_handler_spawning_a_bad_subtask_fails_with_the_reason(
    client: TaskClient, conversation: Conversation, live_worker: Live, database_url: str
) -> None:
    parents = {
        (child, wait): await client.submit(
            "t_fuzz_spawn",
            {"child": child, "wait": wait},
            conversation_id=conversation.id,
            max_attempts=1,  # the handler's error fails it at once
        )
        for child in sorted(BAD_CHILDREN)
        for wait in (True, False)
    }
    for (child, wait), parent in parents.items():
        done = await served(client, parent.id, live_worker)
        case = f"{child}, {'waiting' if wait else 'fire-and-forget'}: {done.error!r:.300}"
        assert done.status is TaskStatus.FAILED, case
        # Refused when spawned, so the run fails like any handler error; not found when the
        # result is written, the write failing and the run abandoned until its lease ran out.
        assert "SpawnRefused" in (done.error or ""), case
        assert await client.subtasks(parent.id) == [], case
    await check_invariants(database_url, task_ids=[p.id for p in parents.values()])
