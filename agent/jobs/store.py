"""Summary jobs in SQL: create (idempotently), read, claim with a lease, and move through their states.

Where it sits: the API, the subscription endpoint and CDS Hooks create jobs here; a queue backend
(:mod:`agent.jobs.queue`) delivers their ids to the worker (:mod:`agent.jobs.worker`), which moves
them through their states with the functions below. The table is the source of truth for a job's
state whatever the queue, so the API can always answer ``GET /v1/summaries/{id}`` and a job
survives a worker restart.

States: ``queued`` (waiting until ``next_attempt_at``) -> ``running`` (a worker holds a lease until
``lease_until``) -> ``done`` | ``queued`` again (a retry) | ``dead`` (every attempt failed, or a
permanent error; kept for people to look at and retry).

Concurrency: every transition is one conditional ``UPDATE ... WHERE id = ? AND status = ?`` whose
row count says whether this caller won, so several workers (threads, processes, hosts) can race
for the same job on SQLite or PostgreSQL and exactly one gets it. ``attempts`` is the fencing
token: a claim increments it, and a worker's later updates (lease renewal, done, retry, dead)
only apply while ``attempts`` still equals the value it claimed with. A worker whose lease expired
and whose job was taken over by another therefore cannot overwrite the newer attempt's outcome.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from agent.audit.tables import utcnow
from agent.jobs.tables import SummaryJob

JOB_STATES = ("queued", "running", "done", "dead")

#: How many due jobs one claim pass looks at before giving up (others may be winning them).
_CLAIM_CANDIDATES = 16

_table = SummaryJob.__table__


class JobRecord(BaseModel):
    """A summary job as the API shows it: references and state, never clinical text."""

    id: str = Field(examples=["6f1c2a5e-3b0d-4a59-9d7e-2f4b8c1e0a11"])
    patient_id: str = Field(examples=["c02b6052-1523-5c41-983c-e2e4f28a22a9"])
    trigger: str = Field(description="api, subscription or cds-hook", examples=["api"])
    status: str = Field(
        description="queued, running, done or dead (every attempt failed, or a permanent error)",
        examples=["queued"],
    )
    idempotency_key: str | None = Field(None, examples=["ehr-order-8841"])
    focus: str | None = Field(None, description="The resource that triggered it, e.g. ImagingStudy/123")
    requested_by: str | None = Field(None, description="The user (or service) that asked for it")
    purpose_of_use: str | None = Field(None, description="Recorded with the run, e.g. TREAT")
    attempts: int = Field(0, description="Attempts started so far (a claim counts one)")
    max_attempts: int = 1
    next_attempt_at: datetime | None = Field(None, description="When a queued job becomes due (UTC)")
    lease_until: datetime | None = Field(None, description="While running: until when its worker holds it (UTC)")
    run_id: str | None = Field(None, description="The trace run of the latest attempt")
    error_code: str | None = Field(None, description="The latest attempt's error code", examples=["source_unavailable"])
    error_message: str | None = Field(None, description="The latest attempt's error, safe to show (no PHI)")
    write_back: bool = False
    write_back_ref: str | None = Field(None, description="DocumentReference/id written to the FHIR server")
    created_at: datetime
    finished_at: datetime | None = None

    @field_validator("next_attempt_at", "lease_until", "created_at", "finished_at", mode="after")
    @classmethod
    def _aware_utc(cls, value: datetime | None) -> datetime | None:
        # SQLite hands timestamps back naive (every one is stored in UTC); PostgreSQL in the session's zone.
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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
    values = {column.name: getattr(row, column.name) for column in _table.columns}
    values.update(created_at=now, updated_at=now)
    return values


def _record(row: Any) -> JobRecord:
    return JobRecord.model_validate(row._asdict())


def get_job(engine: Engine, job_id: str) -> JobRecord | None:
    """Return the job, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(_table).where(SummaryJob.id == job_id)).first()
    return _record(row) if row is not None else None


