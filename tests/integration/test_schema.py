"""The schema as other services see it: plain SQL, server defaults, constraints, cascades."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.entities import Conversation, Task
from domain.exceptions import InvalidInputError
from domain.value_objects import TaskStatus
from persistence.migrate import alembic_config
from persistence.schema import SCHEMA_REVISION, SchemaError, check_schema
from persistence.session import UnitOfWork
from tests.support.databases import plain_url_for


@pytest.fixture
async def pg(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection: how another service that knows only SQL talks to tasklane."""
    conn = await asyncpg.connect(plain_url_for(database))
    yield conn
    await conn.close()


@pytest.fixture
async def conv_id(pg: asyncpg.Connection) -> UUID:
    value = await pg.fetchval("INSERT INTO conversations (user_id) VALUES ('u1') RETURNING id")
    assert isinstance(value, UUID)
    return value


async def insert_task(pg: asyncpg.Connection, conv_id: UUID, **columns: object) -> UUID:
    names = ["conversation_id", "agent_id", "input", *columns]
    values = [conv_id, "echo", '{"x": 1}', *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    task_id = await pg.fetchval(
        f"INSERT INTO tasks ({', '.join(names)}) VALUES ({placeholders}) RETURNING id", *values
    )
    assert isinstance(task_id, UUID)
    return task_id


async def test_a_task_inserted_with_plain_sql_gets_every_default(
    pg: asyncpg.Connection, conv_id: UUID, uow: UnitOfWork
) -> None:
    await pg.execute(
        "INSERT INTO tasks (conversation_id, agent_id, input) VALUES ($1, 'echo', '{\"x\":1}')",
        conv_id,
    )
    row = await pg.fetchrow("SELECT *, now() AS db_now FROM tasks")
    assert row is not None
    assert isinstance(row["id"], UUID)
    assert row["status"] == "pending"
    assert row["queue"] == "tasklane"
    assert json.loads(row["input"]) == {"x": 1}
    assert json.loads(row["metadata"]) == {}
    assert row["output"] is None
    assert row["error"] is None
    assert (row["attempts"], row["runs"], row["step"], row["version"]) == (0, 0, 0, 1)
    assert row["max_attempts"] is None  # resolved at the first claim
    assert row["parent_task_id"] is None
    assert row["worker_id"] is None
    assert row["lease_expires_at"] is None
    assert row["idempotency_key"] is None
    assert row["started_at"] is None
    assert row["completed_at"] is None
    for column in ("created_at", "updated_at", "run_after", "dispatch_after"):
        assert row[column] is not None, column
        assert row[column].tzinfo is not None, column
        assert abs(row["db_now"] - row[column]) < timedelta(minutes=1), column
    assert row["run_after"] == row["created_at"]  # due at once
    assert row["dispatch_after"] == row["created_at"]  # the reconciler picks it up at once

    async with uow:  # and the repository reads it like any other task
        [found] = await uow.tasks.find_pending_for_agent("echo")
    assert found.id == row["id"]
    assert found.status is TaskStatus.PENDING
    assert found.input == {"x": 1}
    assert found.metadata == {}


# (agent, input, metadata, priority): 'by_tenant' is keyed by metadata.tenant, 'by_user' by
# input.user, 'plain' has no keyed limit.
FLOW_KEY_CASES: list[tuple[str, Any, dict[str, Any], int]] = [
    ("by_tenant", {"x": 1}, {"tenant": "acme"}, 0),
    ("by_tenant", {"x": 1}, {}, 5),  # the field is missing: ''
    ("by_tenant", {"x": 1}, {"tenant": 7}, -3),  # a number: its text
    ("by_user", {"user": "u1"}, {"tenant": "acme"}, 0),
    ("by_user", [1, 2], {}, 1000),  # the input is not an object: ''
    ("by_user", "text", {}, -1000),
    ("plain", {"user": "u1"}, {"tenant": "acme"}, 2),  # no keyed limit: ''
]


async def test_the_insert_computes_the_limit_key_and_due_rank_as_the_trigger_does(
    pg: asyncpg.Connection, conv_id: UUID, uow: UnitOfWork
) -> None:
    # tasklane's INSERT brings both columns, so the trigger does not fire for it (migration
    # 0012); a plain SQL copy of each row leaves them to the trigger. Both must agree.
    await pg.execute(
        "INSERT INTO flow_limits (queue, agent_id, declared_per_key, key_source, key_field)"
        " VALUES ('tasklane', 'by_tenant', 1, 'metadata', 'tenant'),"
        " ('tasklane', 'by_user', 1, 'input', 'user')"
    )
    later = datetime.now(UTC) + timedelta(hours=1)
    tasks = [
        Task(
            conversation_id=conv_id,
            agent_id=agent,
            input=input_,
            metadata=metadata,
            priority=priority,
            run_after=later if i % 2 else None,
        )
        for i, (agent, input_, metadata, priority) in enumerate(FLOW_KEY_CASES)
    ]
    async with uow:
        await uow.tasks.create_many(tasks)
        await uow.commit()
    for task in tasks:
        await pg.execute(
            "INSERT INTO tasks (conversation_id, agent_id, input, metadata, priority, run_after,"
            " idempotency_key) SELECT conversation_id, agent_id, input, metadata, priority,"
            " run_after, 'copy:' || id FROM tasks WHERE id = $1",
            task.id,
        )
    rows = await pg.fetch(
        "SELECT t.id, t.limit_key, t.due_rank, t.run_after, t.priority,"
        " c.limit_key AS copy_key, c.due_rank AS copy_rank"
        " FROM tasks AS t JOIN tasks AS c ON c.idempotency_key = 'copy:' || t.id"
    )
    by_id = {row["id"]: row for row in rows}
    assert [by_id[t.id]["limit_key"] for t in tasks] == ["acme", "", "7", "u1", "", "", ""]
    for row in rows:
        assert (row["limit_key"], row["due_rank"]) == (row["copy_key"], row["copy_rank"])
        assert row["due_rank"] == row["run_after"] - timedelta(minutes=row["priority"])


async def test_the_insert_needs_no_trigger_and_plain_sql_still_gets_one(
    pg: asyncpg.Connection, conv_id: UUID, uow: UnitOfWork
) -> None:
    # With the insert trigger off, tasklane's INSERT still writes complete rows (it brings both
    # columns, so with the trigger on, its WHEN keeps it from firing), and a plain SQL row that
    # leaves them out is refused: the trigger is what fills them for plain SQL.
    await pg.execute("ALTER TABLE tasks DISABLE TRIGGER tasklane_task_flow_on_insert")
    async with uow:
        [task] = await uow.tasks.create_many(
            [Task(conversation_id=conv_id, agent_id="echo", input={}, priority=3)]
        )
        await uow.commit()
    row = await pg.fetchrow(
        "SELECT limit_key, due_rank, run_after FROM tasks WHERE id = $1", task.id
    )
    assert row is not None
    assert (row["limit_key"], row["due_rank"]) == ("", row["run_after"] - timedelta(minutes=3))
    with pytest.raises(asyncpg.NotNullViolationError):
        await pg.execute(
            "INSERT INTO tasks (conversation_id, agent_id) VALUES ($1, 'echo')", conv_id
        )


async def test_every_constraint_holds_for_every_row(pg: asyncpg.Connection) -> None:
    # Migration 0011 adds its constraints NOT VALID and validates them after: none may be left
    # unvalidated (it would not be checked against rows written before it).
    unvalidated = await pg.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint"
        " WHERE NOT convalidated AND connamespace = 'public'::regnamespace"
    )
    assert [tuple(r) for r in unvalidated] == []


