"""Flow control's statements: limits, the fair pick among keys, rate state, pauses.

The rules (README "Flow control", docs/architecture.md):
- An agent is *limited* on a queue when its `flow_limits` row has any effective limit. The plain
  claim (task_sql.CLAIM) never takes a limited agent's task; `TaskRepository.claim_limited` does,
  under that row's lock (`LOCK_LIMITS`), so concurrent claimers of one agent serialise and a
  limit holds across any number of workers.
- Nothing starts in a paused scope (`paused`): a queue, an agent of a queue, or one key.
- Among an agent's keys the next start goes to the key with the fewest running tasks, then the
  one that started least recently (round-robin), then the most due task.
- Rates are the generic cell rate algorithm without burst: a start is allowed once the
  theoretical arrival time (`tat`) has passed and pushes it `estimate / rate` seconds on.
"""

from __future__ import annotations

from persistence.sql import Sql

# `l` is a flow_limits row: does it limit anything?
LIMITED = (
    "(l.eff_concurrency IS NOT NULL OR l.eff_per_key IS NOT NULL"
    " OR l.eff_rate IS NOT NULL OR l.eff_key_rate IS NOT NULL)"
)


def limited(t: str) -> str:
    """SQL: task `t`'s agent is limited on its queue."""
    return (
        f"EXISTS (SELECT 1 FROM flow_limits AS l"
        f" WHERE l.queue = {t}.queue AND l.agent_id = {t}.agent_id AND {LIMITED})"
    )


def paused(t: str) -> str:
    """SQL: task `t` is in a paused scope (its queue, its agent, or its key)."""
    return (
        f"EXISTS (SELECT 1 FROM pauses AS ps WHERE ps.queue = {t}.queue"
        f" AND ps.agent_id IN ('', {t}.agent_id)"
        f" AND ps.key IN ('', {t}.limit_key) AND (ps.agent_id <> '' OR ps.key = '')"
        f" AND (ps.until IS NULL OR ps.until > now()))"
    )


# The agent's limits, its row locked until the claim commits. Absent: not limited.
LOCK_LIMITS = Sql(f"""
SELECT l.eff_concurrency, l.eff_per_key, l.eff_rate, l.eff_key_rate, l.estimate, l.tat,
       {LIMITED} AS limited, now() AS now,
       EXISTS (SELECT 1 FROM pauses AS ps
               WHERE ps.queue = l.queue AND ps.agent_id IN ('', l.agent_id) AND ps.key = ''
                 AND (ps.until IS NULL OR ps.until > now())) AS paused
FROM flow_limits AS l
WHERE l.queue = :queue AND l.agent_id = :agent_id
FOR UPDATE
""")

# Run after LOCK_LIMITS, in its transaction (a new statement: a snapshot that sees every claim
# committed before the lock was granted). Per key with due work (a skip scan over
# ix_tasks_pending_agent, at most :max_keys keys), not paused: its running count, its rate
# state, its last start and its most due task.
CANDIDATES = Sql("""
WITH RECURSIVE keys(k) AS (
    (SELECT t.limit_key FROM tasks AS t
     WHERE t.status = 'pending' AND t.queue = :queue AND t.agent_id = :agent_id
     ORDER BY t.limit_key LIMIT 1)
    UNION ALL
    SELECT (SELECT t.limit_key FROM tasks AS t
            WHERE t.status = 'pending' AND t.queue = :queue AND t.agent_id = :agent_id
              AND t.limit_key > keys.k
            ORDER BY t.limit_key LIMIT 1)
    FROM keys WHERE keys.k IS NOT NULL
), running AS (
    SELECT t.limit_key AS k, count(*) AS n FROM tasks AS t
    WHERE t.status = 'running' AND t.queue = :queue AND t.agent_id = :agent_id
    GROUP BY t.limit_key
)
SELECT keys.k AS key, COALESCE(running.n, 0) AS running,
       (SELECT COALESCE(sum(n), 0) FROM running) AS total_running,
       fk.tat, fk.last_started_at, next.id AS task_id, next.due_rank
FROM (SELECT k FROM keys WHERE k IS NOT NULL LIMIT :max_keys) AS keys
LEFT JOIN running ON running.k = keys.k
LEFT JOIN flow_keys AS fk ON fk.queue = :queue AND fk.agent_id = :agent_id AND fk.key = keys.k
CROSS JOIN LATERAL (
    SELECT t.id, t.due_rank FROM tasks AS t
    WHERE t.status = 'pending' AND t.queue = :queue AND t.agent_id = :agent_id
      AND t.limit_key = keys.k AND t.run_after <= now()
      AND (t.max_attempts IS NULL OR t.attempts < t.max_attempts)
    ORDER BY t.due_rank
    LIMIT 1
) AS next
WHERE NOT EXISTS (SELECT 1 FROM pauses AS ps
                  WHERE ps.queue = :queue AND ps.agent_id = :agent_id AND ps.key = keys.k
                    AND (ps.until IS NULL OR ps.until > now()))
""")

