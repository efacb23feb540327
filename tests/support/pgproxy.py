"""A TCP proxy in front of PostgreSQL that breaks connections at chosen protocol points.

Clients (worker processes) connect to the proxy instead of the server. It forwards every byte,
reading just enough of the wire protocol to know which statement each `Bind` executes and which
backend serves each connection. Its faults:

- `drop_after_commit(marker)`: the next statement whose SQL contains `marker` runs and commits on
  the real server; then the server's `ReadyForQuery` is swallowed and the client's connection
  closed. The client sees its connection die although its statement committed: an ambiguous
  commit, made deterministic.
- `terminate_after_answer(marker)`: the next such statement runs, commits and is answered, and in
  the same breath its backend is terminated (`pg_terminate_backend`): the client gets the answer
  immediately followed by the server's FATAL goodbye.
- `linger`: when the server closes a connection (after `pg_terminate_backend`, say), the client's
  side is closed only `linger` seconds later. The server's FATAL message reaches the client at
  once, its end-of-stream late: the few milliseconds in which a client may still use a connection
  that the server already dropped, stretched so a test can hit them every time.

It runs its own event loop in a thread, so a test may block (`time.sleep`, `subprocess.wait`)
without stalling the traffic of the workers behind it.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


@dataclass(slots=True)
class _Trap:
    marker: str
    terminate: bool  # terminate the backend after the answer (else: drop before the answer)
    fired: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class _Connection:
    statements: dict[bytes, str] = field(default_factory=dict)  # prepared name → SQL
    backend_pid: int | None = None
    trap: _Trap | None = None  # set once a trapped statement was sent on this connection
    server_gone: bool = False
    dropped: bool = False
    client_quit: bool = False  # the client said Terminate: the server's hang-up is expected


class PgProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        parts = urlsplit(upstream_url)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 5432
        self.port = 0
        self.linger = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._armed: _Trap | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def server_url(self, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def start(self, port: int = 0) -> PgProxy:
        """Listen on `port` (0: a free one)."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", port), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def drop_after_commit(self, marker: str) -> threading.Event:
        """Arm: the next statement executed whose SQL contains `marker` runs to its end (its
        transaction commits), then its connection is closed before the client hears so. Returns
        an event set once that happened."""
        return self._arm(_Trap(marker, terminate=False))

    def terminate_after_answer(self, marker: str) -> threading.Event:
        """Arm: the next statement executed whose SQL contains `marker` commits and is answered,
        and its backend is terminated before the client can say another word."""
        return self._arm(_Trap(marker, terminate=True))

    def _arm(self, trap: _Trap) -> threading.Event:
        with self._lock:
            self._armed = trap
        return trap.fired

    def _spring(self, sql: str) -> _Trap | None:
        with self._lock:
            trap = self._armed
            if trap is None or trap.marker not in sql:
                return None
            self._armed = None
        return trap

    async def _terminate(self, pid: int) -> None:
        admin = await asyncpg.connect(self.upstream_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()

    # -- plumbing ----------------------------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            if await self._startup(client_r, client_w, server_r, server_w):
                conn = _Connection()
                backend = asyncio.ensure_future(self._backend(server_r, client_w, conn))
                frontend = asyncio.ensure_future(self._frontend(client_r, server_w, conn))
                await asyncio.wait([backend, frontend], return_when=asyncio.FIRST_COMPLETED)
                if backend.done() and not (conn.dropped or conn.client_quit) and self.linger:
                    # The server hung up; the client learns it late (its words go nowhere).
                    await asyncio.sleep(self.linger)
                for pump in (backend, frontend):
                    pump.cancel()
                await asyncio.gather(backend, frontend, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.transport.abort()
            self._tasks.discard(task)

    async def _startup(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> bool:
        """Forward the untyped startup packets (answering SSL/GSS requests byte for byte).
        True once the StartupMessage went through and typed messages follow."""
        while True:
            head = await client_r.readexactly(4)
            (length,) = struct.unpack("!i", head)
            body = await client_r.readexactly(length - 4)
            server_w.write(head + body)
            await server_w.drain()
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client_w.write(await server_r.readexactly(1))
                await client_w.drain()
                continue
            return code != _CANCEL_REQUEST

    async def _frontend(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        while True:
            kind, body = await _message(reader)
            if kind == b"P":  # Parse: statement name, query
                name, rest = body.split(b"\0", 1)
                conn.statements[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
            elif kind == b"B":  # Bind: portal name, statement name
                name = body.split(b"\0", 2)[1]
                conn.trap = conn.trap or self._spring(conn.statements.get(name, ""))
            elif kind == b"Q":  # simple query
                conn.trap = conn.trap or self._spring(body.decode(errors="replace"))
            elif kind == b"X":  # Terminate
                conn.client_quit = True
            if not conn.server_gone:
                writer.write(_frame(kind, body))
                await writer.drain()

    async def _backend(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        try:
            while True:
                kind, body = await _message(reader)
                if kind == b"K":  # BackendKeyData: the backend's pid, then its cancel key
                    (conn.backend_pid,) = struct.unpack("!i", body[:4])
                out = _frame(kind, body)
                trap = conn.trap
                # ReadyForQuery, idle: the trapped statement is done and its transaction committed.
                if kind == b"Z" and body == b"I" and trap is not None:
                    trap.fired.set()
                    if not trap.terminate:
                        conn.dropped = True  # the client never hears of it
                        return
                    conn.trap = None
                    assert conn.backend_pid is not None
                    await self._terminate(conn.backend_pid)
                    goodbye, text = await _message(reader)  # the server's FATAL message
                    out += _frame(goodbye, text)
                writer.write(out)
                await writer.drain()
        except asyncio.IncompleteReadError:
            conn.server_gone = True


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


async def _message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], await reader.readexactly(length - 4)
