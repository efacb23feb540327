"""The dashboard's pages as JSON documents: the `/api/…` twins of the pages.

Where the CLI has a `--json` shape the document is that shape (`list`, `show`, `tree`, the
worker objects of `stats`); the others follow the same conventions: ids and times as strings,
durations in seconds, secrets redacted in the data.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from persistence.repositories.audit_repository import AuditEntry
from persistence.repositories.dashboard_repository import AgentLine, Overview, WorkerLine
from worker.cli_render import _plain


def overview_json(overview: Overview) -> dict[str, Any]:
    return {
        "now": _plain(overview.now),
        "by_status": {s: c.value for s, c in overview.counts.items()},
        "approximate": [s for s, c in overview.counts.items() if c.approximate],
        "total": sum(c.value for c in overview.counts.values()),
        "runs_per_minute": [
            {"minute": _plain(r["minute"]), "outcome": r["outcome"], "runs": r["runs"]}
            for r in overview.per_minute
        ],
        "queue_lag_seconds": {q: round(s, 3) for q, s in overview.queue_lag.items()},
        "live_workers": overview.live_workers,
        "slots_in_use": overview.slots_in_use,
        "failed_last_hour": overview.failed_last_hour,
        "rescued_last_hour": overview.rescued_last_hour,
    }


def agent_json(line: AgentLine) -> dict[str, Any]:
    counts = {
        "due": line.due,
        "scheduled": line.scheduled,
        "running": line.running,
        "waiting": line.waiting,
    }
    rate = line.failure_rate
    return {
        "agent_id": line.agent_id,
        "queues": line.queues,
        **{name: c.value for name, c in counts.items()},
        "approximate": [name for name, c in counts.items() if c.approximate],
        "oldest_due_seconds": (
            None if line.oldest_due_seconds is None else round(line.oldest_due_seconds, 3)
        ),
        "finished_last_hour": line.finished_last_hour,
        "failed_last_hour": line.failed_last_hour,
        "failure_rate": None if rate is None else round(rate, 4),
    }


def queues_json(overview: Overview) -> dict[str, Any]:
    return {
        "queues": {q: {"lag_seconds": round(s, 3)} for q, s in overview.queue_lag.items()},
        "agents": [agent_json(a) for a in overview.agents],
        "now": _plain(overview.now),
    }


def worker_line_json(line: WorkerLine) -> dict[str, Any]:
    document = {k: _plain(v) for k, v in asdict(line).items()}
    document["last_seen_seconds_ago"] = round(document.pop("last_seen_seconds"), 3)
    return document


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {k: _plain(v) for k, v in asdict(entry).items()}
