"""How long anything may wait on PostgreSQL: no call waits forever on a silent peer.

Two sides, both set on every connection tasklane opens:
- the client's: asyncpg's command timeout, a little longer than the server's statement timeout so
  that, when the server is alive, its own cleaner error comes first; when it is not (a network
  that drops packets, a server that stopped answering), the client gives up all the same;
- the server's: `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout`,
  sent as connection parameters. PgBouncer refuses parameters it does not know unless its
  `ignore_startup_parameters` lists them: behind it, set `TASKLANE_DB_SESSION_TIMEOUTS=false` and
  set them on the database role instead (`ALTER ROLE … SET statement_timeout = '30s'`).
"""

from __future__ import annotations

from dataclasses import dataclass

# How much longer the client waits than the server's statement timeout.
CLIENT_SLACK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class DbTimeouts:
    statement_seconds: float | None = 30.0  # None: no limit (migrations build indexes)
    lock_seconds: float | None = 10.0
    idle_in_transaction_seconds: float | None = 60.0
    connect_seconds: float = 10.0
    session_settings: bool = True  # send the server-side ones when connecting

    @property
    def command_seconds(self) -> float | None:
        """asyncpg's per-call timeout."""
        if self.statement_seconds is None:
            return None
        return self.statement_seconds + CLIENT_SLACK_SECONDS

    def server_settings(self) -> dict[str, str]:
        """Connection parameters for the server-side limits (milliseconds; 0 means none)."""
        if not self.session_settings:
            return {}
        return {
            "statement_timeout": _ms(self.statement_seconds),
            "lock_timeout": _ms(self.lock_seconds),
            "idle_in_transaction_session_timeout": _ms(self.idle_in_transaction_seconds),
        }


def _ms(seconds: float | None) -> str:
    return "0" if seconds is None else str(max(1, round(seconds * 1000)))


DEFAULT_TIMEOUTS = DbTimeouts()
# Schema migrations may take long (an index on a big table): no statement limit, but no lock
# waited on forever either.
MIGRATION_TIMEOUTS = DbTimeouts(statement_seconds=None, idle_in_transaction_seconds=None)
