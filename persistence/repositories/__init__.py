from persistence.repositories.agent_repository import AgentRepository
from persistence.repositories.base_repository import BaseRepository
from persistence.repositories.conversation_repository import ConversationRepository
from persistence.repositories.task_repository import TaskRepository
from persistence.repositories.worker_repository import WorkerRepository

__all__ = [
    "AgentRepository",
    "BaseRepository",
    "ConversationRepository",
    "TaskRepository",
    "WorkerRepository",
]
