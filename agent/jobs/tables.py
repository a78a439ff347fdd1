"""ORM tables of the service's working state: summary jobs and FHIR notification events.

Unlike the trace these rows change (a job goes queued -> running -> done/dead), so they are kept
out of the append-only audit tables; every run a job starts is still traced in full there. A job
row holds references only (patient id, focus, run id), never clinical text: the summary itself is
the run's answer, stored (and encrypted, when configured) as trace content.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from agent.audit.tables import Base, utcnow


class SummaryJob(Base):
    """One requested summary of a patient, and where its delivery stands."""

    __tablename__ = "summary_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    patient_id: Mapped[str] = mapped_column(String(200), index=True)
    trigger: Mapped[str] = mapped_column(String(32))
    focus: Mapped[str | None] = mapped_column(String(200))
    requested_by: Mapped[str | None] = mapped_column(String(200))
    purpose_of_use: Mapped[str | None] = mapped_column(String(64))
    write_back: Mapped[bool] = mapped_column(default=False)
    #: queued, running, done or dead (failed on every attempt; kept for people to look at)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    #: while running: until when the worker holds it; a restarted worker takes back expired leases
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run_id: Mapped[str | None] = mapped_column(String(36))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    write_back_ref: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NotificationEvent(Base):
    """One FHIR subscription event seen (subscription + event number), so a redelivery is ignored."""

    __tablename__ = "notification_events"
    __table_args__ = (UniqueConstraint("subscription", "event_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription: Mapped[str] = mapped_column(String(300))
    event_number: Mapped[int] = mapped_column(BigInteger)
    focus: Mapped[str | None] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(36))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ChatThread(Base):
    """A conversation about one patient, owned by the user who opened it (its turns are in the checkpointer)."""

    __tablename__ = "chat_threads"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
