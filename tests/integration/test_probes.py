"""Liveness and readiness as an orchestrator sees them, around a real worker process.

`tasklane health --live` (liveness) must pass while the worker rides out a Redis outage, or a
Kubernetes liveness probe would restart every worker exactly when the README says they keep
going; `tasklane health --local` (readiness) says the dependencies are away.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from tests.support.databases import ROOT
from tests.support.services import PrivateRedis, wait_until
from tests.support.workers import WorkerProcess, settings_env, start_process
from worker.config import Settings
from worker.liveness import STAMP_SECONDS


def health(settings: Settings, stamp: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "health", *flags],
        env=settings_env(settings, {"TASKLANE_LIVENESS_PATH": str(stamp)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_liveness_follows_the_worker_loop_and_readiness_its_services(
    settings: Settings,
    private_redis: PrivateRedis,
    processes: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = replace(settings, redis_url=private_redis.url)
    stamp = tmp_path / "alive"
    before = health(settings, stamp, "--live")
    assert before.returncode == 1, before.stdout + before.stderr
    assert "no stamp" in before.stdout

    worker = start_process(processes, settings, extra_env={"TASKLANE_LIVENESS_PATH": str(stamp)})
    wait_until(stamp.exists, timeout=10)
    for flags in (("--live",), ("--local",)):
        up = health(settings, stamp, *flags)
        assert up.returncode == 0, f"{flags}: {up.stdout}{up.stderr}"

    private_redis.kill()
    outage = time.time()
    # The loop keeps stamping through the outage...
    wait_until(lambda: stamp.stat().st_mtime > outage, timeout=STAMP_SECONDS * 3)
    live = health(settings, stamp, "--live")
    assert live.returncode == 0, live.stdout + live.stderr
    # ...while readiness reports the dependency that is away.
    ready = health(settings, stamp, "--local", "--json")
    assert ready.returncode == 1, ready.stdout + ready.stderr
    assert '"redis"' in ready.stdout
    assert "cannot connect to Redis" in ready.stdout
    assert worker.process.poll() is None, worker.output()

    private_redis.start()
    worker.stop()
    assert worker.process.returncode == 0, worker.output()
    assert not stamp.exists(), "a stopped worker must not leave a stamp that looks alive"
    after = health(settings, stamp, "--live")
    assert after.returncode == 1, after.stdout + after.stderr
