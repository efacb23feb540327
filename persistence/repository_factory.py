"""Builds repositories bound to one executor (a unit of work uses it)."""

from __future__ import annotations

from persistence.repositories import (
    AgentRepository,
    ConversationRepository,
    TaskRepository,
    WorkerRepository,
)
from persistence.repositories.audit_repository import AuditRepository
from persistence.repositories.dashboard_repository import DashboardRepository
from persistence.repositories.flow_repository import FlowRepository
from persistence.repositories.report_repository import ReportRepository
from persistence.sql import Executor


class RepositoryFactory:
    def __init__(self, ex: Executor) -> None:
        self.ex = ex

    def create_task_repository(self) -> TaskRepository:
        return TaskRepository(self.ex)

    def create_conversation_repository(self) -> ConversationRepository:
        return ConversationRepository(self.ex)

    def create_agent_repository(self) -> AgentRepository:
        return AgentRepository(self.ex)

    def create_worker_repository(self) -> WorkerRepository:
        return WorkerRepository(self.ex)

    def create_report_repository(self) -> ReportRepository:
        return ReportRepository(self.ex)

    def create_flow_repository(self) -> FlowRepository:
        return FlowRepository(self.ex)

    def create_dashboard_repository(self) -> DashboardRepository:
        return DashboardRepository(self.ex)

    def create_audit_repository(self) -> AuditRepository:
        return AuditRepository(self.ex)
