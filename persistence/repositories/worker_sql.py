"""The statements on `workers` that readers share (the CLI reads them without the ORM)."""

from __future__ import annotations

from persistence.sql import Sql

# A worker is live when it refreshed its row within this many seconds (by the database clock).
LIVE_WITHIN_SECONDS = 30.0

LIVE = Sql("""
SELECT id, hostname, pid, queue, agents, started_at, last_seen_at, abandoned_handlers
FROM workers
WHERE last_seen_at > now() - make_interval(secs => :within_seconds)
  AND (CAST(:queue AS text) IS NULL OR queue = CAST(:queue AS text))
ORDER BY started_at, id
""")
