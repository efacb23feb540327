"""Builds repositories bound to one session (the unit of work uses it)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from persistence.repositories import (
    AgentRepository,
    ConversationRepository,
    TaskRepository,
    WorkerRepository,
)
from persistence.repositories.report_repository import ReportRepository


class RepositoryFactory:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def create_task_repository(self) -> TaskRepository:
        return TaskRepository(self.session)

    def create_conversation_repository(self) -> ConversationRepository:
        return ConversationRepository(self.session)

    def create_agent_repository(self) -> AgentRepository:
        return AgentRepository(self.session)

    def create_worker_repository(self) -> WorkerRepository:
        return WorkerRepository(self.session)

    def create_report_repository(self) -> ReportRepository:
        return ReportRepository(self.session)


def create_task_repository(session: AsyncSession) -> TaskRepository:
    return TaskRepository(session)


def create_report_repository(session: AsyncSession) -> ReportRepository:
    return ReportRepository(session)
