"""Summary jobs in SQL: create (idempotently), read, and find a patient's latest finished summary.

Where it sits: the API, the subscription endpoint and CDS Hooks create jobs here; a queue backend
(:mod:`agent.jobs.queue`) delivers their ids to the worker, which moves them through their states.
The table is the source of truth for a job's state whatever the queue, so the API can always
answer ``GET /v1/summaries/{id}`` and a job survives a worker restart.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from agent.audit.tables import utcnow
from agent.jobs.tables import SummaryJob

JOB_STATES = ("queued", "running", "done", "dead")


class JobRecord(BaseModel):
    """A summary job as the API shows it: references and state, never clinical text."""

    id: str
    patient_id: str
    trigger: str = Field(description="api, subscription or cds-hook")
    status: str = Field(description="queued, running, done or dead (every attempt failed)")
    idempotency_key: str | None = None
    focus: str | None = Field(None, description="The resource that triggered it, e.g. ImagingStudy/123")
    requested_by: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    next_attempt_at: datetime | None = None
    run_id: str | None = Field(None, description="The trace run of the latest attempt")
    error_code: str | None = None
    error_message: str | None = None
    write_back: bool = False
    write_back_ref: str | None = Field(None, description="DocumentReference/id written to the FHIR server")
    created_at: datetime
    finished_at: datetime | None = None


def create_job(
    engine: Engine,
    *,
    patient_id: str,
    trigger: str,
    max_attempts: int,
    idempotency_key: str | None = None,
    focus: str | None = None,
    requested_by: str | None = None,
    purpose_of_use: str | None = None,
    write_back: bool = False,
) -> tuple[JobRecord, bool]:
    """Queue a summary job; with an idempotency key already used, return that job instead.

    Returns:
        The job, and whether it was created now (False: an earlier job with the same key).
    """
    if idempotency_key is not None:
        existing = find_by_key(engine, idempotency_key)
        if existing is not None:
            return existing, False
    row = SummaryJob(
        id=str(uuid.uuid4()),
        idempotency_key=idempotency_key,
        patient_id=patient_id,
        trigger=trigger,
        focus=focus,
        requested_by=requested_by,
        purpose_of_use=purpose_of_use,
        write_back=write_back,
        status="queued",
        attempts=0,
        max_attempts=max_attempts,
        next_attempt_at=utcnow(),
    )
    try:
        with engine.begin() as conn:
            conn.execute(insert(SummaryJob).values(**_columns(row)))
    except IntegrityError:
        # another request with the same key won the race: theirs is the job
        if idempotency_key is None:
            raise
        existing = find_by_key(engine, idempotency_key)
        if existing is None:
            raise
        return existing, False
    job = get_job(engine, row.id)
    assert job is not None
    return job, True


def _columns(row: SummaryJob) -> dict[str, object]:
    now = utcnow()
    values = {column.name: getattr(row, column.name) for column in SummaryJob.__table__.columns}
    values.update(created_at=now, updated_at=now)
    return values


def get_job(engine: Engine, job_id: str) -> JobRecord | None:
    """Return the job, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(SummaryJob.__table__).where(SummaryJob.id == job_id)).first()
    return JobRecord.model_validate(row._asdict()) if row is not None else None


def find_by_key(engine: Engine, idempotency_key: str) -> JobRecord | None:
    """Return the job created with this idempotency key, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(SummaryJob.__table__).where(SummaryJob.idempotency_key == idempotency_key)).first()
    return JobRecord.model_validate(row._asdict()) if row is not None else None


def latest_done_job(engine: Engine, patient_id: str) -> JobRecord | None:
    """Return the patient's most recently finished summary job (CDS Hooks serves its answer)."""
    with engine.connect() as conn:
        row = conn.execute(
            select(SummaryJob.__table__)
            .where(SummaryJob.patient_id == patient_id, SummaryJob.status == "done")
            .order_by(SummaryJob.finished_at.desc())
            .limit(1)
        ).first()
    return JobRecord.model_validate(row._asdict()) if row is not None else None


def list_jobs(engine: Engine, *, status: str | None = None, limit: int = 50) -> list[JobRecord]:
    """Return jobs, newest first, optionally in one state (``dead`` is the dead-letter list)."""
    query = select(SummaryJob.__table__).order_by(SummaryJob.created_at.desc()).limit(limit)
    if status is not None:
        query = query.where(SummaryJob.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [JobRecord.model_validate(row._asdict()) for row in rows]
