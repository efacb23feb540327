"""compose.yaml, the Dockerfile and .dockerignore: what a newcomer runs first.

No Docker engine is needed: `docker compose config` validates and normalises the file on the
client side. The Compose v2 plugin prints JSON; the older standalone `docker-compose` (1.29,
what Debian 12 packages) prints YAML only, which we read with the interpreter that runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.databases import ROOT

ROOT_PATH = Path(ROOT)


def _compose_client() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client installed")
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
    if plugin.returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    pytest.fail(
        "docker is installed but no Compose client: install the compose plugin "
        "or docker-compose (apt-get install docker-compose)"
    )


def _yaml_to_json(text: str, compose: str) -> Any:
    """Parse YAML with PyYAML if we have it, else with the Python that runs docker-compose 1.x
    (it depends on PyYAML)."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        first_line = Path(compose).read_text(errors="replace").splitlines()[0]
        assert first_line.startswith("#!"), f"cannot tell which Python runs {compose}"
        interpreter = first_line[2:].strip().split()
        converted = subprocess.run(
            [
                *interpreter,
                "-c",
                "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
            ],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(converted.stdout)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """compose.yaml as `docker compose config` resolves it (defaults interpolated)."""
    client = _compose_client()
    base = [*client, "--project-directory", str(ROOT_PATH), "-f", str(ROOT_PATH / "compose.yaml")]
    as_json = subprocess.run(
        [*base, "config", "--format", "json"], capture_output=True, text=True, timeout=120
    )
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):
        parsed: dict[str, Any] = json.loads(as_json.stdout)
        return parsed
    # docker-compose 1.x has no --format (it prints its usage and exits 0)
    plain = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, f"docker compose config failed:\n{plain.stderr}"
    return dict(_yaml_to_json(plain.stdout, client[0]))


def test_compose_has_the_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) >= {"postgres", "redis", "migrate", "worker"}


def test_worker_starts_after_migrations_succeeded(config: dict[str, Any]) -> None:
    services = config["services"]
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"
    assert worker_deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["tasklane", "migrate"]
    assert services["migrate"].get("restart", "no") == "no"


def test_worker_can_be_scaled(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["command"] == ["tasklane", "worker"]
    assert worker["healthcheck"]["test"][:3] == ["CMD", "tasklane", "health"]
    # the same image as migrate, built here
    assert worker["image"] == config["services"]["migrate"]["image"]
    assert "build" in worker


def test_services_have_health_checks_and_redis_keeps_an_aof(config: dict[str, Any]) -> None:
    services = config["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    environment = services["worker"]["environment"]
    assert environment["DATABASE_URL"].endswith("@postgres:5432/tasklane")
    assert environment["REDIS_URL"] == "redis://redis:6379/0"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    joined = path.read_text().replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def test_dockerfile_builds_from_the_lock_file_and_runs_unprivileged() -> None:
    instructions = _instructions(ROOT_PATH / "Dockerfile")
    stages = [args for word, args in instructions if word == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a slim runtime stage"
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "uv sync --frozen --no-dev" in runs
    # the last USER is not root, and the default command is a worker
    users = [args for word, args in instructions if word == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    cmd = [args for word, args in instructions if word == "CMD"][-1]
    assert json.loads(cmd) == ["tasklane", "worker"]
    path = " ".join(args for word, args in instructions if word == "ENV")
    assert "/app/.venv/bin" in path


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT_PATH / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {"pyproject.toml", "uv.lock", "README.md", "domain", "persistence", "worker"}
    assert not needed & ignored
    assert {"migrations"} - ignored == {"migrations"}
    assert ".venv" in ignored
    assert ".git" in ignored