def find_by_key(engine: Engine, idempotency_key: str) -> JobRecord | None:
    """Return the job created with this idempotency key, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(_table).where(SummaryJob.idempotency_key == idempotency_key)).first()
    return _record(row) if row is not None else None


def latest_done_job(engine: Engine, patient_id: str) -> JobRecord | None:
    """Return the patient's most recently finished summary job (CDS Hooks serves its answer)."""
    with engine.connect() as conn:
        row = conn.execute(
            select(_table)
            .where(SummaryJob.patient_id == patient_id, SummaryJob.status == "done")
            .order_by(SummaryJob.finished_at.desc())
            .limit(1)
        ).first()
    return _record(row) if row is not None else None


def list_jobs(
    engine: Engine, *, status: str | None = None, limit: int = 50, patient_id: str | None = None
) -> list[JobRecord]:
    """Return jobs, newest first, optionally in one state (``dead`` is the dead-letter list) or of one patient."""
    query = select(_table).order_by(SummaryJob.created_at.desc(), SummaryJob.id).limit(limit)
    if status is not None:
        query = query.where(SummaryJob.status == status)
    if patient_id is not None:
        query = query.where(SummaryJob.patient_id == patient_id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [_record(row) for row in rows]


# -- the worker's side: claim, renew, finish -------------------------------------------------------


def claim_job(engine: Engine, job_id: str, *, lease_s: float, now: datetime | None = None) -> JobRecord | None:
    """Take a due queued job for this worker: running, one more attempt, leased for ``lease_s``.

    Returns:
        The claimed job (its ``attempts`` is the fencing token for the updates below), or None
        when the job is not queued, not yet due, or another worker claimed it first.
    """
    now = now or utcnow()
    with engine.begin() as conn:
        claimed = conn.execute(
            update(SummaryJob)
            .where(SummaryJob.id == job_id, SummaryJob.status == "queued", SummaryJob.next_attempt_at <= now)
            .values(
                status="running",
                attempts=SummaryJob.attempts + 1,
                lease_until=now + timedelta(seconds=lease_s),
                updated_at=now,
            )
        ).rowcount
    return get_job(engine, job_id) if claimed == 1 else None


def due_job_ids(engine: Engine, *, now: datetime | None = None, limit: int = _CLAIM_CANDIDATES) -> list[str]:
    """Return the ids of queued jobs whose next attempt is due, oldest due first."""
    now = now or utcnow()
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(SummaryJob.id)
                .where(SummaryJob.status == "queued", SummaryJob.next_attempt_at <= now)
                .order_by(SummaryJob.next_attempt_at, SummaryJob.id)
                .limit(limit)
            )
        )


def claim_next(engine: Engine, *, lease_s: float, now: datetime | None = None) -> JobRecord | None:
    """Claim the oldest due queued job, or return None when none is due (or others won every race)."""
    for job_id in due_job_ids(engine, now=now):
        job = claim_job(engine, job_id, lease_s=lease_s, now=now)
        if job is not None:
            return job
    return None


def _fenced_update(engine: Engine, job_id: str, attempt: int, **values: Any) -> bool:
    """Apply ``values`` to a running job still held at this attempt; return whether it applied."""
    values.setdefault("updated_at", utcnow())
    with engine.begin() as conn:
        changed = conn.execute(
            update(SummaryJob)
            .where(SummaryJob.id == job_id, SummaryJob.status == "running", SummaryJob.attempts == attempt)
            .values(**values)
        ).rowcount
    return changed == 1


def renew_lease(engine: Engine, job_id: str, attempt: int, *, lease_s: float) -> bool:
    """Extend the lease of a running job; False means this worker no longer holds it."""
    return _fenced_update(engine, job_id, attempt, lease_until=utcnow() + timedelta(seconds=lease_s))


