"""`arq tasklane.settings.WorkerSettings`: the worker through arq's own CLI.

Importing this module reads the environment and imports the agent modules (see
`worker.settings`); the name works installed and in the repository alike.
"""

from worker.settings import WorkerSettings

__all__ = ["WorkerSettings"]
