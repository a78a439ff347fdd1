"""How job ids reach a worker: the queue protocol, the in-process poller, and the SAQ (Redis) backend.

Where it sits: the API (and the subscription / CDS Hooks endpoints) create a job row with
:func:`agent.jobs.store.create_job`, then ``await queue.submit(job)``; the queue gets it to a
:class:`~agent.jobs.worker.JobExecutor`. The SQL row stays the source of truth for a job's state
in both backends, so losing the queue's own state (a restarted process, a flushed Redis) loses
no job: each backend re-delivers queued rows and takes back expired leases on start.

- :class:`InProcessQueue` (embedded default): an asyncio task in the same process polls the
  table every ``poll_interval_s`` for due queued jobs (``submit`` only wakes it early), claims
  up to ``concurrency`` of them and runs them as tasks; each pass also reclaims running jobs
  whose lease expired, which is how a job outlives a killed worker.
- :class:`SaqQueue` (production): ``submit`` enqueues a `saq <https://github.com/tobymao/saq>`_
  job on Redis keyed ``<job id>:<attempts so far>``. The key makes delivery idempotent per
  attempt (saq refuses a key it already holds, so a re-submission after a restart or from two
  API processes is one delivery), while a retry, which has a new attempt number, is a new saq
  job scheduled for the retry time. Retries are decided by our executor, not by saq's own retry
  mechanism (each saq job has ``retries=1``): the backoff, the permanent-error rule and the
  dead-letter state then live in one place and behave the same in both backends, and the SQL
  row always says when the next attempt is due. :func:`run_saq_worker` (``medagent worker``)
  consumes the queue; an API process with this backend only enqueues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, Protocol

from agent.errors import MedagentError
from agent.jobs.store import JobRecord, claim_next, queued_jobs, reclaim_expired
from agent.jobs.worker import DEFAULT_LEASE_S, JobExecutor, claim_uncancelled
from agent.runtime import AgentRuntime

log = logging.getLogger(__name__)

#: The saq function name a summary job is enqueued under.
SAQ_FUNCTION = "medagent_summary"
#: Extra seconds saq allows beyond ``job_timeout_s`` (our own timeout fires first and records why).
_SAQ_TIMEOUT_MARGIN_S = 30
#: How long saq keeps a finished saq job's record in Redis (ours is in SQL; this is only for inspection).
_SAQ_TTL_S = 3600


class JobQueue(Protocol):
    """Delivers queued jobs to a worker; the SQL row stays the source of truth for their state."""

    async def submit(self, job: JobRecord) -> None:
        """Hand a newly created (or requeued) job to the workers."""
        ...


class InProcessQueue:
    """Poll the jobs table and run due jobs as asyncio tasks in this process (the embedded default).

    Args:
        runtime: the process's runtime.
        lease_s: the claim lease (see :class:`~agent.jobs.worker.JobExecutor`).
        executor: runs the jobs (tests pass one with a seeded jitter source).
    """

    def __init__(
        self, runtime: AgentRuntime, *, lease_s: float = DEFAULT_LEASE_S, executor: JobExecutor | None = None
    ) -> None:
        self.runtime = runtime
        self.lease_s = lease_s
        self.executor = executor or JobExecutor(runtime, requeue=self.submit, lease_s=lease_s)
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()

    async def submit(self, job: JobRecord) -> None:
        """Wake the poller (the job is already in the table; the poller would find it anyway)."""
        self._wake.set()

    async def start(self) -> None:
        """Start polling (idempotent)."""
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="medagent-job-poller")

    async def stop(self) -> None:
        """Stop polling and stop the running attempts; their jobs go back to the queue uncounted."""
        tasks = [t for t in (self._poller, *self._running) if t is not None]
        self._poller = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    @property
    def running(self) -> int:
        """Return how many attempts this process is running now."""
        return len(self._running)

    async def _poll(self) -> None:
        jobs = self.runtime.settings.jobs
        while True:
            self._wake.clear()
            try:
                await self._pass(jobs.concurrency)
            except MedagentError as exc:
                # The database is down or not migrated: keep the API up, try again next pass.
                log.warning("job poller: %s: %s", exc.code, exc.metadata_dict()["message"])
            except Exception as exc:
                log.error("job poller: unexpected %s", type(exc).__name__)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation that
            # stops the poller when the awaited event is set at the same moment (the app then hangs)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(jobs.poll_interval_s):
                    await self._wake.wait()

    async def _pass(self, concurrency: int) -> None:
        """Reclaim expired leases, then claim due jobs while there is room."""
        engine = self.runtime.engine
        await asyncio.to_thread(self.runtime.ensure_schema)
        for lost in await asyncio.to_thread(reclaim_expired, engine):
            log.warning("job %s: lease expired, now %s (attempt %d)", lost.id, lost.status, lost.attempts)
        while len(self._running) < concurrency:
            job = await claim_uncancelled(self.runtime, lambda: claim_next(engine, lease_s=self.lease_s))
            if job is None:
                return
            task = asyncio.create_task(self.executor.run_claimed(job), name=f"medagent-job-{job.id}")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed: %s", type(task.exception()).__name__)
        # A slot is free: look for the next due job now rather than at the next poll.
        self._wake.set()


class JobQueueUnavailableError(MedagentError):
    """The queue's Redis cannot be reached (a worker refuses to start without it)."""

    code = "queue_unavailable"
    exit_code = 4
    http_status = 503


def saq_key(job: JobRecord) -> str:
    """Return the saq key of a job's next attempt: one delivery per job and attempt."""
    return f"{job.id}:{job.attempts}"


