"""Service state: summary jobs, notification events seen, chat threads (mutable; not audit tables).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('chat_threads',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('patient_id', sa.String(length=200), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_chat_threads'))
    )
    with op.batch_alter_table('chat_threads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_chat_threads_created_by'), ['created_by'], unique=False)

    op.create_table('notification_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('subscription', sa.String(length=300), nullable=False),
    sa.Column('event_number', sa.BigInteger(), nullable=False),
    sa.Column('focus', sa.String(length=200), nullable=True),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notification_events')),
    sa.UniqueConstraint('subscription', 'event_number', name=op.f('uq_notification_events_subscription'))
    )
    op.create_table('summary_jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('patient_id', sa.String(length=200), nullable=False),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('focus', sa.String(length=200), nullable=True),
    sa.Column('requested_by', sa.String(length=200), nullable=True),
    sa.Column('purpose_of_use', sa.String(length=64), nullable=True),
    sa.Column('write_back', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('run_id', sa.String(length=36), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('write_back_ref', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_summary_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_summary_jobs_idempotency_key'))
    )
    with op.batch_alter_table('summary_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_summary_jobs_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_summary_jobs_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_summary_jobs_status'), ['status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('summary_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_summary_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_summary_jobs_patient_id'))
        batch_op.drop_index(batch_op.f('ix_summary_jobs_next_attempt_at'))

    op.drop_table('summary_jobs')
    op.drop_table('notification_events')
    with op.batch_alter_table('chat_threads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_chat_threads_created_by'))

    op.drop_table('chat_threads')