def mark_done(engine: Engine, job_id: str, attempt: int, *, run_id: str, write_back_ref: str | None = None) -> bool:
    """Record a finished job and the run whose answer is its summary; False when no longer held."""
    now = utcnow()
    return _fenced_update(
        engine,
        job_id,
        attempt,
        status="done",
        run_id=run_id,
        write_back_ref=write_back_ref,
        error_code=None,
        error_message=None,
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def schedule_retry(
    engine: Engine,
    job_id: str,
    attempt: int,
    *,
    retry_at: datetime,
    error_code: str,
    error_message: str,
    run_id: str | None,
) -> bool:
    """Put a failed attempt's job back in the queue, due at ``retry_at``; False when no longer held."""
    return _fenced_update(
        engine,
        job_id,
        attempt,
        status="queued",
        next_attempt_at=retry_at,
        lease_until=None,
        error_code=error_code,
        error_message=error_message,
        run_id=run_id,
    )


def mark_dead(
    engine: Engine, job_id: str, attempt: int, *, error_code: str, error_message: str, run_id: str | None
) -> bool:
    """Give up on a job (the dead-letter state); False when no longer held."""
    now = utcnow()
    return _fenced_update(
        engine,
        job_id,
        attempt,
        status="dead",
        lease_until=None,
        error_code=error_code,
        error_message=error_message,
        run_id=run_id,
        finished_at=now,
        updated_at=now,
    )


def release_job(engine: Engine, job_id: str, attempt: int) -> bool:
    """Hand back a job whose attempt was stopped by a worker shutting down, without counting it.

    The attempt count goes back to what it was before the claim, so the next claim reuses the
    same fencing token; that is safe because the releasing worker has already stopped the run.
    """
    return _fenced_update(
        engine,
        job_id,
        attempt,
        status="queued",
        attempts=attempt - 1,
        next_attempt_at=utcnow(),
        lease_until=None,
    )


def reclaim_expired(engine: Engine, *, now: datetime | None = None) -> list[JobRecord]:
    """Take back running jobs whose lease expired (their worker died): requeue them, or dead-letter them.

    A lost attempt counts as an attempt, so a job that kills its worker every time (say, out of
    memory) ends in the dead-letter state instead of looping. Each row is updated on the
    condition that it is still the same expired attempt, so concurrent reclaimers agree.

    Returns:
        The jobs as they are after reclaiming (queued or dead).
    """
    now = now or utcnow()
    with engine.connect() as conn:
        expired = conn.execute(
            select(SummaryJob.id, SummaryJob.attempts, SummaryJob.max_attempts).where(
                SummaryJob.status == "running", SummaryJob.lease_until < now
            )
        ).all()
    reclaimed: list[JobRecord] = []
    for job_id, attempts, max_attempts in expired:
        dead = attempts >= max_attempts
        values: dict[str, Any] = {
            "status": "dead" if dead else "queued",
            "lease_until": None,
            "error_code": "worker_lost",
            "error_message": "the worker running this attempt stopped without finishing it (lease expired)",
            "updated_at": now,
        }
        if dead:
            values["finished_at"] = now
        else:
            values["next_attempt_at"] = now
        with engine.begin() as conn:
            changed = conn.execute(
                update(SummaryJob)
                .where(
                    SummaryJob.id == job_id,
                    SummaryJob.status == "running",
                    SummaryJob.attempts == attempts,
                    SummaryJob.lease_until < now,
                )
                .values(**values)
            ).rowcount
        if changed == 1:
            job = get_job(engine, job_id)
            if job is not None:
                reclaimed.append(job)
    return reclaimed


def queued_jobs(engine: Engine, *, limit: int = 1000) -> list[JobRecord]:
    """Return queued jobs, earliest due first (a queue backend re-delivers them after losing its state)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(_table).where(SummaryJob.status == "queued").order_by(SummaryJob.next_attempt_at).limit(limit)
        ).all()
    return [_record(row) for row in rows]


def requeue_dead(engine: Engine, job_id: str, *, extra_attempts: int) -> JobRecord | None:
    """Give a dead job ``extra_attempts`` more attempts, due now (an admin's retry).

    ``attempts`` keeps counting (it is the fencing token and the job's history); the limit grows.

    Returns:
        The queued job, or None when the job is not dead (never existed, or already requeued).
    """
    now = utcnow()
    with engine.begin() as conn:
        changed = conn.execute(
            update(SummaryJob)
            .where(SummaryJob.id == job_id, SummaryJob.status == "dead")
            .values(
                status="queued",
                max_attempts=SummaryJob.attempts + extra_attempts,
                next_attempt_at=now,
                finished_at=None,
                lease_until=None,
                updated_at=now,
            )
        ).rowcount
    return get_job(engine, job_id) if changed == 1 else None