async def test_a_conversation_inserted_with_plain_sql_gets_its_defaults(
    pg: asyncpg.Connection,
) -> None:
    row = await pg.fetchrow("INSERT INTO conversations (user_id) VALUES ('u1') RETURNING *")
    assert row is not None
    assert isinstance(row["id"], UUID)
    assert row["title"] is None
    assert json.loads(row["metadata"]) == {}
    assert row["created_at"] is not None
    assert row["updated_at"] == row["created_at"]


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"status": "done"}, "ck_tasks_status"),
        ({"status": "PENDING"}, "ck_tasks_status"),
        ({"agent_id": "   "}, "ck_tasks_agent_id_format"),
        ({"agent_id": ""}, "ck_tasks_agent_id_format"),
        ({"agent_id": "\t"}, "ck_tasks_agent_id_format"),
        ({"attempts": 4, "max_attempts": 3}, "ck_tasks_attempts_within_max"),
        ({"attempts": -1}, "ck_tasks_attempts_not_negative"),
        ({"max_attempts": 0}, "ck_tasks_max_attempts_range"),
        ({"max_attempts": 10001}, "ck_tasks_max_attempts_range"),
    ],
    ids=[
        "status",
        "status-case",
        "blank-agent",
        "empty-agent",
        "tab-agent",
        "attempts>max",
        "neg",
        "max0",
        "max-over-limit",
    ],
)
async def test_check_constraints_reject_bad_rows(
    pg: asyncpg.Connection, conv_id: UUID, columns: dict[str, object], constraint: str
) -> None:
    if "agent_id" in columns:
        agent = columns.pop("agent_id")
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await pg.execute(
                "INSERT INTO tasks (conversation_id, agent_id) VALUES ($1, $2)", conv_id, agent
            )
    else:
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await insert_task(pg, conv_id, **columns)
    assert info.value.constraint_name == constraint
    assert await pg.fetchval("SELECT count(*) FROM tasks") == 0


