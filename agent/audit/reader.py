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

from agent.audit.recorder import RUN_FINISHED
from agent.audit.tables import AuditContent, AuditEvent, AuditRun
from agent.errors import AuditError, RunNotFoundError


class TraceEvent(BaseModel):
    """One event as read back."""

    seq: int
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


def list_runs(engine: Engine, *, limit: int = 50, patient_ref: str | None = None) -> list[RunSummary]:
    """Return the newest runs first, with their derived status and event count."""
    try:
        with Session(engine) as session:
            query = select(AuditRun).order_by(AuditRun.created_at.desc()).limit(limit)
            if patient_ref:
                query = query.where(AuditRun.patient_ref == patient_ref)
            runs = session.scalars(query).all()
            summaries = []
            for run in runs:
                summaries.append(_summary(session, run))
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
    )


def load_run(engine: Engine, run_id: str, *, include_content: bool = True) -> RunTrace:
    """Return one run with its events in order.

    Args:
        engine: the trace database.
        run_id: the run to read.
        include_content: attach PHI-bearing content (prompts, outputs); metadata-only review
            passes False.

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
                    contents[row.id] = json.loads(row.body)
            events = [
                TraceEvent(
                    seq=row.seq,
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
