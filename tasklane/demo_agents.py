"""The built-in demo agents by a name that works installed and in the repository:
`TASKLANE_AGENTS=tasklane.demo_agents` (the default). Importing this module registers them."""

from worker.demo_agents import echo, fail, fanout, sleep, square

__all__ = ["echo", "fail", "fanout", "sleep", "square"]
