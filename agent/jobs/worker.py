"""Run one summary job: claim it, ask the agent for the summary, write it back, and record the outcome.

Where it sits: a queue backend (:mod:`agent.jobs.queue`) hands a job to :class:`JobExecutor`,
either by id (SAQ: :meth:`JobExecutor.execute` claims it) or already claimed (the in-process
poller: :meth:`JobExecutor.run_claimed`). The executor runs :func:`agent.runner.run_ask` with the
configured summary question (so every attempt is a fully traced run), optionally writes the
summary to the FHIR server (:mod:`agent.jobs.writeback`), and moves the SQL row to ``done``,
back to ``queued`` for a retry, or to ``dead``. The summary text itself is never copied into
the jobs table: it is the run's answer, kept (encrypted when configured) in the trace, and
:func:`load_summary` reads it back from there.

Retries: a failed attempt is retried after ``backoff_s * 2**(attempts-1)`` seconds with jitter
(between half and all of that), until ``max_attempts`` attempts were made; then the job is dead.
A permanent error goes dead at once, without using the remaining attempts: any
:class:`~agent.errors.MedagentError` whose ``http_status`` is below 500, other than 429 (rate
limited) and 499 (cancelled) — for example ``patient_not_found``, ``patient_ambiguous``,
``config_invalid``, ``write_back_unsupported`` or ``write_back_rejected`` — because the same
request would fail the same way again. Server-side and transient errors (``source_unavailable``,
``model_unavailable``, ``audit_unavailable``, ``write_back_failed``, ``job_timeout``, internal
errors) are retried.

Leases: while an attempt runs, its lease is renewed every third of ``lease_s``. A worker that
dies stops renewing; another worker takes the job back once the lease expired
(:func:`agent.jobs.store.reclaim_expired`). A worker that finds it lost its lease (it stalled
and the job was taken over) cancels its attempt, and its late updates are ignored (the attempt
count is the fencing token). A worker that is shut down cancels its attempt and hands the job
back uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from agent.audit.reader import RunTrace, load_run
from agent.audit.recorder import NOTE
from agent.audit.replay import replay
from agent.audit.tables import utcnow
from agent.domain.answer import Citation
from agent.errors import InternalError, MedagentError
from agent.jobs.store import (
    JobRecord,
    claim_job,
    get_job,
    mark_dead,
    mark_done,
    release_job,
    renew_lease,
    schedule_retry,
)
from agent.jobs.writeback import SummaryToWrite, check_write_back_possible, write_back_summary
from agent.runner import run_ask
from agent.runtime import AgentRuntime

log = logging.getLogger(__name__)

#: How long a claim holds a job without a heartbeat; a dead worker's job is taken back after this.
DEFAULT_LEASE_S = 30.0
#: Roles a run is recorded under, by trigger: machine triggers act as the service.
SERVICE_TRIGGERS = frozenset({"subscription", "cds-hook"})
#: Error codes after which the run itself succeeded and only the write-back is left to do.
_WRITE_BACK_ONLY = frozenset({"write_back_failed"})
_MAX_ERROR_CHARS = 500

Requeue = Callable[[JobRecord], Awaitable[None]]
WriteBack = Callable[..., Awaitable[str]]


class JobTimeoutError(MedagentError):
    """An attempt ran past ``jobs.job_timeout_s`` and was stopped (retried like any transient failure)."""

    code = "job_timeout"
    exit_code = 1
    http_status = 504


class SummaryIncompleteError(MedagentError):
    """The run ended without an answer (for example it stopped to ask a question nobody can answer)."""

    code = "summary_incomplete"
    exit_code = 1
    http_status = 500


class JobSummary(BaseModel):
    """A finished job's summary as the trace holds it: the run's answer, citations and models."""

    run_id: str
    summary: str = Field(description="The summary text (the run's answer, dangling citations removed)")
    citations: list[Citation] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict, description="Role -> model id used for the run")
    readable: bool = Field(True, description="False when the trace content could not be read (no key)")
    warnings: list[str] = Field(
        default_factory=list, description="What the run could not read and went on without (its trace's warnings)"
    )


def load_summary(runtime: AgentRuntime, run_id: str) -> JobSummary:
    """Read a job's summary back from its run's trace (decrypted with the runtime's content key).

    Raises:
        RunNotFoundError: no such run.
        AuditError: the trace cannot be read.
    """
    trace = load_run(runtime.engine, run_id, include_content=True, cipher=runtime.cipher)
    replayed = replay(trace)
    return JobSummary(
        run_id=run_id,
        summary=replayed.answer,
        citations=replayed.citations,
        models=replayed.models,
        readable=replayed.answer_source not in ("unavailable",),
        warnings=run_warnings(trace),
    )


def run_warnings(trace: RunTrace) -> list[str]:
    """Return the warnings a run recorded (``warning`` notes: metadata, never clinical text), in order."""
    return [str(e.meta.get("message")) for e in trace.events if e.kind == NOTE and e.name == "warning"]


def with_warnings(text: str, warnings: list[str]) -> str:
    """Return a summary's text with what its run could not read, so the record's copy says it too."""
    if not warnings:
        return text
    return text.rstrip() + "\n\nNot read for this summary:\n" + "\n".join(f"- {warning}" for warning in warnings)


def is_permanent(error: MedagentError) -> bool:
    """Return whether retrying cannot help: a client-side (4xx-class) error other than 429 and 499."""
    return error.http_status < 500 and error.http_status not in (429, 499)


def retry_delay_s(backoff_s: float, attempts: int, rng: random.Random) -> float:
    """Return the wait before the next attempt: ``backoff_s * 2**(attempts-1)``, jittered to 50-100 %.

    The jitter keeps jobs that failed together (a FHIR server outage) from all retrying at once.
    """
    nominal = backoff_s * 2 ** max(attempts - 1, 0)
    return float(nominal * (0.5 + 0.5 * rng.random()))


def _safe_message(error: MedagentError) -> str:
    """Return the message kept in the jobs table: never one that may name a patient."""
    message = str(error.metadata_dict()["message"])
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


class JobExecutor:
    """Run claimed summary jobs and record their outcome in the jobs table.

    Args:
        runtime: the process's runtime (trace engine, models, settings).
        requeue: called with a job put back in the queue for a retry (SAQ schedules its delivery;
            the in-process poller just wakes up).
        lease_s: how long a claim holds a job between heartbeats.
        rng: the jitter source (tests pass a seeded one).
        write_back: the write-back function (tests may wrap it); defaults to
            :func:`agent.jobs.writeback.write_back_summary`.
    """

    def __init__(
        self,
        runtime: AgentRuntime,
        *,
        requeue: Requeue | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        rng: random.Random | None = None,
        write_back: WriteBack | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.runtime = runtime
        self.lease_s = lease_s
        self._requeue = requeue
        self._rng = rng or random.Random()
        self._write_back = write_back or write_back_summary

    async def execute(self, job_id: str) -> JobRecord | None:
        """Claim a job by id and run it; None when it was not due, not queued, or claimed by another worker."""
        job = await claim_uncancelled(
            self.runtime, lambda: claim_job(self.runtime.engine, job_id, lease_s=self.lease_s)
        )
        if job is None:
            return None
        return await self.run_claimed(job)

    async def run_claimed(self, job: JobRecord) -> JobRecord:
        """Run one attempt of a job this worker has claimed and record its outcome.

        Returns:
            The job as the table holds it afterwards.

        Raises:
            asyncio.CancelledError: the worker is shutting down; the job was handed back uncounted.
        """
        engine = self.runtime.engine
        attempt = asyncio.create_task(self._attempt(job), name=f"summary-job-{job.id}")
        heartbeat = asyncio.create_task(self._heartbeat(job))
        timeout = self.runtime.settings.jobs.job_timeout_s
        try:
            done, _ = await asyncio.wait({attempt, heartbeat}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Shutting down: the job goes back to the queue, and this attempt does not count.
            await _cancel(attempt)
            await _cancel(heartbeat)
            release_job(engine, job.id, job.attempts)
            log.info("summary job %s: attempt %d handed back (worker stopping)", job.id, job.attempts)
            raise
        await _cancel(heartbeat)
        if attempt not in done:
            await _cancel(attempt)
            if heartbeat in done:
                log.warning("summary job %s: attempt %d lost its lease and was stopped", job.id, job.attempts)
            else:
                await self._failed(job, JobTimeoutError(f"the attempt ran past jobs.job_timeout_s ({timeout:g} s)"))
        else:
            await self._record(job, attempt)
        current = await asyncio.to_thread(get_job, engine, job.id)
        assert current is not None
        return current

    async def _record(self, job: JobRecord, attempt: asyncio.Task[tuple[str, str | None]]) -> None:
        """Record the outcome of a finished attempt."""
        try:
            run_id, reference = attempt.result()
        except MedagentError as exc:
            await self._failed(job, exc)
            return
        except Exception as exc:
            # Type only: an exception's text can quote clinical data, and logs and the table hold no PHI.
            log.error("summary job %s: attempt %d failed: %s", job.id, job.attempts, type(exc).__name__)
            await self._failed(job, InternalError(f"internal error ({type(exc).__name__}); see the worker log"))
            return
        done = await asyncio.to_thread(
            mark_done, self.runtime.engine, job.id, job.attempts, run_id=run_id, write_back_ref=reference
        )
        if done:
            log.info("summary job %s: done on attempt %d", job.id, job.attempts)
        else:
            log.warning("summary job %s: finished attempt %d after losing its lease", job.id, job.attempts)

    async def _heartbeat(self, job: JobRecord) -> None:
        """Renew the lease every third of ``lease_s``; return when another worker has taken the job."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                held = await asyncio.to_thread(
                    renew_lease, self.runtime.engine, job.id, job.attempts, lease_s=self.lease_s
                )
            except Exception as exc:
                # A database hiccup: keep running; the next beat tries again before the lease ends.
                log.warning("summary job %s: lease renewal failed (%s)", job.id, type(exc).__name__)
                continue
            if not held:
                return

    async def _attempt(self, job: JobRecord) -> tuple[str, str | None]:
        """Produce the summary (or reuse the last attempt's, when only its write-back failed) and write it back."""
        settings = self.runtime.settings
        if job.write_back:
            check_write_back_possible(settings.fhir)
        summary: JobSummary | None = None
        if job.write_back and job.run_id and job.error_code in _WRITE_BACK_ONLY:
            summary = await asyncio.to_thread(self._reusable_summary, job.run_id)
        if summary is None:
            service = job.trigger in SERVICE_TRIGGERS
            result = await run_ask(
                self.runtime,
                patient_id=job.patient_id,
                question=settings.jobs.summary_question,
                trigger=job.trigger,
                user_id=job.requested_by,
                user_role="service" if service else "clinician",
                purpose_of_use=job.purpose_of_use or "TREAT",
            )
            if result.status != "ok":
                raise SummaryIncompleteError(
                    f"the run ended {result.status} without a summary", details={"run_id": result.run_id}
                )
            summary = JobSummary(
                run_id=result.run_id,
                summary=result.answer,
                citations=result.citations,
                models=result.models,
                warnings=result.warnings,
            )
        if not job.write_back:
            return summary.run_id, None
        try:
            reference = await self._write_back(
                settings.fhir,
                SummaryToWrite(
                    patient_id=job.patient_id,
                    run_id=summary.run_id,
                    text=with_warnings(summary.summary, summary.warnings),
                    models=summary.models,
                    cited=[c.reference for c in summary.citations if c.valid],
                    requested_by=job.requested_by,
                    purpose_of_use=job.purpose_of_use or "TREAT",
                    focus=job.focus,
                ),
            )
        except MedagentError as exc:
            exc.details.setdefault("run_id", summary.run_id)
            raise
        return summary.run_id, reference

    def _reusable_summary(self, run_id: str) -> JobSummary | None:
        """Return the summary of an earlier successful run of this job, when its trace is readable."""
        try:
            summary = load_summary(self.runtime, run_id)
        except MedagentError:
            return None
        return summary if summary.readable and summary.summary else None

    async def _failed(self, job: JobRecord, error: MedagentError) -> None:
        """Record a failed attempt: a retry with backoff, or the dead-letter state."""
        engine = self.runtime.engine
        jobs = self.runtime.settings.jobs
        run_id = error.details.get("run_id")
        message = _safe_message(error)
        if is_permanent(error) or job.attempts >= job.max_attempts:
            why = "permanent error" if is_permanent(error) else f"{job.attempts} attempts"
            applied = await asyncio.to_thread(
                mark_dead, engine, job.id, job.attempts, error_code=error.code, error_message=message, run_id=run_id
            )
            if applied:
                log.warning("summary job %s: dead after attempt %d (%s, %s)", job.id, job.attempts, error.code, why)
            return
        retry_at = utcnow() + timedelta(seconds=retry_delay_s(jobs.backoff_s, job.attempts, self._rng))
        applied = await asyncio.to_thread(
            schedule_retry,
            engine,
            job.id,
            job.attempts,
            retry_at=retry_at,
            error_code=error.code,
            error_message=message,
            run_id=run_id,
        )
        if not applied:
            return
        log.info("summary job %s: attempt %d failed (%s), retry at %s", job.id, job.attempts, error.code, retry_at)
        if self._requeue is not None:
            queued = await asyncio.to_thread(get_job, engine, job.id)
            if queued is not None:
                await self._requeue(queued)


async def claim_uncancelled(runtime: AgentRuntime, claim: Callable[[], JobRecord | None]) -> JobRecord | None:
    """Run a claim in a thread; if the caller is cancelled meanwhile, hand a job it got back at once.

    Without this, a worker stopped during a claim would leave the job running under a lease
    nobody renews, delaying it until the lease expires and counting an attempt it never made.
    """
    pending = asyncio.ensure_future(asyncio.to_thread(claim))
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        job = await pending
        if job is not None:
            release_job(runtime.engine, job.id, job.attempts)
        raise


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has really stopped (its run records itself as cancelled)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
