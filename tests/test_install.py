"""tasklane as users install it: a wheel built from this repository, in a fresh virtualenv.

The wheel must hold one top-level package, `tasklane`, so that a user's own `worker` (or
`domain`, `persistence`, `migrations`) module never collides with tasklane's. Everything that
names modules by string has to work installed too: the default TASKLANE_AGENTS, Alembic's
scripts (`tasklane migrate` on an empty database), `arq tasklane.settings.WorkerSettings`. And
both ways of bringing your own agents run for real: a project that depends on tasklane (with a
`worker.py` of its own on PYTHONPATH) and the Python side of the derived image example.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import databases
from tests.support.deployment import ROOT_PATH, dockerfile_instructions
from worker.config import Settings

pytestmark = pytest.mark.slow

EXAMPLES = ROOT_PATH / "examples"
# What the user's shell or this test run must not lend the installed tasklane.
_FOREIGN = ("TASKLANE_", "LOG_", "DATABASE_", "REDIS_", "PYTHON", "VIRTUAL_ENV", "UV_PROJECT")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path

    def run(
        self, *command: str, env: dict[str, str], cwd: Path, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        executable = str(self.bin / command[0])
        return subprocess.run(
            [executable, *command[1:]],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _uv(*args: str) -> None:
    uv = shutil.which("uv")
    assert uv is not None, "uv is not on PATH"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    result = subprocess.run(
        [uv, *args], cwd=ROOT_PATH, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The repository's wheel installed in a new virtualenv (uv's cache makes it quick)."""
    root = tmp_path_factory.mktemp("install")
    _uv("build", "--wheel", "--out-dir", str(root / "dist"))
    [wheel] = (root / "dist").glob("tasklane-*.whl")
    venv = root / "venv"
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    _uv("pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheel))
    return Installed(wheel, venv / "bin")


def user_env(settings: Settings, tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
    env |= {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "TASKLANE_QUEUE": settings.queue,
        "TASKLANE_LIVENESS_PATH": str(tmp_path / "alive"),
        "LOG_LEVEL": "WARNING",
        **variables,
    }
    return env


def submit_and_work(
    installed: Installed, env: dict[str, str], cwd: Path, agent: str, payload: Any
) -> dict[str, Any]:
    """Submit one task with the installed CLI, run a burst worker, return the task."""
    submitted = installed.run(
        "tasklane", "submit", agent, "--input", json.dumps(payload), "--json", env=env, cwd=cwd
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]
    worked = installed.run("tasklane", "worker", "--burst", env=env, cwd=cwd)
    assert worked.returncode == 0, worked.stdout + worked.stderr
    shown = installed.run("tasklane", "show", task_id, "--json", env=env, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    task: dict[str, Any] = json.loads(shown.stdout)
    return task


def test_the_wheel_installs_one_top_level_package(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        top = {name.split("/")[0] for name in wheel.namelist()}
        assert top == {"tasklane", installed.wheel.name.split("-py3")[0] + ".dist-info"}
        names = set(wheel.namelist())
        for package in ("domain", "persistence", "worker", "migrations"):
            assert any(n.startswith(f"tasklane/{package}/") for n in names), package
        assert "tasklane/migrations/env.py" in names
        entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"tasklane = tasklane.cli:main" in entry_points


def test_a_project_with_its_own_worker_module_runs_its_agents(
    installed: Installed, settings: Settings, tmp_path: Path
) -> None:
    project = EXAMPLES / "library-project"
    declared = tomllib.loads((project / "pyproject.toml").read_text())
    assert "tasklane" in declared["project"]["dependencies"]
    source = project / declared["tool"]["uv"]["sources"]["tasklane"]["path"]
    assert source.resolve() == ROOT_PATH.resolve(), "the example points at this repository"

    env = user_env(settings, tmp_path, PYTHONPATH=str(project), TASKLANE_AGENTS="myservice.agents")
    # The project's `worker` is what `import worker` finds: with tasklane's old layout this
    # module hid tasklane's own worker package and the CLI could not start.
    which = installed.run(
        "python", "-c", "import worker; print(worker.__file__)", env=env, cwd=project
    )
    assert which.stdout.strip() == str(project / "worker.py"), which.stderr

    task = submit_and_work(installed, env, project, "shout", {"text": "hello"})
    assert task["status"] == "completed", task
    assert task["output"] == {"shouted": "HELLO!", "helper": str(project / "worker.py")}


def _derived_image_pythonpath(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The example Dockerfile's COPYs laid out as in the image, and its ENV."""
    example = EXAMPLES / "derived-image"
    instructions = dockerfile_instructions(example / "Dockerfile")
    image_root = tmp_path / "image"
    for word, args in instructions:
        if word == "COPY":
            source, destination = args.split()
            shutil.copytree(example / source, image_root / destination.lstrip("/"))
    env: dict[str, str] = {}
    for word, args in instructions:
        if word == "ENV":
            for assignment in args.split():
                name, _, value = assignment.partition("=")
                env[name] = value
    paths = [str(image_root / p.lstrip("/")) for p in env.pop("PYTHONPATH").split(":")]
    return image_root, {**env, "PYTHONPATH": os.pathsep.join(paths)}


def test_the_derived_image_examples_agents_run_from_their_image_layout(
    installed: Installed, settings: Settings, tmp_path: Path
) -> None:
    image_root, image_env = _derived_image_pythonpath(tmp_path)
    assert image_env["TASKLANE_AGENTS"] == "myapp.agents"
    env = user_env(settings, tmp_path, **image_env)
    task = submit_and_work(installed, env, image_root, "greet", {"name": "Ada"})
    assert task["status"] == "completed", task
    assert task["output"] == {"greeting": "hello, Ada"}


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = databases.unique_name()
    asyncio.run(databases.create_database(name))
    yield databases.url_for(name)
    asyncio.run(databases.drop_database(name))


def test_installed_migrate_default_agents_and_arqs_cli(
    installed: Installed, settings: Settings, empty_database: str, tmp_path: Path
) -> None:
    env = user_env(settings, tmp_path, DATABASE_URL=empty_database)  # default TASKLANE_AGENTS
    migrated = installed.run("tasklane", "migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr  # Alembic found its installed scripts
    submitted = installed.run(
        "tasklane", "submit", "square", "--input", '{"x": 7}', "--json", env=env, cwd=tmp_path
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]
    arq = installed.run("arq", "tasklane.settings.WorkerSettings", "--burst", env=env, cwd=tmp_path)
    assert arq.returncode == 0, arq.stdout + arq.stderr
    shown = installed.run("tasklane", "show", task_id, "--json", env=env, cwd=tmp_path)
    assert json.loads(shown.stdout)["output"] == {"y": 49}
