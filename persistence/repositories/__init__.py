"""The repositories. Each is imported on first use: the CLI's read commands and `submit` import
only the plain-SQL ones (`report_repository`, `task_sql`; for `submit`, `task_insert_repository`
and `conversation_repository`), never the ORM the others are built on."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persistence.repositories.agent_repository import AgentRepository as AgentRepository
    from persistence.repositories.base_repository import BaseRepository as BaseRepository
    from persistence.repositories.conversation_repository import (
        ConversationRepository as ConversationRepository,
    )
    from persistence.repositories.task_repository import TaskRepository as TaskRepository
    from persistence.repositories.worker_repository import WorkerRepository as WorkerRepository

_MODULES = {
    "AgentRepository": "agent_repository",
    "BaseRepository": "base_repository",
    "ConversationRepository": "conversation_repository",
    "TaskRepository": "task_repository",
    "WorkerRepository": "worker_repository",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
