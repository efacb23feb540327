"""Operator input: every argument error is one bounded line on stderr, never a traceback (exit 2
for usage, 1 for a bad id or --input); `tree` renders any depth the schema allows and caps its
breadth; --json documents stay valid JSON however deep.

Commands run in this process (fast enough for hypothesis), with services that do not listen:
an argument that passes parsing fails at the connection, with one line too.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from domain.entities import Conversation
from tests.integration.test_cli import OFFLINE
from tests.support import db
from tests.support.cli import Output, logging_restored, one_line, run_cli, use_settings
from worker.cli import MAX_ERROR_LINE
from worker.config import Settings

# A chain deeper than Python's recursion limit.
DEEP = 1200

# An error line is MAX_ERROR_LINE at most, plus where the usage is: " (see tasklane xyz --help)".
LONGEST_LINE = MAX_ERROR_LINE + 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    use_settings(monkeypatch, OFFLINE)
    with logging_restored():
        yield


def tasklane(capsys: pytest.CaptureFixture[str], *argv: str) -> Output:
    return run_cli(capsys, *argv)


def assert_usage_error(output: Output, *fragments: str) -> None:
    line = one_line(output)
    assert output.code == 2, output.explained
    assert len(line) <= LONGEST_LINE, output.explained
    assert "--help" in line, output.explained
    for fragment in fragments:
        assert fragment in line, output.explained
    assert output.stdout == ""


HUGE_NUMBER = "9" * 5000  # over Python's int/str limit of 4300 digits


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("prune", "--older-than", "99999999999d"), "at most 3650d"),
        (("prune", "--older-than", HUGE_NUMBER + "w"), "at most 3650d"),
        (("prune", "--older-than", "3651d"), "at most 3650d"),
        (("prune", "--older-than", "soon"), "expected a duration"),
        (("prune", "--older-than", "7d", "--batch-size", "10001"), "between 1 and 10000"),
        (("prune", "--older-than", "7d", "--batch-size", HUGE_NUMBER), "whole number"),
        (("prune", "--older-than", "7d", "--max-rate", "0"), "between 0.01 and 1e+06"),
        (("prune", "--older-than", "7d", "--max-rate", "nan"), "between 0.01 and 1e+06"),
        (("prune", "--older-than", "7d", "--max-rate", HUGE_NUMBER), "between 0.01 and 1e+06"),
        (("prune", "--older-than", "7d", "--max-rate", "fast"), "tasks per second"),
        (("list", "--limit", "1001"), "between 1 and 1000"),
        (("list", "--limit", "99999999999999999999999"), "between 1 and 1000"),
        (("list", "--limit", HUGE_NUMBER), "whole number"),
        (("list", "--limit", "0"), "between 1 and 1000"),
        (("list", "--status", "s" * 100_000), "expected one of"),
        (("worker", "--queue", ""), "must not be empty"),
        (("worker", "--queue", "a b"), "whitespace"),
        (("worker", "--queue", "q" * 201), "over the limit of 200"),
        (("worker", "--concurrency", "10001"), "at most 10000"),
        (("worker", "--concurrency", HUGE_NUMBER), "expected a whole number"),
        (("submit", "echo", "--wait", "--timeout", "nan"), "at most 86400 seconds"),
        (("submit", "echo", "--wait", "--timeout", "inf"), "at most 86400 seconds"),
        (("submit", "echo", "--wait", "--timeout", "1e300"), "at most 86400 seconds"),
        (("submit", "echo", "--wait", "--timeout", "-1"), "more than 0"),
        (("demo", "--n", "1001"), "between 1 and 1000"),
        (("demo", "--n", "99999999999"), "between 1 and 1000"),
        (("demo", "--timeout", "nan"), "at most 86400 seconds"),
        (
            ("tree", "4e75dfde-0f2f-4962-9580-841d0d971050", "--max-children", "0"),
            "between 1 and 10000",
        ),
        ((), "required: command"),
        (("frobnicate",), "invalid choice"),
        (("show",), "required: ID"),
        (("list", "--bogus", "x" * 100_000), "unrecognized arguments"),
    ],
    ids=lambda value: " ".join(value)[:40] if isinstance(value, tuple) else None,
)
def test_an_argument_error_is_one_bounded_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], says: str
) -> None:
    assert_usage_error(tasklane(capsys, *args), says)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("TASKLANE_CONCURRENCY", "10001", "at most 10000"),
        ("TASKLANE_CONCURRENCY", HUGE_NUMBER, "expected a whole number"),
        ("TASKLANE_QUEUE", "q" * 201, "over the limit of 200"),
    ],
    ids=["concurrency", "huge concurrency", "long queue"],
)
def test_a_setting_out_of_bounds_is_one_bounded_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    says: str,
) -> None:
    """The same rules as the options that override them (`worker --concurrency`, `--queue`)."""
    monkeypatch.setenv(variable, value)
    output = tasklane(capsys, "stats")
    assert output.code == 2
    line = one_line(output)
    assert f"{variable}: " in line
    assert says in line
    assert len(line) <= LONGEST_LINE


@pytest.mark.parametrize("command", ["show", "tree", "cancel", "retry"])
def test_a_bad_id_is_one_bounded_line(capsys: pytest.CaptureFixture[str], command: str) -> None:
    output = tasklane(capsys, command, "f" * 100_000)
    assert output.code == 1
    assert "not a task id" in one_line(output)
    assert len(output.stderr) <= LONGEST_LINE


def test_input_nested_too_deeply_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    output = tasklane(capsys, "submit", "echo", "--input", "[" * 100_000 + "]" * 100_000)
    assert output.code == 1
    assert "--input is not valid JSON: it is nested too deeply" in one_line(output)


VALUES = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")).filter(
    lambda text: not text.startswith("-")  # an option of its own (--help among them)
)
OPTIONS = {
    "submit": ["--input", "--conversation", "--idempotency-key", "--timeout"],
    "show": [],
    "list": ["--agent", "--status", "--conversation", "--limit"],
    "tree": ["--max-children"],
    "cancel": [],
    "retry": [],
    "prune": ["--older-than", "--status", "--batch-size"],
    "worker": ["--queue", "--concurrency"],
    "demo": ["--n", "--timeout"],
}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    if command in {"submit", "show", "tree", "cancel", "retry"}:
        argv.append(draw(st.one_of(VALUES, st.uuids().map(str))))
    options = OPTIONS[command]
    for option in draw(st.lists(st.sampled_from(options), unique=True)) if options else []:
        argv += [option, draw(VALUES)]
    if command == "prune" and "--older-than" not in argv:
        argv += ["--older-than", draw(st.sampled_from(["7d", "0s", "1d12h"]))]
    return argv


@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=command_lines())
def test_any_arguments_get_one_line_never_a_traceback(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Parsing refuses them (exit 2) or the command fails at the unreachable services (exit 1):
    either way one line on stderr and nothing on stdout."""
    output = tasklane(capsys, *argv)
    assert output.code in (1, 2), output.explained
    line = one_line(output)
    assert len(line) <= LONGEST_LINE, output.explained
    assert output.stdout == "", output.explained