# The agent's running count alone (nothing due to pick, or to explain a hold).
RUNNING = Sql("""
SELECT count(*) AS n FROM tasks
WHERE status = 'running' AND queue = :queue AND agent_id = :agent_id
""")

# A start: the agent's and the key's rate state pushed on (:step / :key_step seconds, NULL when
# that rate is not limited), and the key's last start (its turn in the round-robin).
STARTED = Sql("""
WITH agent AS (
    UPDATE flow_limits
    SET tat = GREATEST(COALESCE(tat, now()), now()) + make_interval(secs => CAST(:step AS float8))
    WHERE queue = :queue AND agent_id = :agent_id AND CAST(:step AS float8) IS NOT NULL
    RETURNING 1
)
INSERT INTO flow_keys (queue, agent_id, key, tat, last_started_at)
VALUES (:queue, :agent_id, :key,
        now() + make_interval(secs => CAST(:key_step AS float8)), clock_timestamp())
ON CONFLICT (queue, agent_id, key) DO UPDATE
SET last_started_at = clock_timestamp(),
    tat = CASE WHEN CAST(:key_step AS float8) IS NULL THEN flow_keys.tat
               ELSE GREATEST(COALESCE(flow_keys.tat, now()), now())
                    + make_interval(secs => CAST(:key_step AS float8)) END
""")

# What a handler reported it really used (`ctx.consume`) against the estimate taken at its
# claim: both rate states moved by the difference (:step / :key_step seconds, may be negative).
CONSUMED = Sql("""
WITH agent AS (
    UPDATE flow_limits SET tat = tat + make_interval(secs => CAST(:step AS float8))
    WHERE queue = :queue AND agent_id = :agent_id AND tat IS NOT NULL
      AND CAST(:step AS float8) IS NOT NULL
    RETURNING 1
)
UPDATE flow_keys SET tat = tat + make_interval(secs => CAST(:key_step AS float8))
WHERE queue = :queue AND agent_id = :agent_id AND key = :key AND tat IS NOT NULL
  AND CAST(:key_step AS float8) IS NOT NULL
""")

# A handler's RateLimited(after): its run handed back, attempt unspent, due after :delay_seconds,
# and its key (the agent, for an agent without keys) paused as long. An operator's pause of the
# same key without an end stays as it is.
PAUSE_KEY_OF = Sql("""
INSERT INTO pauses AS p (queue, agent_id, key, reason, paused_by, paused_at, until)
SELECT t.queue, t.agent_id, t.limit_key, :reason, :paused_by, now(),
       now() + make_interval(secs => :delay_seconds)
FROM tasks AS t WHERE t.id = :id
ON CONFLICT (queue, agent_id, key) DO UPDATE
SET until = GREATEST(p.until, excluded.until), reason = excluded.reason,
    paused_by = excluded.paused_by, paused_at = excluded.paused_at
WHERE p.until IS NOT NULL
""")

# --- the code's declarations, an operator's overrides ------------------------------------------