class SaqQueue:
    """Enqueue summary jobs on Redis with saq; :func:`run_saq_worker` consumes them.

    Args:
        runtime: the process's runtime (settings: ``jobs.redis_url``, ``jobs.queue_name``).
        saq_queue: an existing saq queue (tests); by default one is made from the settings.
    """

    def __init__(self, runtime: AgentRuntime, *, saq_queue: Any = None) -> None:
        from saq.queue.redis import RedisQueue  # Redis is only imported when this backend is used

        jobs = runtime.settings.jobs
        self.runtime = runtime
        self.saq = saq_queue or RedisQueue.from_url(jobs.redis_url.get_secret_value(), name=jobs.queue_name)

    async def connect(self) -> None:
        """Open the Redis connection."""
        await self.saq.connect()

    async def disconnect(self) -> None:
        """Close the Redis connection (a Redis already gone is not an error when closing)."""
        try:
            await self.saq.disconnect()
        except Exception as exc:
            log.warning("closing the Redis connection failed (%s)", type(exc).__name__)

    async def submit(self, job: JobRecord) -> None:
        """Enqueue the job's next attempt for when it is due; a Redis failure is logged, not raised.

        The job is already safe in the table, and every worker re-delivers queued rows on start
        and periodically, so an unreachable Redis delays a job instead of failing the request.
        """
        try:
            await self.enqueue(job)
        except Exception as exc:
            log.warning("job %s: could not enqueue on Redis (%s); recovery will deliver it", job.id, type(exc).__name__)

    async def enqueue(self, job: JobRecord) -> bool:
        """Enqueue the job's next attempt; False when saq already holds that attempt.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        due = job.next_attempt_at.timestamp() if job.next_attempt_at is not None else 0.0
        jobs = self.runtime.settings.jobs
        queued = await self.saq.enqueue(
            SAQ_FUNCTION,
            key=saq_key(job),
            # 0: deliver now. saq schedules by whole seconds; rounding up never delivers a job before it is due.
            scheduled=0 if due <= time.time() else math.ceil(due),
            timeout=int(jobs.job_timeout_s) + _SAQ_TIMEOUT_MARGIN_S,
            retries=1,
            ttl=_SAQ_TTL_S,
            job_id=job.id,
        )
        return queued is not None

    async def recover(self) -> int:
        """Take back expired leases and (re-)enqueue every queued job; return how many were enqueued.

        Run on start (after Redis lost its data, or the workers were all down) and periodically
        by the worker; saq's key refuses duplicates, so re-enqueueing a delivered job is harmless.
        """
        engine = self.runtime.engine
        await asyncio.to_thread(self.runtime.ensure_schema)
        await asyncio.to_thread(reclaim_expired, engine)
        count = 0
        for job in await asyncio.to_thread(queued_jobs, engine):
            if await self.enqueue(job):
                count += 1
        if count:
            log.info("saq recovery: enqueued %d queued job(s)", count)
        return count

    async def recover_or_log(self, what: str) -> None:
        """Run :meth:`recover`, logging a failure (code and message, never a job's content) instead of raising.

        Recovery is a safety net: Redis or the database being down must not stop the API from
        starting or the worker from consuming; the jobs wait safely in the table.
        """
        try:
            await self.recover()
        except MedagentError as exc:
            log.warning("%s: %s: %s", what, exc.code, exc.metadata_dict()["message"])
        except Exception as exc:
            log.warning("%s: %s", what, type(exc).__name__)


async def run_saq_worker(
    runtime: AgentRuntime,
    stop: asyncio.Event,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    saq_queue: Any = None,
    recover_every_s: float | None = None,
) -> None:
    """Consume the saq queue until ``stop`` is set, recovering lost deliveries every ``recover_every_s``.

    Args:
        runtime: the process's runtime.
        stop: set it to stop (``medagent worker`` sets it on SIGINT/SIGTERM).
        lease_s: the claim lease.
        saq_queue: an existing saq queue (tests).
        recover_every_s: how often to reclaim expired leases and re-enqueue queued jobs
            (default: half the lease, so a dead worker's job is back within 1.5 leases).
    """
    from saq import Worker
    from saq.types import Context

    queue = SaqQueue(runtime, saq_queue=saq_queue)
    executor = JobExecutor(runtime, requeue=queue.submit, lease_s=lease_s)

    async def summary(ctx: Context, *, job_id: str) -> str:
        record = await executor.execute(job_id)
        return record.status if record is not None else "not claimed"

    await queue.connect()
    try:
        await queue.saq.redis.ping()  # type: ignore[misc]  # redis-py types ping() as sync-or-async
    except Exception as exc:
        await queue.disconnect()
        where = runtime.settings.masked()["jobs"]["redis_url"]
        raise JobQueueUnavailableError(
            f"the job queue's Redis at {where} cannot be reached ({type(exc).__name__}); check jobs.redis_url"
        ) from exc
    worker: Worker[Context] = Worker(
        queue.saq,
        functions=[(SAQ_FUNCTION, summary)],
        concurrency=runtime.settings.jobs.concurrency,
        timers={"schedule": 1, "sweep": 60, "abort": 1, "worker_info": 10},
    )
    # Signals are ours to handle (medagent worker sets ``stop``), not saq's.
    worker.SIGNALS = []
    consumer = asyncio.create_task(worker.start(), name="medagent-saq-worker")
    every = recover_every_s or lease_s / 2
    try:
        while not stop.is_set() and not consumer.done():
            await queue.recover_or_log("saq recovery failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
    finally:
        await worker.stop()
        await asyncio.gather(consumer, return_exceptions=True)
        await queue.disconnect()
