"""The dashboard in compose.yaml and the image: published on the host's loopback only, its token
a secret file, the web extra installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.deployment import ROOT_PATH, compose_config, dockerfile_instructions
from worker.web.auth import read_token


@pytest.fixture(scope="module")
def web_service() -> dict[str, Any]:
    config = compose_config()
    return {"service": config["services"]["web"], "secrets": config["secrets"]}


def test_the_web_service_is_published_on_the_hosts_loopback_only(
    web_service: dict[str, Any],
) -> None:
    service = web_service["service"]
    assert service["command"][:2] == ["tasklane", "web"]
    [port] = service["ports"]
    published = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
    assert published.startswith("127.0.0.1:"), port
    assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_its_token_is_a_secret_file_that_tasklane_web_accepts(web_service: dict[str, Any]) -> None:
    service = web_service["service"]
    assert {s["source"] for s in service["secrets"]} == {"database_url", "redis_url", "web_token"}
    assert service["environment"]["TASKLANE_WEB_TOKEN_FILE"] == "/run/secrets/web_token"
    assert "TASKLANE_WEB_TOKEN" not in service["environment"]
    token_file = Path(web_service["secrets"]["web_token"]["file"])
    assert read_token({"TASKLANE_WEB_TOKEN_FILE": str(token_file)})


def test_the_image_installs_the_web_extra() -> None:
    syncs = [
        args
        for word, args in dockerfile_instructions(ROOT_PATH / "Dockerfile")
        if word == "RUN" and "uv sync" in args
    ]
    assert syncs
    assert all("--extra web" in args for args in syncs)