# Each worker, at start-up: its agents' declared limits on its queue. An agent that declares
# none gets no row, unless it has one (an override, or a limit its code no longer declares,
# which is cleared).
DECLARE = Sql("""
INSERT INTO flow_limits AS l (queue, agent_id, declared_concurrency, declared_per_key,
                              declared_rate, declared_key_rate, key_source, key_field, units,
                              estimate)
SELECT :queue, u.agent_id, u.concurrency, u.per_key, u.rate, u.key_rate, u.key_source,
       u.key_field, u.units, u.estimate
FROM unnest(CAST(:agent_ids AS text[]), CAST(:concurrency AS int[]), CAST(:per_key AS int[]),
            CAST(:rate AS float8[]), CAST(:key_rate AS float8[]), CAST(:key_source AS text[]),
            CAST(:key_field AS text[]), CAST(:units AS text[]), CAST(:estimate AS float8[]),
            CAST(:declares AS boolean[]))
     AS u(agent_id, concurrency, per_key, rate, key_rate, key_source, key_field, units,
          estimate, declares)
WHERE u.declares OR EXISTS (SELECT 1 FROM flow_limits AS o
                            WHERE o.queue = :queue AND o.agent_id = u.agent_id)
ON CONFLICT (queue, agent_id) DO UPDATE
SET declared_concurrency = excluded.declared_concurrency,
    declared_per_key = excluded.declared_per_key, declared_rate = excluded.declared_rate,
    declared_key_rate = excluded.declared_key_rate, key_source = excluded.key_source,
    key_field = excluded.key_field, units = excluded.units, estimate = excluded.estimate,
    updated_at = now()
""")

# The key of an agent's pending tasks, read again after its key's source changed.
_KEY_OF = """CASE l.key_source
    WHEN 'metadata' THEN COALESCE(t.metadata ->> l.key_field, '')
    WHEN 'input' THEN COALESCE(CASE WHEN jsonb_typeof(t.input) = 'object'
                                    THEN t.input ->> l.key_field END, '')
    ELSE '' END"""
REKEY_PENDING = Sql(f"""
UPDATE tasks AS t SET limit_key = {_KEY_OF}
FROM flow_limits AS l
WHERE l.queue = :queue AND l.agent_id = ANY(CAST(:agent_ids AS text[]))
  AND t.queue = l.queue AND t.agent_id = l.agent_id AND t.status = 'pending'
  AND t.limit_key IS DISTINCT FROM {_KEY_OF}
""")

# An operator's override: a value, -1 for "no limit", NULL (with :reset) back to the code's.
SET_LIMITS = Sql("""
INSERT INTO flow_limits AS l (queue, agent_id, concurrency, per_key, rate, key_rate,
                              overridden_by)
VALUES (:queue, :agent_id, :concurrency, :per_key, :rate, :key_rate, :by)
ON CONFLICT (queue, agent_id) DO UPDATE
SET concurrency = CASE WHEN :set_concurrency THEN excluded.concurrency ELSE l.concurrency END,
    per_key = CASE WHEN :set_per_key THEN excluded.per_key ELSE l.per_key END,
    rate = CASE WHEN :set_rate THEN excluded.rate ELSE l.rate END,
    key_rate = CASE WHEN :set_key_rate THEN excluded.key_rate ELSE l.key_rate END,
    overridden_by = excluded.overridden_by, updated_at = now()
RETURNING queue, agent_id
""")

RESET_LIMITS = Sql("""
UPDATE flow_limits
SET concurrency = NULL, per_key = NULL, rate = NULL, key_rate = NULL, overridden_by = NULL,
    updated_at = now()
WHERE agent_id = :agent_id AND (CAST(:queue AS text) IS NULL OR queue = CAST(:queue AS text))
RETURNING queue, agent_id
""")

# Every limit with what it is using now.
LIMITS = Sql("""
SELECT l.queue, l.agent_id, l.eff_concurrency, l.eff_per_key, l.eff_rate, l.eff_key_rate,
       l.declared_concurrency, l.declared_per_key, l.declared_rate, l.declared_key_rate,
       l.concurrency, l.per_key, l.rate, l.key_rate, l.key_source, l.key_field, l.units,
       l.estimate, l.overridden_by, l.updated_at,
       EXTRACT(EPOCH FROM GREATEST(l.tat, now()) - now()) AS rate_wait_seconds,
       (SELECT count(*) FROM tasks AS t
        WHERE t.status = 'running' AND t.queue = l.queue AND t.agent_id = l.agent_id) AS running
FROM flow_limits AS l
WHERE (CAST(:queue AS text) IS NULL OR l.queue = CAST(:queue AS text))
  AND (CAST(:agent_id AS text) IS NULL OR l.agent_id = CAST(:agent_id AS text))
ORDER BY l.queue, l.agent_id
""")

# --- pauses -------------------------------------------------------------------------------------

PAUSE = Sql("""
INSERT INTO pauses AS p (queue, agent_id, key, reason, paused_by, paused_at, until)
VALUES (:queue, :agent_id, :key, :reason, :paused_by, now(),
        now() + make_interval(secs => CAST(:for_seconds AS float8)))
ON CONFLICT (queue, agent_id, key) DO UPDATE
SET reason = excluded.reason, paused_by = excluded.paused_by, paused_at = excluded.paused_at,
    until = excluded.until
RETURNING queue, agent_id, key, reason, paused_by, paused_at, until
""")

