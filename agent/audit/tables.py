"""ORM tables of the trace (SQLAlchemy 2, typed). Alembic migrations are the only way they change.

The trace is append-only by design: a run is one ``audit_runs`` row written at its start, and
everything after (node start/end, data accesses, model calls, the final status) is a new
``audit_events`` row. Content that carries PHI (question, prompts, model output, answer) lives in
``audit_content``, apart from the metadata, so metadata can be reviewed without reading PHI.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Return the current time in UTC (timezone-aware)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable migration diffs)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AuditRun(Base):
    """One run of the agent, written once when it starts."""

    __tablename__ = "audit_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    trigger: Mapped[str] = mapped_column(String(32))
    patient_ref: Mapped[str | None] = mapped_column(String(200), index=True)
    user_id: Mapped[str | None] = mapped_column(String(200), index=True)
    user_role: Mapped[str | None] = mapped_column(String(64))
    purpose_of_use: Mapped[str | None] = mapped_column(String(64))
    thread_id: Mapped[str | None] = mapped_column(String(100))
    software_version: Mapped[str] = mapped_column(String(40))
    settings_fingerprint: Mapped[str] = mapped_column(String(64))


class AuditContent(Base):
    """A piece of PHI-bearing content (JSON text), referenced by events."""

    __tablename__ = "audit_content"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("audit_runs.id"), index=True)
    media_type: Mapped[str] = mapped_column(String(80), default="application/json")
    body: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """One step of a run: ``seq`` orders it in its run, ``chain_seq`` in the whole trace.

    ``hash`` commits to every field, to the content's hash and to the previous record's hash.
    """

    __tablename__ = "audit_events"
    __table_args__ = (UniqueConstraint("run_id", "seq", name="uq_audit_events_run_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(ForeignKey("audit_runs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str | None] = mapped_column(String(32))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content_id: Mapped[int | None] = mapped_column(ForeignKey("audit_content.id"))


class AuditCheckpoint(Base):
    """A signed statement of the chain's head: truncating the tail below it is detected."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    chain_seq: Mapped[int] = mapped_column(BigInteger, index=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(Text)


#: Tables that are append-only (database triggers refuse UPDATE and DELETE).
AUDIT_TABLES = ("audit_runs", "audit_events", "audit_content", "audit_checkpoints")
