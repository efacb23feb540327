"""`stats` says which counts are estimates: `≈` before each in text, the names in --json."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.cli_render import stats_json, stats_text
from worker.operator import Stats

NOW = datetime(2026, 12, 4, tzinfo=UTC)


def stats(**estimated: object) -> Stats:
    values: dict[str, object] = {
        "by_status_estimated": [],
        "by_agent_estimated": {},
        "pending_not_due_estimated": False,
        "finished_last_minute_estimated": False,
        "agents_truncated": False,
        **estimated,
    }
    counts = {"pending": 3, "running": 0, "waiting": 0, "completed": 12_345, "failed": 1}
    counts["cancelled"] = 0
    return Stats(
        by_status=counts,
        by_agent={"echo": counts},
        total=sum(counts.values()),
        oldest_pending_seconds=None,
        pending_not_due=0,
        finished_last_minute=0,
        finished_last_minute_by_status={},
        workers=[],
        now=NOW,
        **values,  # type: ignore[arg-type]
    )


def test_exact_counts_print_plain() -> None:
    text = stats_text(stats())
    assert "≈" not in text
    assert "12345" in text


def test_estimated_counts_are_marked_and_explained() -> None:
    s = stats(
        by_status_estimated=["completed"],
        by_agent_estimated={"echo": ["completed"]},
        agents_truncated=True,
    )
    text = stats_text(s)
    assert text.count("≈12345") == 2  # the agent's row and the total
    assert "≈12349" in text  # the totals that include an estimate
    assert "planner's estimate" in text
    assert "only the first 1 agents are listed" in text
    document = stats_json(s)
    assert document["by_status_estimated"] == ["completed"]
    assert document["by_agent_estimated"] == {"echo": ["completed"]}
    assert document["count_cap"] == 10_000
    assert document["agents_truncated"] is True
