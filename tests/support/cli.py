"""`tasklane` run in this process: much faster than a subprocess, for property tests that run
the CLI hundreds of times. Output is read through pytest's capsys; the environment through
monkeypatch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog

from tests.support.workers import settings_env
from worker.cli import main
from worker.config import Settings


@dataclass(frozen=True)
class Output:
    code: int
    stdout: str
    stderr: str

    @property
    def explained(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Output:
    """`tasklane ARGV` (call it through asyncio.to_thread from a test's event loop: commands run
    their own). What was captured before is dropped."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: usage errors and --help
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return Output(code, out, err)


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings, **extra: str) -> None:
    """The environment `tasklane` reads, set to `settings` (and `extra`)."""
    for name, value in settings_env(settings, extra).items():
        monkeypatch.setenv(name, value)


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Logging as it was before the block (`main` and a worker configure it for the process)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def one_line(output: Output) -> Any:
    """The single line of stderr (an error must be exactly one line)."""
    lines = output.stderr.splitlines()
    assert len(lines) == 1, output.explained
    assert "Traceback" not in output.stderr, output.explained
    return lines[0]
