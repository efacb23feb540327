"""A producer process that can be killed between its commit and its doorbells.

`python -m tests.support.producer many|session CONVERSATION_ID AGENT N` (with a worker's
environment, see `settings_env`) submits N tasks with the real `TaskClient`: one `submit_many`,
or N `submit(..., session=s)` in one transaction of its own. With
`TASKLANE_TEST_STALL_BEFORE_RING=1` it stops at the exact point a crash would hurt: the
transaction has committed and no doorbell has been rung. It prints `committed <id>,<id>…` and
blocks there until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from uuid import UUID

from domain.entities import Doorbell
from tests.support.databases import ROOT
from worker.client import TaskClient, TaskSpec

STALL_ENV = "TASKLANE_TEST_STALL_BEFORE_RING"


class StallingClient(TaskClient):
    """The real client, except that its first ring after a commit never happens."""

    async def _ring(self, doorbells: list[Doorbell]) -> None:
        if doorbells and os.environ.get(STALL_ENV) == "1":
            print("committed " + ",".join(str(d.task_id) for d in doorbells), flush=True)
            await asyncio.Event().wait()  # here until SIGKILL
        await super()._ring(doorbells)


async def produce(mode: str, conversation_id: UUID, agent_id: str, n: int) -> None:
    """`many`: one `submit_many`; `session`: n `submit(..., session=s)` in the caller's
    transaction, rung by the client's after-commit hook."""
    async with StallingClient.from_env() as client:
        if mode == "many":
            specs = [TaskSpec(agent_id, {"i": i}, conversation_id) for i in range(n)]
            tasks = await client.submit_many(specs)
        else:
            async with client.session_factory() as session, session.begin():
                tasks = [
                    await client.submit(
                        agent_id, {"i": i}, conversation_id=conversation_id, session=session
                    )
                    for i in range(n)
                ]
    print("rung " + ",".join(str(t.id) for t in tasks), flush=True)


class ProducerProcess:
    """The producer as a real process, its stdout in a file."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="tasklane-producer-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.producer", *args],
            env=dict(env),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {prefix!r} line from the producer:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()


if __name__ == "__main__":
    mode, conversation, agent, count = sys.argv[1:5]
    asyncio.run(produce(mode, UUID(conversation), agent, int(count)))
