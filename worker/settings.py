"""`arq worker.settings.WorkerSettings`: the worker configured from the environment.

Kept apart from `worker.app` because reading it has a side effect arq needs and nobody else
wants: the environment is read and the agent modules imported when this module is imported.
"""

from __future__ import annotations

import sys
from typing import Any

from worker.app import worker_options
from worker.config import ConfigError, Settings


def _options_from_env() -> dict[str, Any]:
    try:
        return worker_options(Settings.from_env())
    except (ConfigError, ImportError) as exc:
        print(f"tasklane worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class WorkerSettings:
    """Read by arq: every attribute is a keyword argument of `arq.worker.Worker`."""

    locals().update(_options_from_env())