# -- tree: any depth, bounded breadth -------------------------------------------------------------


async def insert_tree(
    settings: Settings, conversation: Conversation, parents: list[int | None]
) -> list[uuid.UUID]:
    """Tasks whose parents are given by index (None: a root), inserted in one statement."""
    ids = [uuid.uuid4() for _ in parents]
    await db.query(
        settings.database_url,
        "INSERT INTO tasks (id, conversation_id, agent_id, parent_task_id, queue, created_at)"
        " SELECT id, $1, 'echo', parent, $2, now() + n * interval '1 microsecond'"
        " FROM unnest($3::uuid[], $4::uuid[]) WITH ORDINALITY AS t(id, parent, n)",
        conversation.id,
        settings.queue,
        ids,
        [None if p is None else ids[p] for p in parents],
    )
    return ids


def depth_of(document: dict[str, Any]) -> int:
    depth = 0
    while document["children"]:
        (document,) = document["children"]
        depth += 1
    return depth


async def test_tree_renders_the_deepest_tree_the_query_returns(
    settings: Settings,
    conversation: Conversation,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, settings)
    chain = await insert_tree(settings, conversation, [None, *range(DEEP)])

    text = await asyncio.to_thread(tasklane, capsys, "tree", str(chain[0]))
    assert text.code == 0, text.explained[:2000]
    lines = text.stdout.splitlines()
    assert len(lines) == DEEP + 1  # any depth: the walk has no cap (a parent loop stops it)
    assert lines[1].startswith("└─ echo")
    assert f"[depth {DEEP}] echo" in lines[-1]
    assert str(chain[DEEP]) in lines[-1]
    assert max(len(line) for line in lines) < 400  # guides stop growing past a depth

    document = await asyncio.to_thread(tasklane, capsys, "tree", str(chain[0]), "--json")
    assert document.code == 0, document.explained[:2000]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10 * DEEP)  # json.loads recurses too
    try:
        tree = json.loads(document.stdout)
    finally:
        sys.setrecursionlimit(limit)
    assert depth_of(tree) == DEEP


async def test_tree_caps_the_children_it_shows_per_task(
    settings: Settings,
    conversation: Conversation,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, settings)
    # a root with 120 children; its first child has 3 children of its own
    ids = await insert_tree(settings, conversation, [None, *[0] * 120, 1, 1, 1])
    root, first = ids[0], ids[1]

    text = (await asyncio.to_thread(tasklane, capsys, "tree", str(root))).stdout.splitlines()
    assert len(text) == 1 + 50 + 3 + 1  # the root, 50 children, the first one's 3, "… 70 more"
    assert text[1].startswith("├─ echo")
    assert str(first) in text[1]
    assert [line[:12] for line in text[2:5]] == ["│  ├─ echo  ", "│  ├─ echo  ", "│  └─ echo  "]
    assert text[-1].rstrip() == "└─ … 70 more"

    capped = await asyncio.to_thread(tasklane, capsys, "tree", str(root), "--max-children", "2")
    assert capped.stdout.splitlines()[-1].rstrip() == "└─ … 118 more"
    assert "… 1 more" in capped.stdout  # the first child's third

    document = json.loads(
        (await asyncio.to_thread(tasklane, capsys, "tree", str(root), "--json")).stdout
    )
    assert len(document["children"]) == 120  # --json has them all
