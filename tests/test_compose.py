"""compose.yaml, .env.example, the Dockerfile and .dockerignore: what a newcomer runs first.

No Docker engine is needed: `docker compose config` validates and resolves compose.yaml on the
client side (the v2 plugin or the standalone docker-compose 1.29 that Debian 12 packages), and
the Dockerfile is read instruction by instruction. What only an engine can show (the image
builds, PostgreSQL's first boot, the limits enforced) is not verified here;
tests/test_entrypoint.py runs the image's entrypoint as a process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.deployment import (
    ROOT_PATH,
    compose_config,
    compose_profiles,
    dockerfile_instructions,
    env_example,
    seconds,
    settings_variables,
    size_bytes,
)
from worker.config import Settings
from worker.health import CHECK_TIMEOUT_SECONDS

TASKLANE_SERVICES = ("migrate", "worker")
# Set from files (`*_FILE` names /run/secrets/…), not passed through.
SECRET_SETTINGS = {"DATABASE_URL", "REDIS_URL", "DATABASE_URL_FILE", "REDIS_URL_FILE"}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def example_values_file() -> Any:
    """.env.example with every assignment uncommented (its values are the defaults)."""
    with tempfile.NamedTemporaryFile("w", suffix=".env") as handle:
        handle.write("".join(f"{k}={v}\n" for k, v in env_example().items()))
        handle.flush()
        yield handle.name


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (what a container starts with)."""
    instructions = dockerfile_instructions(ROOT_PATH / "Dockerfile")
    last_stage = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    env: dict[str, str] = {}
    for word, args in instructions[last_stage:]:
        if word == "ENV":
            for assignment in args.split():
                name, _, value = assignment.partition("=")
                env[name] = value.strip('"')
    return env


# -- the services ---------------------------------------------------------------------------------


def test_compose_has_the_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) >= {"postgres", "redis", "migrate", "worker"}


@pytest.mark.parametrize("profile", ["", *compose_profiles()])
def test_config_resolves_on_every_profile(profile: str) -> None:
    resolved = compose_config(profiles=(profile,) if profile else ())
    assert {"postgres", "redis", "migrate", "worker"} <= set(resolved["services"])
    for name, service in resolved["services"].items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", f"{name} does not rotate its logs"
        assert {"max-size", "max-file"} <= set(logging.get("options", {})), name


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
    assert worker["healthcheck"]["test"] == ["CMD", "tasklane", "health", "--local"]


def test_the_image_is_built_on_every_up_under_no_shared_tag(config: dict[str, Any]) -> None:
    builds = [config["services"][name]["build"] for name in TASKLANE_SERVICES]
    assert builds[0] == builds[1], "migrate and worker run the same image"
    for name in TASKLANE_SERVICES:
        service = config["services"][name]
        assert service.get("pull_policy") == "build", f"{name}: `up` must rebuild"
        assert "image" not in service, f"{name}: a fixed tag goes stale across checkouts"


def test_postgres_is_checked_over_tcp_within_its_timeout(config: dict[str, Any]) -> None:
    check = config["services"]["postgres"]["healthcheck"]
    command = check["test"]
    assert command[:2] == ["CMD", "pg_isready"]
    assert command[command.index("-h") + 1] == "127.0.0.1"  # not the set-up server's socket
    assert seconds(check["timeout"]) > float(command[command.index("-t") + 1])


def test_healthcheck_timeouts_outlast_their_checks(config: dict[str, Any]) -> None:
    services = config["services"]
    # tasklane health runs four checks (postgres, schema, redis, workers), each bounded.
    assert seconds(services["worker"]["healthcheck"]["timeout"]) > 4 * CHECK_TIMEOUT_SECONDS


