"""The `tasklane` command (the console script installed with the package)."""

from worker.cli import main

__all__ = ["main"]
