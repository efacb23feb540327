"""Redis for tests: the shared server (tests/support/servers.py; unique queue names) or a private
`redis-server` on a free port, for scenarios that flush, kill or restart it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

from tests.support.tools import redis_server


def unique_queue() -> str:
    return f"tasklane_test_{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll a (sync) predicate until it is truthy; AssertionError after `timeout` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class PrivateRedis:
    """A throwaway redis-server that keeps nothing on disk: kill it, restart it empty.

    Its port is free when chosen but not reserved, so with tests running in parallel another
    server may take it first: the first start then tries another port. Once it has served, it
    keeps its port (clients hold its URL), and a restart that finds the port taken fails."""

    START_ATTEMPTS = 5

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or redis_server()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tasklane-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._served = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        for _ in range(self.START_ATTEMPTS):
            if self._launch():
                self._served = True
                return self
            if self._served:
                raise AssertionError(f"redis-server could not listen on port {self.port} again")
            self.port = free_port()
        raise AssertionError(f"redis-server found no free port in {self.START_ATTEMPTS} tries")

    def _launch(self) -> bool:
        """Start redis-server on `self.port`; False if another process holds the port."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.dir)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.process = process
        client = redis.Redis.from_url(self.url)
        try:
            # Answering is not enough: the server on this port must be this process.
            wait_until(lambda: process.poll() is not None or _pid(client) == process.pid)
        finally:
            client.close()
        if process.poll() is None:
            return True
        self.process = None
        return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """Kill and start again on the same port, empty (it keeps nothing on disk)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pid(client: redis.Redis) -> int | None:
    """The process id of the server the client reaches, None while nothing answers."""
    try:
        return int(client.info("server")["process_id"])
    except redis.RedisError:
        return None
