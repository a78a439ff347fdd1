"""Summaries over HTTP: queue a patient summary, read it when done, list and retry dead jobs.

Where it sits: the API face of the durable summary jobs (:mod:`agent.jobs`). ``POST`` creates a
job row (idempotently, by key) and submits it to the app's queue, answering at once with 202 and
the job; the queue's worker runs the traced agent with the configured summary question and may
write the result back to the FHIR server. ``GET`` reads the job, and once it is done the summary
from its run's trace (the jobs table never holds clinical text). Dead jobs (every attempt
failed, or a permanent error) stay listed for people to look at, and an admin can requeue them.

Roles: clinicians and services request and read summaries; reading the summary text needs the
clinician or service role (an auditor or admin may read the job's metadata with
``content=false``); the dead-letter list is for clinicians and admins; retrying is for admins.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

from fastapi import APIRouter, Body, Header, Path, Query, Response

from agent.errors import MedagentError
from agent.jobs.store import JobRecord, create_job, get_job, list_jobs, requeue_dead
from agent.jobs.worker import load_summary
from agent.jobs.writeback import check_write_back_possible
from agent.runner import patient_reference
from agent.runtime import AgentRuntime
from agent.service.auth import Principal, PrincipalDep, require
from agent.service.content_reads import record_content_read
from agent.service.deps import ERROR_RESPONSES, JobQueueDep, RuntimeDep
from agent.service.schemas import Problem
from agent.service.summary_schemas import IDEMPOTENCY_KEY_PATTERN, JobStatus, SummaryJobView, SummaryRequest

router = APIRouter(tags=["summaries"])

_PATIENT_ID_PATTERN = r"^([A-Za-z0-9\-.]{1,64}|identifier=[^,\\$\s]{1,240})$"
_JOB_ID_PATTERN = r"^[0-9a-fA-F\-]{36}$"

PatientIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=256,
        pattern=_PATIENT_ID_PATTERN,
        description="The patient's FHIR logical id (or identifier=SYSTEM|VALUE when the system has no '/').",
        examples=["c02b6052-1523-5c41-983c-e2e4f28a22a9"],
    ),
]
JobIdPath = Annotated[
    str,
    Path(
        pattern=_JOB_ID_PATTERN, description="The summary job's id.", examples=["6f1c2a5e-3b0d-4a59-9d7e-2f4b8c1e0a11"]
    ),
]


class SummaryJobNotFoundError(MedagentError):
    """No summary job has this id."""

    code = "summary_not_found"
    exit_code = 3
    http_status = 404


class IdempotencyConflictError(MedagentError):
    """The idempotency key was already used for a different request, or body and header disagree."""

    code = "idempotency_conflict"
    exit_code = 2
    http_status = 409


class JobNotDeadError(MedagentError):
    """Only a dead job can be retried; this one is queued, running or done."""

    code = "job_not_dead"
    exit_code = 2
    http_status = 409


def _scoped_key(principal: Principal, key: str) -> str:
    """Return the stored key: scoped to the caller, so one caller's keys never find another's jobs."""
    who = hashlib.sha256(principal.user.encode("utf-8")).hexdigest()[:16]
    return f"api:{who}:{key}"


def _idempotency_key(body: SummaryRequest | None, header: str | None) -> str | None:
    """Return the client's key from the body or the header (they must agree when both are sent)."""
    from_body = body.idempotency_key if body is not None else None
    if from_body is not None and header is not None and from_body != header:
        raise IdempotencyConflictError("the Idempotency-Key header and the body's idempotency_key differ")
    return from_body or header


def _job_or_404(runtime: AgentRuntime, job_id: str) -> JobRecord:
    runtime.ensure_schema()
    job = get_job(runtime.engine, job_id)
    if job is None:
        raise SummaryJobNotFoundError(f"no summary job with id {job_id}")
    return job