async def test_attempts_may_reach_max_attempts(pg: asyncpg.Connection, conv_id: UUID) -> None:
    await insert_task(pg, conv_id, attempts=3, max_attempts=3)
    await insert_task(pg, conv_id, attempts=50)  # no max yet: unbounded until the first claim


async def test_the_repository_reports_a_check_violation_as_bad_input(
    uow: UnitOfWork, pg: asyncpg.Connection, conv_id: UUID
) -> None:
    task_id = await insert_task(pg, conv_id, max_attempts=2)
    async with uow:
        task = await uow.tasks.get_by_id(task_id)
        assert task is not None
        task.max_attempts = 0
        task.metadata = {"password": "hunter2"}
        with pytest.raises(InvalidInputError, match="ck_tasks_max_attempts_range") as info:
            await uow.tasks.update(task)
    # Postgres's DETAIL ("Failing row contains …") would copy the row into the message.
    assert "hunter2" not in str(info.value)
    assert "violates check constraint" in str(info.value)


async def test_not_null_columns(pg: asyncpg.Connection, conv_id: UUID) -> None:
    with pytest.raises(asyncpg.NotNullViolationError):
        await pg.execute("INSERT INTO tasks (agent_id) VALUES ('echo')")
    with pytest.raises(asyncpg.NotNullViolationError):
        await pg.execute("INSERT INTO tasks (conversation_id) VALUES ($1)", conv_id)


async def test_idempotency_keys_are_unique_but_may_be_null(
    pg: asyncpg.Connection, conv_id: UUID
) -> None:
    await insert_task(pg, conv_id)
    await insert_task(pg, conv_id)  # two NULL keys are fine
    await insert_task(pg, conv_id, idempotency_key="k")
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await insert_task(pg, conv_id, idempotency_key="k")
    assert info.value.constraint_name == "uq_tasks_idempotency_key"


async def test_attempt_outcomes_are_checked(pg: asyncpg.Connection, conv_id: UUID) -> None:
    task_id = await insert_task(pg, conv_id)
    await pg.execute(
        "INSERT INTO task_attempts (task_id, run, attempt, outcome) VALUES ($1, 1, 1, 'lost')",
        task_id,
    )
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await pg.execute(
            "INSERT INTO task_attempts (task_id, run, attempt, outcome) VALUES ($1, 2, 1, 'meh')",
            task_id,
        )
    assert info.value.constraint_name == "ck_task_attempts_outcome"


async def test_deleting_a_conversation_deletes_its_tasks_and_their_history(
    pg: asyncpg.Connection, conv_id: UUID
) -> None:
    other = await pg.fetchval("INSERT INTO conversations (user_id) VALUES ('u2') RETURNING id")
    parent = await insert_task(pg, conv_id)
    await insert_task(pg, conv_id, parent_task_id=parent)
    kept = await insert_task(pg, other)
    await pg.execute("INSERT INTO task_attempts (task_id, run, attempt) VALUES ($1, 1, 1)", parent)
    await pg.execute("DELETE FROM conversations WHERE id = $1", conv_id)
    assert await pg.fetchval("SELECT array_agg(id) FROM tasks") == [kept]
    assert await pg.fetchval("SELECT count(*) FROM task_attempts") == 0


async def test_deleting_a_parent_orphans_its_children(
    pg: asyncpg.Connection, conv_id: UUID
) -> None:
    parent = await insert_task(pg, conv_id)
    children = {await insert_task(pg, conv_id, parent_task_id=parent) for _ in range(2)}
    await pg.execute("DELETE FROM tasks WHERE id = $1", parent)
    rows = await pg.fetch("SELECT id, parent_task_id FROM tasks")
    assert {r["id"] for r in rows} == children
    assert {r["parent_task_id"] for r in rows} == {None}


async def test_the_hot_queries_have_their_indexes(pg: asyncpg.Connection) -> None:
    rows = await pg.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks'")
    indexes = {r["indexname"]: r["indexdef"] for r in rows}
    assert "WHERE (status = 'pending'::text)" in indexes["ix_tasks_pending_agent"]
    assert "(queue, agent_id, limit_key, due_rank)" in indexes["ix_tasks_pending_agent"]
    assert "WHERE (status = 'running'::text)" in indexes["ix_tasks_running_flow"]
    assert "(parent_task_id) WHERE" in indexes["ix_tasks_open_children"]
    assert "WHERE (status = 'running'::text)" in indexes["ix_tasks_running_lease"]
    assert "(parent_task_id, created_at)" in indexes["ix_tasks_parent"]
    # The operators' reads (report_repository, prune_repository; plans in test_scale.py).
    assert "(conversation_id, created_at, id)" in indexes["ix_tasks_by_conversation"]
    assert "(status, created_at, id)" in indexes["ix_tasks_by_status"]
    assert "(agent_id, status, created_at, id)" in indexes["ix_tasks_by_agent"]
    assert "(status, completed_at, id) WHERE" in indexes["ix_tasks_finished"]
    assert "ix_tasks_conversation" not in indexes  # replaced by the wider ones
    assert "ix_tasks_status_created" not in indexes
    assert not await pg.fetch(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE NOT i.indisvalid"
    )
    assert "(queue, GREATEST(run_after, dispatch_after))" in indexes["ix_tasks_dispatch"]
    assert "WHERE (status = 'pending'::text)" in indexes["ix_tasks_dispatch"]
    assert "UNIQUE" in indexes["uq_tasks_idempotency_key"]


