"""How the CLI prints: one JSON document with `--json`, aligned readable text otherwise.

A task in JSON is an object whose keys are the `tasks` columns, in table order: ids as strings,
timestamps in ISO-8601. Readable output shows times in UTC with how long ago they were (by the
database clock, like every other time decision in tasklane), and durations in short units.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.entities import TaskAttempt, WorkerInfo
from domain.value_objects import TaskStatus
from worker.cli_format import duration, first_line
from worker.redaction import redact, redact_text

if TYPE_CHECKING:  # `tasklane health --live`, a probe, renders without loading the drivers
    from persistence.repositories.report_repository import TaskRow, TreeNode
    from worker.health import HealthReport
    from worker.operator import ActionResult, PruneResult, Stats, TaskReport, Tree

NONE = "—"
# `tree`: how many levels of guides are drawn (deeper tasks are labelled with their depth).
MAX_DRAWN_DEPTH = 30
# JSON deeper than this is not indented further (indentation would grow quadratically; the
# document stays valid JSON).
MAX_INDENT_LEVEL = 30

# -- JSON -----------------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(document: Any) -> str:
    """`document` as JSON text, indented by 2, like `json.dumps(…, indent=2)`."""
    return _encode(document, indent=2)


def _encode(document: Any, indent: int | None) -> str:
    """JSON text built iteratively: a task tree or a task's input may nest deeper than
    Python's recursion limit, and json's encoder recurses. Without `indent`, one line with
    json's default separators."""
    parts: list[str] = []
    # What is left to write, last first: literal text, or (a value, its nesting level).
    stack: list[str | tuple[Any, int]] = [(document, 0)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        value, level = item
        if not isinstance(value, _JSON_TYPES):
            value = _default(value)  # a set becomes a list, indented like one
        if isinstance(value, dict) and value:
            entries = [(_key(k) + ": ", v) for k, v in value.items()]
            opening, closing = "{", "}"
        elif isinstance(value, list | tuple) and value:
            entries = [("", v) for v in value]
            opening, closing = "[", "]"
        elif isinstance(value, str):
            parts.append(_string(value))
            continue
        else:
            parts.append(json.dumps(value, default=_default, ensure_ascii=False))
            continue
        parts.append(opening)
        stack.append(_newline(indent, level) + closing)
        separator = ", " if indent is None else ","
        for i in range(len(entries) - 1, -1, -1):
            label, child = entries[i]
            stack.append((child, level + 1))
            stack.append((separator if i else "") + _newline(indent, level + 1) + label)
    return "".join(parts)


def _newline(indent: int | None, level: int) -> str:
    return "" if indent is None else "\n" + " " * (indent * min(level, MAX_INDENT_LEVEL))


_string = json.encoder.encode_basestring
_JSON_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


def _key(key: Any) -> str:
    """An object key as json writes it (non-string keys become strings)."""
    if isinstance(key, str):
        return _string(key)
    if key is None or isinstance(key, bool | int | float):
        return _string(json.dumps(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _plain(value: Any) -> Any:
    """`value` with ids and timestamps as strings (so a document compares equal to its JSON)."""
    return json.loads(json.dumps(value, default=_default))


def plain(value: Any) -> Any:
    """A document of rows (flow limits, pauses) as JSON values."""
    return _plain(value)


def task_json(row: TaskRow) -> dict[str, Any]:
    """Every column of the row (it holds them all: `SELECT *`)."""
    return {column: _plain(value) for column, value in row.items()}


def attempt_json(attempt: TaskAttempt) -> dict[str, Any]:
    return {k: _plain(v) for k, v in asdict(attempt).items()}


def show_json(report: TaskReport) -> dict[str, Any]:
    return {
        **task_json(report.row),
        "history": [attempt_json(a) for a in report.history],
        "reason": report.reason,
    }


def tree_json(tree: Tree) -> dict[str, Any]:
    """The root task with a `children` array, recursively (children in creation order)."""
    documents: dict[Any, dict[str, Any]] = {}
    root: dict[str, Any] | None = None
    for node in tree.nodes:
        document = {**task_json(node.row), "children": []}
        documents[node.row["id"]] = document
        parent = documents.get(node.row["parent_task_id"])
        if node.depth == 0 or root is None:
            root = document
        elif parent is not None:
            parent["children"].append(document)
    assert root is not None
    return root


def stats_json(stats: Stats) -> dict[str, Any]:
    return {
        "by_status": stats.by_status,
        "by_agent": stats.by_agent,
        "total": stats.total,
        "oldest_pending_seconds": (
            None if stats.oldest_pending_seconds is None else round(stats.oldest_pending_seconds, 3)
        ),
        "pending_not_due": stats.pending_not_due,
        "finished_last_minute": stats.finished_last_minute,
        "finished_last_minute_by_status": stats.finished_last_minute_by_status,
        "live_workers": stats.live_workers,
        "workers": [worker_json(w, stats.now) for w in stats.workers],
        "limits": [{k: _plain(v) for k, v in limit.items()} for limit in stats.limits],
        "pauses": [{k: _plain(v) for k, v in pause.items()} for pause in stats.pauses],
        "now": _plain(stats.now),
        # Counts past count_cap are the planner's estimates; these name them.
        "count_cap": stats.count_cap,
        "by_status_estimated": stats.by_status_estimated,
        "by_agent_estimated": stats.by_agent_estimated,
        "pending_not_due_estimated": stats.pending_not_due_estimated,
        "finished_last_minute_estimated": stats.finished_last_minute_estimated,
        "agents_truncated": stats.agents_truncated,
    }


def worker_json(worker: WorkerInfo, now: datetime) -> dict[str, Any]:
    return {
        **{k: _plain(v) for k, v in asdict(worker).items()},
        "last_seen_seconds_ago": round(max(0.0, (now - worker.last_seen_at).total_seconds()), 3),
    }


def prune_json(result: PruneResult) -> dict[str, Any]:
    return {
        "dry_run": result.dry_run,
        "cutoff": _plain(result.cutoff),
        "statuses": [s.value for s in result.statuses],
        "matched": result.matched,
        "matched_estimated": result.matched_estimated,
        "deleted": result.deleted,
        "batches": result.batches,
        "max_rate": result.max_rate,
    }


def health_json(report: HealthReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in report.checks},
    }


# -- readable: building blocks --------------------------------------------------------------------


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(headers)] if headers else []
    all_rows += [list(r) for r in rows]
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for r in all_rows:
        cells = [c.ljust(widths[i]) for i, c in enumerate(r[:-1])] + [r[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def when(value: datetime | None, now: datetime) -> str:
    """`2026-01-02 03:04:05 UTC (12s ago)`."""
    if value is None:
        return NONE
    stamp = value.astimezone(tz=now.tzinfo).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} UTC ({relative(value, now)})"


def relative(value: datetime | None, now: datetime) -> str:
    if value is None:
        return NONE
    delta = (now - value).total_seconds()
    if abs(delta) < 0.5:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def compact(value: Any, limit: int | None = None) -> str:
    """`value` as one line of JSON, secrets redacted (before it is cut to `limit`: a cut could
    hide what marks a secret)."""
    if value is None:
        return NONE
    text = _encode(redact(value), indent=None)
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def _short(text: str | None, limit: int = 60) -> str:
    """The first line of `text`, secrets redacted, cut to `limit`."""
    return first_line(redact_text(text), limit) if text else NONE


def took(row: TaskRow, now: datetime) -> str:
    """Created → finished for a finished task; the age so far (with a +) otherwise."""
    created: datetime = row["created_at"]
    if row["completed_at"] is not None:
        return duration(row["completed_at"] - created)
    return duration(now - created) + "+"


def _attempts(row: TaskRow) -> str:
    limit = row["max_attempts"]
    return f"{row['attempts']}/{limit}" if limit is not None else str(row["attempts"])


# -- readable: commands ---------------------------------------------------------------------------


def task_block(row: TaskRow, now: datetime, reason: str | None = None) -> str:
    fields: list[tuple[str, str]] = [
        ("task", str(row["id"])),
        ("agent", row["agent_id"]),
        ("status", row["status"]),
    ]
    if reason:
        fields.append(("reason", reason))
    fields += [
        ("queue", row["queue"]),
        ("conversation", str(row["conversation_id"])),
        ("parent", str(row["parent_task_id"] or NONE)),
        (
            "attempts",
            f"{_attempts(row)} (runs {row['runs']}, step {row['step']})",
        ),
        ("created", when(row["created_at"], now)),
        ("run after", when(row["run_after"], now)),
        ("started", when(row["started_at"], now)),
        ("finished", when(row["completed_at"], now)),
        ("took", took(row, now)),
        ("worker", row["worker_id"] or NONE),
        ("lease expires", when(row["lease_expires_at"], now)),
        ("idempotency key", row["idempotency_key"] or NONE),
        ("input", compact(row["input"])),
        ("output", compact(row["output"])),
        ("error", row["error"] or NONE),
        ("metadata", compact(row["metadata"])),
    ]
    return table(None, [(name, value) for name, value in fields])


def show_text(report: TaskReport) -> str:
    parts = [task_block(report.row, report.now, report.reason or None), ""]
    if not report.history:
        parts.append("history: no runs yet")
        return "\n".join(parts)
    parts.append(f"history ({len(report.history)} run{'s' if len(report.history) != 1 else ''})")
    rows = []
    for a in report.history:
        end = a.finished_at or report.now
        rows.append(
            [
                str(a.run),
                str(a.attempt),
                a.outcome.value if a.outcome else "running",
                relative(a.started_at, report.now),
                duration(end - a.started_at) + ("" if a.finished_at else "+"),
                a.worker_id or NONE,
                _short(a.error, 80),
            ]
        )
    headers = ["RUN", "ATTEMPT", "OUTCOME", "STARTED", "DURATION", "WORKER", "ERROR"]
    parts.append(table(headers, rows, indent="  "))
    return "\n".join(parts)


def waits_for(row: Mapping[str, Any], now: datetime) -> str:
    """What a waiting task waits for: its unfinished subtasks, signal names, a deadline."""
    parts = []
    if row.get("open_children"):
        parts.append(f"{row['open_children']} subtask(s)")
    if row.get("wait_signals"):
        parts.append("signal " + " or ".join(row["wait_signals"]))
    deadline = row.get("wait_deadline")
    if deadline is not None:
        when = relative(deadline, now)
        parts.append(f"timeout {when}" if row.get("wait_signals") else f"timer, wakes {when}")
    return ", ".join(parts) or "its subtasks"


def event_text(event: Mapping[str, Any]) -> str:
    """One line of `show --follow`."""
    progress = event.get("progress")
    said = ""
    if isinstance(progress, dict):
        fraction = progress.get("fraction")
        share = f"{fraction:.0%} " if isinstance(fraction, int | float) else ""
        said = f"{share}{progress.get('message') or ''}".strip()
    if event.get("event") == "progress":
        return f"progress  {said}"
    line = f"{event['status']:<9} attempts {event['attempts']}, run {event['runs']}"
    line += f", step {event['step']}" if event.get("step") else ""
    if event.get("woke_by"):
        line += f" (resumed by {event['woke_by']})"
    if said:
        line += f"  {said}"
    if event["status"] == "failed" and event.get("error"):
        line += f"  {_short(event['error'], 80)}"
    return line


def inbox_text(rows: Sequence[TaskRow], now: datetime) -> str:
    """`tasklane list --waiting`: each waiting task, what it waits for, since when."""
    if not rows:
        return "no waiting tasks"
    body = [
        [str(r["id"]), r["agent_id"], waits_for(r, now), relative(r["updated_at"], now)]
        for r in rows
    ]
    return table(["ID", "AGENT", "WAITS FOR", "SINCE"], body)


def list_text(rows: Sequence[TaskRow], now: datetime) -> str:
    if not rows:
        return "no tasks"
    headers = ["ID", "AGENT", "STATUS", "ATTEMPTS", "CREATED", "TOOK", "ERROR"]
    body = [
        [
            str(r["id"]),
            r["agent_id"],
            r["status"],
            _attempts(r),
            relative(r["created_at"], now),
            took(r, now),
            _short(r["error"], 50),
        ]
        for r in rows
    ]
    return table(headers, body)


def tree_text(tree: Tree, max_children: int) -> str:
    """An indented tree: status, how long each task took, how long its handler ran.

    Each task shows at most `max_children` children, then a "… N more" line. Built with a stack,
    not recursion: the tree may be as deep as the query allows. Guides are drawn for the first
    MAX_DRAWN_DEPTH levels; deeper tasks are labelled with their depth instead.
    """
    children: dict[Any, list[TreeNode]] = {}
    for node in tree.nodes[1:]:
        children.setdefault(node.row["parent_task_id"], []).append(node)
    lines: list[list[str]] = []
    # Lines left to write, last first: a task (or how many children are not shown), the guides
    # of its line, its branch and its depth.
    stack: list[tuple[TreeNode | int, str, str, int]] = [(tree.nodes[0], "", "", 0)]
    while stack:
        item, guides, branch, depth = stack.pop()
        label = guides + branch + (f"[depth {depth}] " if depth > MAX_DRAWN_DEPTH else "")
        if isinstance(item, int):
            lines.append([f"{label}… {item} more", "", "", "", "", ""])
            continue
        lines.append([label + item.row["agent_id"], *_tree_cells(item, tree.now)])
        kids: list[TreeNode | int] = [*children.get(item.row["id"], [])]
        if len(kids) > max_children:
            kids[max_children:] = [len(kids) - max_children]
        below = guides
        if 0 < depth < MAX_DRAWN_DEPTH:
            below += "   " if branch == _LAST else "│  "
        for i in range(len(kids) - 1, -1, -1):
            stack.append((kids[i], below, _LAST if i == len(kids) - 1 else _MIDDLE, depth + 1))
    return table(None, lines)


_LAST, _MIDDLE = "└─ ", "├─ "


def _tree_cells(node: TreeNode, now: datetime) -> list[str]:
    row = node.row
    runs = row["runs"]
    ran = f"ran {duration(node.run_seconds)}" + (f" in {runs} runs" if runs > 1 else "")
    result = (
        f"error: {_short(row['error'], 50)}"
        if row["error"] and row["status"] != TaskStatus.COMPLETED.value
        else compact(row["output"], 40)
        if row["output"] is not None
        else ""
    )
    return [
        str(row["id"]),
        row["status"],
        f"took {took(row, now)}",
        ran if runs else "not run",
        result,
    ]


ESTIMATED = "≈"  # before a count the planner estimated


def _count(n: int, estimated: bool) -> str:
    return f"{ESTIMATED}{n}" if estimated else str(n)


def stats_text(stats: Stats) -> str:
    statuses = [s.value for s in TaskStatus]
    headers = ["AGENT", *[s.upper() for s in statuses], "TOTAL"]
    rows = []
    for agent, counts in sorted(stats.by_agent.items()):
        guessed = stats.by_agent_estimated.get(agent, [])
        rows.append(
            [
                agent,
                *[_count(counts[s], s in guessed) for s in statuses],
                _count(sum(counts.values()), bool(guessed)),
            ]
        )
    rows.append(
        [
            "total",
            *[_count(stats.by_status[s], s in stats.by_status_estimated) for s in statuses],
            _count(stats.total, bool(stats.by_status_estimated)),
        ]
    )
    oldest = (
        NONE
        if stats.oldest_pending_seconds is None
        else f"{duration(stats.oldest_pending_seconds)} (due and not yet claimed)"
    )
    finished = ", ".join(f"{n} {s}" for s, n in stats.finished_last_minute_by_status.items())
    summary = [
        ("oldest pending", oldest),
        ("pending, not due yet", _count(stats.pending_not_due, stats.pending_not_due_estimated)),
        (
            "finished last minute",
            _count(stats.finished_last_minute, stats.finished_last_minute_estimated)
            + (f" ({finished})" if finished else ""),
        ),
        ("live workers", str(stats.live_workers)),
    ]
    parts = [table(headers, rows), "", table(None, summary)]
    if stats.agents_truncated:
        parts += ["", f"only the first {len(stats.by_agent)} agents are listed; totals count all"]
    if stats.estimated:
        parts += [
            "",
            f"{ESTIMATED}: past {stats.count_cap} tasks a count is the planner's estimate "
            "(counting exactly would read every row)",
        ]
    if stats.workers:
        worker_rows = [
            [
                w.id,
                w.queue,
                ",".join(w.agents),
                relative(w.started_at, stats.now),
                relative(w.last_seen_at, stats.now),
            ]
            for w in stats.workers
        ]
        parts += [
            "",
            table(["WORKER", "QUEUE", "AGENTS", "STARTED", "LAST SEEN"], worker_rows),
        ]
    if stats.limits or stats.pauses:
        parts += ["", limits_text(stats.limits, stats.pauses, stats.now)]
    return "\n".join(parts)


def _limit(value: Any, unit: str = "") -> str:
    return NONE if value is None else f"{value:g}{unit}" if isinstance(value, float) else str(value)


def limits_text(
    limits: Sequence[Mapping[str, Any]], pauses: Sequence[Mapping[str, Any]], now: datetime
) -> str:
    """Every agent's effective limits and use (overrides marked *), then the pauses."""
    rows = [
        [
            limit["queue"],
            limit["agent_id"],
            f"{limit['running']}/{_limit(limit['eff_concurrency'])}",
            _limit(limit["eff_per_key"]),
            _limit(limit["eff_rate"], "/s"),
            _limit(limit["eff_key_rate"], "/s"),
            f"{limit['key_source']}.{limit['key_field']}" if limit["key_source"] else NONE,
            limit["units"],
            f"* by {limit['overridden_by']}" if limit["overridden_by"] else "",
        ]
        for limit in limits
    ]
    parts = []
    if rows:
        headers = ["QUEUE", "AGENT", "RUNNING", "PER KEY", "RATE", "KEY RATE", "KEY", "UNITS", ""]
        parts.append(table(headers, rows))
    pause_rows = [
        [
            p["queue"],
            p["agent_id"] or "(all)",
            p["key"] or "(all)",
            f"{p['paused_by']}, {relative(p['paused_at'], now)}",
            relative(p["until"], now) if p["until"] is not None else "until resumed",
            first_line(p["reason"], 60),
        ]
        for p in pauses
    ]
    if pause_rows:
        headers = ["PAUSED", "AGENT", "KEY", "BY", "ENDS", "REASON"]
        parts.append(table(headers, pause_rows))
    return "\n\n".join(parts) if parts else "no limits and no pauses"


def action_text(result: ActionResult, now: datetime) -> str:
    return "\n".join([result.message, "", task_block(result.row, now)])


def prune_text(result: PruneResult, now: datetime) -> str:
    which = ", ".join(s.value for s in result.statuses)
    before = when(result.cutoff, now)
    if result.dry_run:
        matched = _count(result.matched, result.matched_estimated)
        note = " (estimated: past the count cap)" if result.matched_estimated else ""
        return f"would delete {matched} task(s) ({which}) finished before {before}{note}"
    batches = f" in {result.batches} batch{'es' if result.batches != 1 else ''}"
    return f"deleted {result.deleted} task(s) ({which}) finished before {before}{batches}"


def health_text(report: HealthReport) -> str:
    rows = [[c.name, "ok" if c.ok else "FAIL", c.detail] for c in report.checks]
    verdict = "healthy" if report.ok else "unhealthy"
    return table(None, rows) + "\n" + verdict


def submit_text(row: TaskRow) -> str:
    return (
        f"submitted task {row['id']} ({row['agent_id']}, {row['status']}) "
        f"in conversation {row['conversation_id']}"
    )
