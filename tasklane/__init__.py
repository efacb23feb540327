"""tasklane: background tasks for agent systems, with PostgreSQL as the record of truth.

The public API, importable from this one name whether tasklane is installed from a wheel or
run from its repository:

```python
from tasklane import PermanentError, Retry, TaskContext, agent  # writing agents
from tasklane import TaskClient, TaskSpec  # submitting tasks
```

The names are imported on first use, so `import tasklane` — which every `tasklane` command
and probe does first — stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from domain.entities import Conversation as Conversation
    from domain.entities import Task as Task
    from domain.exceptions import DomainError as DomainError
    from domain.exceptions import EntityNotFoundError as EntityNotFoundError
    from domain.exceptions import IdempotencyConflictError as IdempotencyConflictError
    from domain.exceptions import InvalidInputError as InvalidInputError
    from domain.value_objects import TaskStatus as TaskStatus
    from worker.agents import PermanentError as PermanentError
    from worker.agents import Retry as Retry
    from worker.agents import TaskContext as TaskContext
    from worker.agents import agent as agent
    from worker.client import TaskClient as TaskClient
    from worker.client import TaskSpec as TaskSpec

__all__ = [
    "Conversation",
    "DomainError",
    "EntityNotFoundError",
    "IdempotencyConflictError",
    "InvalidInputError",
    "PermanentError",
    "Retry",
    "Task",
    "TaskClient",
    "TaskContext",
    "TaskSpec",
    "TaskStatus",
    "agent",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'tasklane' has no attribute {name!r}")
    from domain import entities, exceptions, value_objects
    from worker import agents, client

    for module in (agents, client, entities, exceptions, value_objects):
        if name in vars(module):
            value = vars(module)[name]
            globals()[name] = value  # later lookups find it without coming here
            return value
    raise AttributeError(f"module 'tasklane' lists {name!r} but nothing defines it")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
