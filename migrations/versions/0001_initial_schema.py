"""Initial schema: conversations, agents, workers, tasks and task_attempts.

The schema of docs/architecture.md. Server defaults everywhere a producer using plain SQL relies on
them; partial indexes for the hot queries (dispatch scan, pending per agent, expired leases,
children of a parent).

Revision ID: 0001
Revises:
Create Date: 2026-11-26 05:12:40.779644
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('agents',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('max_attempts', sa.Integer(), nullable=True),
    sa.Column('timeout_seconds', sa.Double(), nullable=True),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_agents'))
    )
    op.create_table('conversations',
    sa.Column('id', sa.Uuid(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('user_id', sa.Text(), nullable=False),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations'))
    )
    op.create_index(op.f('ix_conversations_user_id'), 'conversations', ['user_id'], unique=False)
    op.create_table('workers',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('hostname', sa.Text(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('agents', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_index(op.f('ix_workers_last_seen_at'), 'workers', ['last_seen_at'], unique=False)
    op.create_table('tasks',
    sa.Column('id', sa.Uuid(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('conversation_id', sa.Uuid(), nullable=False),
    sa.Column('parent_task_id', sa.Uuid(), nullable=True),
    sa.Column('agent_id', sa.Text(), nullable=False),
    sa.Column('queue', sa.Text(), server_default=sa.text("'tasklane'"), nullable=False),
    sa.Column('status', sa.Text(), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('input', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('output', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=True),
    sa.Column('run_after', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('worker_id', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('idempotency_key', sa.Text(), nullable=True),
    sa.Column('runs', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('step', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('dispatch_after', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('version', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled')", name=op.f('ck_tasks_status')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_tasks_attempts_not_negative')),
    sa.CheckConstraint('length(btrim(agent_id)) > 0', name=op.f('ck_tasks_agent_id_not_blank')),
    sa.CheckConstraint('max_attempts IS NULL OR attempts <= max_attempts', name=op.f('ck_tasks_attempts_within_max')),
    sa.CheckConstraint('max_attempts IS NULL OR max_attempts >= 1', name=op.f('ck_tasks_max_attempts_positive')),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_tasks_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_task_id'], ['tasks.id'], name=op.f('fk_tasks_parent_task_id_tasks'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_tasks_idempotency_key'))
    )
    op.create_index('ix_tasks_conversation', 'tasks', ['conversation_id', 'created_at'], unique=False)
    op.create_index('ix_tasks_dispatch', 'tasks', ['queue', sa.literal_column('greatest(run_after, dispatch_after)')], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_tasks_parent', 'tasks', ['parent_task_id', 'created_at'], unique=False, postgresql_where=sa.text('parent_task_id IS NOT NULL'))
    op.create_index('ix_tasks_pending_agent', 'tasks', ['agent_id', 'created_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_tasks_running_lease', 'tasks', ['lease_expires_at'], unique=False, postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_tasks_status_created', 'tasks', ['status', 'created_at'], unique=False)
    op.create_table('task_attempts',
    sa.Column('task_id', sa.Uuid(), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.CheckConstraint("outcome IS NULL OR outcome IN ('completed', 'failed', 'retry', 'waiting', 'released', 'lost', 'cancelled')", name=op.f('ck_task_attempts_outcome')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_attempts_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('task_id', 'run', name=op.f('pk_task_attempts'))
    )


def downgrade() -> None:
    op.drop_table('task_attempts')
    op.drop_index('ix_tasks_status_created', table_name='tasks')
    op.drop_index('ix_tasks_running_lease', table_name='tasks', postgresql_where=sa.text("status = 'running'"))
    op.drop_index('ix_tasks_pending_agent', table_name='tasks', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_tasks_parent', table_name='tasks', postgresql_where=sa.text('parent_task_id IS NOT NULL'))
    op.drop_index('ix_tasks_dispatch', table_name='tasks', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_tasks_conversation', table_name='tasks')
    op.drop_table('tasks')
    op.drop_index(op.f('ix_workers_last_seen_at'), table_name='workers')
    op.drop_table('workers')
    op.drop_index(op.f('ix_conversations_user_id'), table_name='conversations')
    op.drop_table('conversations')
    op.drop_table('agents')