async def test_tasks_have_extended_statistics_on_agent_and_status(pg: asyncpg.Connection) -> None:
    """Migrations 0008 and 0010 create them (SQLAlchemy cannot declare them): `stats` prints
    the planner's estimate of an agent's count in a status past its cap, read for every agent
    at once from their most-common-values list (kind 'm')."""
    row = await pg.fetchrow(
        "SELECT array_agg(a.attname ORDER BY a.attname) AS columns, s.stxkind::text[] AS kinds"
        " FROM pg_statistic_ext s"
        " JOIN pg_attribute a ON a.attrelid = s.stxrelid AND a.attnum = ANY(s.stxkeys)"
        " WHERE s.stxname = 'stx_tasks_agent_status' GROUP BY s.stxkind"
    )
    assert row["columns"] == ["agent_id", "status"]
    assert sorted(row["kinds"]) == ["d", "f", "m"]  # dependencies, ndistinct, mcv


async def test_schema_revision_is_the_alembic_head(
    database_url: str, pg: asyncpg.Connection
) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head == SCHEMA_REVISION
    assert await pg.fetchval("SELECT version_num FROM alembic_version") == head
    await check_schema(pg)


async def test_check_schema_refuses_an_older_revision(pg: asyncpg.Connection) -> None:
    await pg.execute("UPDATE alembic_version SET version_num = '0001'")
    with pytest.raises(SchemaError, match=f"at revision 0001, this code needs {SCHEMA_REVISION}"):
        await check_schema(pg)
    await pg.execute("DROP TABLE alembic_version")
    with pytest.raises(SchemaError, match="not migrated"):
        await check_schema(pg)


async def test_check_schema_accepts_a_newer_revision_that_only_extended(
    pg: asyncpg.Connection,
) -> None:
    """`migrate` ahead of a rolling deploy: workers of this code stay healthy on a schema that
    later migrations only extended (they leave oldest_code_revision as it is)."""
    await pg.execute("UPDATE alembic_version SET version_num = '9998'")
    assert await check_schema(pg) == "9998"
    # A later migration that breaks older code says so: then this code is refused.
    await pg.execute("UPDATE tasklane_schema SET oldest_code_revision = '9998'")
    with pytest.raises(SchemaError, match="no longer serves code written for"):
        await check_schema(pg)


async def test_entities_round_trip_through_the_schema(uow: UnitOfWork) -> None:
    async with uow:
        conv = await uow.conversations.create(Conversation(user_id="u1", metadata={"a": 1}))
        task = await uow.tasks.create(
            Task(conversation_id=conv.id, agent_id="echo", input=[1, "two", {"3": None}])
        )
        await uow.commit()
    async with uow:
        assert await uow.conversations.get_by_id(conv.id) == conv
        assert await uow.tasks.get_by_id(task.id) == task


AGENT_IDS = st.one_of(
    st.text(max_size=8),
    st.text(alphabet="ab_.:/@- \t\n0Zé", max_size=6),
    st.sampled_from(["echo", "-x", "_x", "x" * 200, "x" * 201, "a b", "a\u00a0b", "a\u2028"]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(agent_id=AGENT_IDS)
async def test_the_check_constraint_states_the_domains_rule_for_agent_ids(
    pg: asyncpg.Connection, conv_id: UUID, agent_id: str
) -> None:
    """Whatever the text, the database takes a pending task's agent id exactly when the domain
    does: no row can be claimed that the worker cannot load."""
    try:
        Task(conversation_id=conv_id, agent_id=agent_id)
        domain_takes = True
    except InvalidInputError:
        domain_takes = False
    if "\x00" in agent_id:  # text cannot hold NUL at all
        return
    try:
        async with pg.transaction():
            await pg.execute(
                "INSERT INTO tasks (conversation_id, agent_id) VALUES ($1, $2)", conv_id, agent_id
            )
            raise _Rollback
    except _Rollback:
        db_takes = True
    except asyncpg.CheckViolationError:
        db_takes = False
    assert db_takes == domain_takes, repr(agent_id)


class _Rollback(Exception):
    pass