@router.post(
    "/v1/patients/{patient_id}/summaries",
    response_model=JobRecord,
    status_code=202,
    responses={
        **ERROR_RESPONSES,
        200: {"model": JobRecord, "description": "The job an earlier request with the same idempotency key created"},
        202: {"model": JobRecord, "description": "Queued; poll the Location header's URL"},
        409: {
            "model": Problem,
            "description": "Idempotency key reused for another patient, or write-back without a FHIR server",
        },
    },
)
async def request_summary(
    patient_id: PatientIdPath,
    runtime: RuntimeDep,
    queue: JobQueueDep,
    principal: PrincipalDep,
    response: Response,
    body: Annotated[SummaryRequest | None, Body()] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Same as the body's idempotency_key.",
        ),
    ] = None,
) -> JobRecord:
    """Queue a summary of the patient's record; answer at once with the job (202) and its URL.

    Needs the clinician or service role. The job runs the agent with the configured summary
    question (a fully traced run, recorded under the caller and their purpose of use,
    ``X-Purpose-Of-Use``, default TREAT), retries transient failures with backoff, and can write
    the summary back to the FHIR server. With an idempotency key already used by this caller for
    the same patient, the earlier job is returned with 200 instead (whatever its state); used
    for another patient, the request is refused with 409. Keys are scoped to the caller: the
    job's ``idempotency_key`` shows the key with that scope as a prefix.
    """
    require(principal, "clinician", "service")
    key = _idempotency_key(body, idempotency_key)
    asked = body.write_back if body is not None else None
    write_back = runtime.settings.jobs.write_back if asked is None else asked
    if write_back:
        check_write_back_possible(runtime.settings.fhir)
    await asyncio.to_thread(runtime.ensure_schema)
    job, created = await asyncio.to_thread(
        create_job,
        runtime.engine,
        patient_id=patient_id,
        trigger="api",
        max_attempts=runtime.settings.jobs.max_attempts,
        idempotency_key=_scoped_key(principal, key) if key is not None else None,
        requested_by=principal.user,
        purpose_of_use=principal.purpose_of_use or "TREAT",
        write_back=write_back,
    )
    if not created and job.patient_id != patient_id:
        raise IdempotencyConflictError("this idempotency key was already used for another patient's summary")
    response.headers["Location"] = f"/v1/summaries/{job.id}"
    if created:
        await queue.submit(job)
    else:
        response.status_code = 200
    return job


@router.get("/v1/summaries/{job_id}", response_model=SummaryJobView, responses=ERROR_RESPONSES)
async def read_summary(
    job_id: JobIdPath,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    content: Annotated[
        bool, Query(description="Include the summary text and citations (clinician or service role).")
    ] = True,
) -> SummaryJobView:
    """Return a summary job; once it is done, with the summary, its citations, the run id and the models.

    The summary is read from the run's trace (decrypted when the trace is encrypted). Reading it
    needs the clinician or service role; auditors and admins may read the job alone with
    ``content=false``.
    """
    require(principal, "clinician", "service", "auditor", "admin")
    if content:
        require(principal, "clinician", "service")
    job = await asyncio.to_thread(_job_or_404, runtime, job_id)
    view = SummaryJobView(**job.model_dump())
    if content and job.status == "done" and job.run_id:
        patient = patient_reference(job.patient_id)
        await record_content_read(runtime, principal, run_id=job.run_id, patient_ref=patient, what="summary")
        summary = await asyncio.to_thread(load_summary, runtime, job.run_id)
        view.summary = summary.summary
        view.citations = summary.citations
        view.models = summary.models
        view.summary_readable = summary.readable
        view.warnings = summary.warnings
    return view


@router.get("/v1/summaries", response_model=list[JobRecord], responses=ERROR_RESPONSES)
async def list_summaries(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    status: Annotated[
        JobStatus | None, Query(description="Only jobs in this state; 'dead' is the dead-letter list.")
    ] = None,
    patient: Annotated[str | None, Query(pattern=_PATIENT_ID_PATTERN, description="Only this patient's jobs.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many, newest first.")] = 50,
) -> list[JobRecord]:
    """List summary jobs, newest first, by state and patient (clinician or admin); no summary text.

    ``status=dead`` is the dead-letter view: jobs whose every attempt failed, or that failed with
    a permanent error, with the last error's code and message and the run id to look up.
    """
    require(principal, "clinician", "admin")
    await asyncio.to_thread(runtime.ensure_schema)
    return await asyncio.to_thread(list_jobs, runtime.engine, status=status, limit=limit, patient_id=patient)


@router.post(
    "/v1/summaries/{job_id}/retry",
    response_model=JobRecord,
    status_code=202,
    responses={
        **ERROR_RESPONSES,
        409: {"model": Problem, "description": "The job is not dead"},
    },
)
async def retry_summary(
    job_id: JobIdPath, runtime: RuntimeDep, queue: JobQueueDep, principal: PrincipalDep, response: Response
) -> JobRecord:
    """Requeue a dead job with a fresh allowance of attempts (admin); answer with the queued job (202).

    The attempt count keeps counting (the job's history stays visible); ``max_attempts`` grows
    by the configured ``jobs.max_attempts``.
    """
    require(principal, "admin")
    job = await asyncio.to_thread(_job_or_404, runtime, job_id)
    requeued = await asyncio.to_thread(
        requeue_dead, runtime.engine, job.id, extra_attempts=runtime.settings.jobs.max_attempts
    )
    if requeued is None:
        now = await asyncio.to_thread(_job_or_404, runtime, job_id)  # it may have changed meanwhile
        raise JobNotDeadError(f"summary job {job_id} is {now.status}; only a dead job can be retried")
    await queue.submit(requeued)
    response.headers["Location"] = f"/v1/summaries/{requeued.id}"
    return requeued
