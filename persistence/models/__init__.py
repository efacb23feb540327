"""ORM models. Importing this package registers every table on `Base.metadata`."""

from persistence.models.agent_model import AgentModel
from persistence.models.audit_model import AuditModel
from persistence.models.base import Base
from persistence.models.conversation_model import ConversationModel
from persistence.models.flow_model import FlowKeyModel, FlowLimitModel, PauseModel
from persistence.models.schema_model import SchemaModel
from persistence.models.signal_model import SignalModel
from persistence.models.sweeper_model import SweeperModel
from persistence.models.task_attempt_model import TaskAttemptModel
from persistence.models.task_model import TaskModel
from persistence.models.worker_model import WorkerModel

__all__ = [
    "AgentModel",
    "AuditModel",
    "Base",
    "ConversationModel",
    "FlowKeyModel",
    "FlowLimitModel",
    "PauseModel",
    "SchemaModel",
    "SignalModel",
    "SweeperModel",
    "TaskAttemptModel",
    "TaskModel",
    "WorkerModel",
]
