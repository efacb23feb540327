"""Reading the deployment files as their tools would, without a Docker engine or a cluster:
`docker compose config` for compose.yaml, YAML documents for the Kubernetes manifests, the
Dockerfile's instructions, and the names of the variables tasklane reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support.databases import ROOT
from tests.support.tools import missing
from worker.config import Settings

ROOT_PATH = Path(ROOT)
# Variables of the caller's shell that would leak into `docker compose config`.
_SHELL_PREFIXES = ("TASKLANE_", "LOG_", "POSTGRES_", "REDIS_", "COMPOSE_", "DATABASE_")


# -- compose ----------------------------------------------------------------------------------


@cache
def compose_client() -> tuple[str, ...]:
    """`docker compose` (the v2 plugin) or the standalone `docker-compose` 1.x; missing, the
    test skips — or fails, under CI (tests.support.tools)."""
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if plugin.returncode == 0:
            return (docker, "compose")
    legacy = shutil.which("docker-compose")
    if legacy is None:
        missing("a Compose client", "the docker compose plugin, or apt-get install docker-compose")
    return (legacy,)


def compose_config(
    *, profiles: tuple[str, ...] = (), env_file: str | None = None
) -> dict[str, Any]:
    """compose.yaml as `docker compose config` resolves it. The shell's own tasklane variables
    and the repository's .env are kept out: only `env_file` (else an empty one) counts."""
    return json.loads(_compose_config_json(profiles, env_file))  # type: ignore[no-any-return]


@cache
def _compose_config_json(profiles: tuple[str, ...], env_file: str | None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        command = [
            *compose_client(),
            "--project-directory",
            str(ROOT_PATH),
            "-f",
            str(ROOT_PATH / "compose.yaml"),
            "--env-file",
            env_file or empty.name,
            *[arg for profile in profiles for arg in ("--profile", profile)],
            "config",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SHELL_PREFIXES)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    # The v2 plugin prints YAML by default too; YAML is what both versions share.
    return json.dumps(yaml.safe_load(result.stdout))


def compose_profiles() -> list[str]:
    """Every profile a service of compose.yaml declares."""
    raw = yaml.safe_load((ROOT_PATH / "compose.yaml").read_text())
    return sorted({p for service in raw["services"].values() for p in service.get("profiles", [])})


# -- env files --------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^#\s?([A-Z][A-Z0-9_]*)=(\S*)\s*$")


def env_example() -> dict[str, str]:
    """The commented assignments of .env.example (`# NAME=value`), in order."""
    lines = (ROOT_PATH / ".env.example").read_text().splitlines()
    return dict(m.groups() for line in lines if (m := _ASSIGNMENT.match(line)))


# -- what tasklane reads ----------------------------------------------------------------------


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.names.add(key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.names.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_variables() -> set[str]:
    """Every environment variable `Settings.from_env` reads."""
    env = _Recording()
    Settings.from_env(env)
    return env.names


# -- durations and the Dockerfile -------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(value: str | int | float) -> float:
    """A compose duration (`1m30s`, `50s`) or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = _DURATION.findall(value)
    assert "".join(n + u for n, u in parts) == value != "", f"not a duration: {value!r}"
    return sum(float(n) * _UNITS[u] for n, u in parts)


_SIZE = re.compile(r"(\d+)\s*([kmg]?)b?", re.IGNORECASE)


def size_bytes(value: str | int) -> int:
    """A compose byte size (`256m`, `1g`, or bytes: v2 prints them so)."""
    match = _SIZE.fullmatch(str(value).strip())
    assert match is not None, f"not a size: {value!r}"
    number, unit = match.groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def dockerfile_instructions(dockerfile: Path | str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile (a path, or its text), continuation lines
    joined."""
    text = dockerfile.read_text() if isinstance(dockerfile, Path) else dockerfile
    joined = text.replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result
