"""The static gates, run as part of the suite so that one command checks everything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.databases import ROOT

pytestmark = pytest.mark.gates


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),  # strict, over domain, persistence and worker (pyproject.toml)
        ("lint-imports",),  # worker → persistence → domain; domain is stdlib only
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict", "import-contracts"],
)
def test_gate(command: tuple[str, ...]) -> None:
    result = (
        _run(sys.executable, "-m", *command)
        if command[0] != "lint-imports"
        else _run("lint-imports")
    )
    assert result.returncode == 0, result.stdout + result.stderr
