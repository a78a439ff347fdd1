"""Tamper evidence: hash chain columns, run metadata, signed checkpoints, append-only triggers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Existing events (from 0001 databases) are chained in id order during the upgrade, before the
triggers that forbid UPDATE are created.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

AUDIT_TABLES = ("audit_runs", "audit_events", "audit_content", "audit_checkpoints")


def upgrade() -> None:
    with op.batch_alter_table("audit_runs") as batch:
        batch.add_column(sa.Column("user_role", sa.String(64), nullable=True))
        batch.add_column(sa.Column("purpose_of_use", sa.String(64), nullable=True))
        batch.add_column(sa.Column("thread_id", sa.String(100), nullable=True))
        batch.create_index(batch.f("ix_audit_runs_user_id"), ["user_id"], unique=False)
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("chain_seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("content_hash", sa.String(64), nullable=True))
    _backfill_chain()
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("chain_seq", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint(batch.f("uq_audit_events_chain_seq"), ["chain_seq"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    op.create_index(op.f("ix_audit_checkpoints_chain_seq"), "audit_checkpoints", ["chain_seq"], unique=False)
    _create_append_only_guards()


def _backfill_chain() -> None:
    from agent.audit.chain import GENESIS_HASH, event_hash, sha256_hex

    bind = op.get_bind()
    # Typed lightweight tables, so dates and JSON come back as Python values on every dialect.
    events = sa.table(
        "audit_events",
        sa.column("id", sa.Integer()),
        sa.column("run_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("kind", sa.String()),
        sa.column("name", sa.String()),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("duration_ms", sa.Float()),
        sa.column("status", sa.String()),
        sa.column("meta", sa.JSON()),
        sa.column("content_id", sa.Integer()),
        sa.column("chain_seq", sa.BigInteger()),
        sa.column("prev_hash", sa.String()),
        sa.column("hash", sa.String()),
        sa.column("content_hash", sa.String()),
    )
    content = sa.table("audit_content", sa.column("id", sa.Integer()), sa.column("body", sa.Text()))
    bodies = {row.id: row.body for row in bind.execute(sa.select(content.c.id, content.c.body))}
    prev = GENESIS_HASH
    rows = bind.execute(sa.select(events).order_by(events.c.id)).fetchall()
    for chain_seq, row in enumerate(rows, start=1):
        content_hash = sha256_hex(bodies[row.content_id]) if row.content_id else None
        digest = event_hash(
            chain_seq=chain_seq,
            prev_hash=prev,
            run_id=row.run_id,
            seq=row.seq,
            kind=row.kind,
            name=row.name,
            at=row.at,
            duration_ms=row.duration_ms,
            status=row.status,
            meta=row.meta or {},
            content_hash=content_hash,
        )
        bind.execute(
            events.update()
            .where(events.c.id == row.id)
            .values(chain_seq=chain_seq, prev_hash=prev, hash=digest, content_hash=content_hash)
        )
        prev = digest


def _create_append_only_guards() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE OR REPLACE FUNCTION medagent_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              RAISE EXCEPTION 'audit table % is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
            END $$
            """
        )
    for table in AUDIT_TABLES:
        if dialect == "sqlite":
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
                )
        elif dialect == "postgresql":
            op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM PUBLIC")
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION medagent_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION medagent_refuse_change()"
            )


def downgrade() -> None:
    raise NotImplementedError("the audit trail is append-only: its tamper-evidence cannot be removed by migration")
