"""Read traces back: the run list and one run's ordered events.

Status is derived from the events (the last ``run_finished`` wins; none means the run is still
running or was interrupted), because the trace is never updated in place.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from agent.audit.keys import ContentCipher
from agent.audit.recorder import RUN_FINISHED
from agent.audit.tables import AuditContent, AuditEvent, AuditRun
from agent.errors import AuditError, RunNotFoundError


class TraceEvent(BaseModel):
    """One event as read back."""

    seq: int
    chain_seq: int
    hash: str
    kind: str
    name: str
    at: datetime
    duration_ms: float | None
    status: str | None
    meta: dict[str, Any]
    content: Any = None


class RunSummary(BaseModel):
    """One line of ``audit list``."""

    run_id: str
    created_at: datetime
    kind: str
    trigger: str
    patient_ref: str | None
    status: str
    events: int
    user_id: str | None = None
    user_role: str | None = None
    purpose_of_use: str | None = None
    thread_id: str | None = None


class RunTrace(BaseModel):
    """A whole run: its summary and events in order."""

    run: RunSummary
    software_version: str
    settings_fingerprint: str
    events: list[TraceEvent]


def _status_of(finished: str | None) -> str:
    return finished or "running"


def _utc(value: datetime) -> datetime:
    """Return the timestamp as aware UTC (SQLite hands back naive values; all are stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class RunFilter(BaseModel):
    """Filters of ``audit list`` (all optional, combined with AND)."""

    patient_ref: str | None = None
    user_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    trigger: str | None = None


def list_runs(
    engine: Engine, *, limit: int = 50, patient_ref: str | None = None, filters: RunFilter | None = None
) -> list[RunSummary]:
    """Return the newest runs first, with their derived status and event count."""
    filters = filters or RunFilter(patient_ref=patient_ref)
    try:
        with Session(engine) as session:
            query = select(AuditRun).order_by(AuditRun.created_at.desc())
            if filters.patient_ref:
                query = query.where(AuditRun.patient_ref == filters.patient_ref)
            if filters.user_id:
                query = query.where(AuditRun.user_id == filters.user_id)
            if filters.trigger:
                query = query.where(AuditRun.trigger == filters.trigger)
            if filters.since:
                query = query.where(AuditRun.created_at >= filters.since)
            if filters.until:
                query = query.where(AuditRun.created_at < filters.until)
            summaries = []
            # Status is derived from records, so it is filtered here rather than in SQL.
            for run in session.scalars(query):
                summary = _summary(session, run)
                if filters.status is None or summary.status == filters.status:
                    summaries.append(summary)
                    if len(summaries) >= limit:
                        break
            return summaries
    except AuditError:
        raise
    except Exception as exc:
        raise AuditError(f"cannot read the trace database: {type(exc).__name__}") from exc


def _summary(session: Session, run: AuditRun) -> RunSummary:
    count = session.scalar(select(func.count()).where(AuditEvent.run_id == run.id)) or 0
    finished = session.scalar(
        select(AuditEvent.status)
        .where(AuditEvent.run_id == run.id, AuditEvent.kind == RUN_FINISHED)
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    )
    return RunSummary(
        run_id=run.id,
        created_at=_utc(run.created_at),
        kind=run.kind,
        trigger=run.trigger,
        patient_ref=run.patient_ref,
        status=_status_of(finished),
        events=count,
        user_id=run.user_id,
        user_role=run.user_role,
        purpose_of_use=run.purpose_of_use,
        thread_id=run.thread_id,
    )


def load_run(
    engine: Engine, run_id: str, *, include_content: bool = True, cipher: ContentCipher | None = None
) -> RunTrace:
    """Return one run with its events in order.

    Args:
        engine: the trace database.
        run_id: the run to read.
        include_content: attach PHI-bearing content (prompts, outputs); metadata-only review
            passes False.
        cipher: decrypts encrypted content; without it such content reads as
            ``{"encrypted": true}``.

    Raises:
        RunNotFoundError: no such run.
        AuditError: the database cannot be read.
    """
    try:
        with Session(engine) as session:
            run = session.get(AuditRun, run_id)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id}")
            rows = session.scalars(select(AuditEvent).where(AuditEvent.run_id == run_id).order_by(AuditEvent.seq)).all()
            contents: dict[int, Any] = {}
            if include_content:
                for row in session.scalars(select(AuditContent).where(AuditContent.run_id == run_id)):
                    contents[row.id] = _decode(row, cipher)
            events = [
                TraceEvent(
                    seq=row.seq,
                    chain_seq=row.chain_seq,
                    hash=row.hash,
                    kind=row.kind,
                    name=row.name,
                    at=_utc(row.at),
                    duration_ms=row.duration_ms,
                    status=row.status,
                    meta=row.meta or {},
                    content=contents.get(row.content_id) if row.content_id else None,
                )
                for row in rows
            ]
            return RunTrace(
                run=_summary(session, run),
                software_version=run.software_version,
                settings_fingerprint=run.settings_fingerprint,
                events=events,
            )
    except (RunNotFoundError, AuditError):
        raise
    except Exception as exc:
        raise AuditError(f"cannot read the trace database: {type(exc).__name__}") from exc


def _decode(row: AuditContent, cipher: ContentCipher | None) -> Any:
    """Return a content row as JSON data, decrypting it when it is encrypted and a key is given."""
    if row.media_type == ContentCipher.media_type:
        if cipher is None:
            return {"encrypted": True}
        return json.loads(cipher.decrypt(row.body))
    return json.loads(row.body)