def test_postgres_and_redis_are_bounded_and_keep_their_data(config: dict[str, Any]) -> None:
    services = config["services"]
    postgres = services["postgres"]
    assert size_bytes(postgres["shm_size"]) >= 128 * 2**20  # Docker's default 64 MB is too small
    for name in ("postgres", "redis", "worker"):
        limits = services[name]["deploy"]["resources"]["limits"]
        assert {"memory", "cpus"} <= set(limits), name
    assert "max_connections=100" in postgres["command"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "ping" in services["redis"]["healthcheck"]["test"]


# -- settings and secrets -------------------------------------------------------------------------


def test_every_setting_passes_through_as_a_bare_key(config: dict[str, Any]) -> None:
    wanted = settings_variables() - SECRET_SETTINGS
    assert "TASKLANE_CONCURRENCY" in wanted  # the recording saw the reads
    for name in TASKLANE_SERVICES:
        environment = config["services"][name]["environment"]
        assert wanted <= set(environment), f"{name} lacks {sorted(wanted - set(environment))}"
        bare = {k for k, v in environment.items() if v is None}
        assert wanted <= bare, f"{name} fixes {sorted(wanted - bare)} instead of passing them"


def test_values_from_the_env_file_reach_both_services(example_values_file: str) -> None:
    resolved = compose_config(env_file=example_values_file)
    example = env_example()
    passed = settings_variables() - SECRET_SETTINGS
    for name in TASKLANE_SERVICES:
        environment = resolved["services"][name]["environment"]
        assert {k: environment[k] for k in passed} == {k: example[k] for k in passed}, name


def test_env_example_lists_every_setting_with_its_default() -> None:
    example = env_example()
    assert settings_variables() - SECRET_SETTINGS <= set(example)
    image = image_environment()
    defaults = Settings.from_env(image)
    for name in settings_variables() & set(example):
        assert Settings.from_env({**image, name: example[name]}) == defaults, name
    # The compose-level variables: the default in compose.yaml is the one the example shows.
    text = (ROOT_PATH / "compose.yaml").read_text()
    for name, value in example.items():
        if name not in settings_variables():
            assert f"${{{name}:-{value}}}" in text, f"{name}={value} is not compose.yaml's default"


def test_the_readme_configuration_table_lists_every_setting() -> None:
    text = (ROOT_PATH / "README.md").read_text()
    table = text[text.index("| variable | default | meaning |") :]
    table = table[: table.index("\n\n")]
    missing = {name for name in settings_variables() if f"`{name}`" not in table}
    assert not missing, f"README's configuration table lacks {sorted(missing)}"


def test_secrets_reach_the_containers_as_files_only(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            assert key not in {"DATABASE_URL", "REDIS_URL", "POSTGRES_PASSWORD"}, (name, key)
            assert value is None or "://" not in str(value), (name, key)
    for name in TASKLANE_SERVICES:
        mounted = {s["source"] for s in services[name]["secrets"]}
        assert mounted == {"database_url", "redis_url"}, name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    files = {name: Path(secret["file"]) for name, secret in config["secrets"].items()}
    settings = Settings.from_env(
        {"DATABASE_URL_FILE": str(files["database_url"]), "REDIS_URL_FILE": str(files["redis_url"])}
    )
    password = files["postgres_password"].read_text().strip()
    assert f":{password}@postgres:5432/" in settings.database_url
    assert settings.redis_url.startswith("redis://redis:6379/")


@pytest.mark.parametrize("source", ["defaults", ".env.example"])
def test_stop_grace_period_outlasts_the_shutdown_grace(
    source: str, example_values_file: str
) -> None:
    """Docker must not SIGKILL a worker that is still handing its runs back."""
    env_file = example_values_file if source == ".env.example" else None
    worker = compose_config(env_file=env_file)["services"]["worker"]
    grace = worker["environment"]["TASKLANE_SHUTDOWN_GRACE_SECONDS"]
    grace_seconds = Settings().shutdown_grace_seconds if grace is None else float(grace)
    assert seconds(worker["stop_grace_period"]) >= grace_seconds + 20


# -- the image ------------------------------------------------------------------------------------


def test_dockerfile_builds_from_the_lock_file_and_runs_unprivileged() -> None:
    instructions = dockerfile_instructions(ROOT_PATH / "Dockerfile")
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
    assert "/app/.venv/bin" in image_environment()["PATH"]


def test_the_image_runs_under_an_init() -> None:
    """PID 1 must forward SIGTERM (tests/test_entrypoint.py runs this entrypoint)."""
    instructions = dockerfile_instructions(ROOT_PATH / "Dockerfile")
    entrypoint = json.loads([args for word, args in instructions if word == "ENTRYPOINT"][-1])
    assert entrypoint == ["/usr/bin/tini", "--"]
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "install -y --no-install-recommends tini" in runs


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT_PATH / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "hatch_build.py",
        "tasklane",
        "domain",
        "persistence",
        "worker",
        "migrations",
    }
    assert not needed & ignored
    assert ".venv" in ignored
    assert ".git" in ignored