# A resumed scope's due tasks are rung at the sweeper's next tick, not a redispatch period later.
_UNHOLD = """
UPDATE tasks AS t SET dispatch_after = now()
FROM {source}
WHERE t.status = 'pending' AND t.queue = r.queue
  AND (r.agent_id = '' OR t.agent_id = r.agent_id) AND (r.key = '' OR t.limit_key = r.key)
  AND t.dispatch_after > now()
"""
RESUME = Sql(f"""
WITH resumed AS (
    DELETE FROM pauses
    WHERE queue = :queue AND agent_id = :agent_id AND key = :key
    RETURNING queue, agent_id, key
), unheld AS ({_UNHOLD.format(source="resumed AS r")})
SELECT count(*) AS n FROM resumed
""")

# Pauses whose time is up, gone; their tasks rung at once.
EXPIRE_PAUSES = Sql(f"""
WITH expired AS (
    DELETE FROM pauses WHERE until <= now() AND queue = :queue
    RETURNING queue, agent_id, key
), unheld AS ({_UNHOLD.format(source="expired AS r")})
SELECT count(*) AS n FROM expired
""")

PAUSES = Sql("""
SELECT queue, agent_id, key, reason, paused_by, paused_at, until FROM pauses
WHERE (until IS NULL OR until > now())
  AND (CAST(:queue AS text) IS NULL OR queue = CAST(:queue AS text))
ORDER BY queue, agent_id, key
""")

# --- the sweeper ---------------------------------------------------------------------------------

# Limited agents of a queue with due work, not paused, and room to start: each gets a flow
# doorbell from the sweeper (a safety net: finishes ring them as slots free).
READY = Sql(f"""
SELECT l.agent_id FROM flow_limits AS l
WHERE l.queue = :queue AND {LIMITED}
  AND (l.tat IS NULL OR l.tat <= now())
  AND NOT EXISTS (SELECT 1 FROM pauses AS ps
                  WHERE ps.queue = l.queue AND ps.agent_id IN ('', l.agent_id) AND ps.key = ''
                    AND (ps.until IS NULL OR ps.until > now()))
  AND EXISTS (SELECT 1 FROM tasks AS t
              WHERE t.status = 'pending' AND t.queue = l.queue AND t.agent_id = l.agent_id
                AND t.run_after <= now())
  AND (l.eff_concurrency IS NULL
       OR l.eff_concurrency > (SELECT count(*) FROM tasks AS t
                               WHERE t.status = 'running' AND t.queue = l.queue
                                 AND t.agent_id = l.agent_id))
""")

# What holds one pending task, for `tasklane show`: its scope's pause, its agent's limits and
# their use.
HOLD_OF = Sql("""
SELECT ps.reason AS pause_reason, ps.paused_by, ps.paused_at, ps.until AS paused_until,
       ps.agent_id AS paused_agent, ps.key AS paused_key,
       l.eff_concurrency, l.eff_per_key, l.eff_rate, l.eff_key_rate, l.tat AS agent_tat,
       fk.tat AS key_tat, t.limit_key,
       (SELECT count(*) FROM tasks AS r
        WHERE r.status = 'running' AND r.queue = t.queue AND r.agent_id = t.agent_id) AS running,
       (SELECT count(*) FROM tasks AS r
        WHERE r.status = 'running' AND r.queue = t.queue AND r.agent_id = t.agent_id
          AND r.limit_key = t.limit_key) AS key_running
FROM tasks AS t
LEFT JOIN LATERAL (
    SELECT * FROM pauses AS p
    WHERE p.queue = t.queue AND p.agent_id IN ('', t.agent_id) AND p.key IN ('', t.limit_key)
      AND (p.agent_id <> '' OR p.key = '') AND (p.until IS NULL OR p.until > now())
    ORDER BY p.paused_at LIMIT 1
) AS ps ON true
LEFT JOIN flow_limits AS l ON l.queue = t.queue AND l.agent_id = t.agent_id
LEFT JOIN flow_keys AS fk
       ON fk.queue = t.queue AND fk.agent_id = t.agent_id AND fk.key = t.limit_key
WHERE t.id = :id
""")
