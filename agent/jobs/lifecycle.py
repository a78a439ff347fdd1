"""Start and stop the configured job queue with the API, and run a standalone worker (``medagent worker``).

Where it sits: the app's lifespan (:func:`agent.service.app.create_app`) enters
:func:`run_job_queue` and stores what it yields as ``app.state.job_queue``; routes submit jobs to
it. With ``jobs.backend = "inprocess"`` the API process also runs the jobs (a poller task over
the SQL table); with ``"saq"`` it only enqueues them on Redis, and separate ``medagent worker``
processes (:func:`run_worker`) run them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.jobs.queue import InProcessQueue, JobQueue, SaqQueue, run_saq_worker
from agent.jobs.worker import DEFAULT_LEASE_S
from agent.runtime import AgentRuntime

log = logging.getLogger(__name__)


@asynccontextmanager
async def run_job_queue(runtime: AgentRuntime, *, lease_s: float = DEFAULT_LEASE_S) -> AsyncIterator[JobQueue]:
    """Yield the queue the API submits jobs to, for as long as the app runs.

    The in-process backend starts its poller here and stops it (handing running jobs back) on
    exit. The SAQ backend connects to Redis and re-enqueues queued jobs (recovery after Redis
    lost its data); an unreachable Redis or database is logged, not fatal, so the API still
    starts and the jobs it accepts wait safely in the table.
    """
    if runtime.settings.jobs.backend == "saq":
        saq_queue = SaqQueue(runtime)
        await saq_queue.connect()
        await saq_queue.recover_or_log("job queue recovery skipped")
        try:
            yield saq_queue
        finally:
            await saq_queue.disconnect()
        return
    queue = InProcessQueue(runtime, lease_s=lease_s)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


async def run_worker(runtime: AgentRuntime, stop: asyncio.Event, *, lease_s: float = DEFAULT_LEASE_S) -> None:
    """Run the configured backend's worker until ``stop`` is set; running jobs are handed back on stop.

    Args:
        runtime: the process's runtime.
        stop: set it to stop (the CLI sets it on SIGINT/SIGTERM).
        lease_s: the claim lease; a job of a killed worker is taken back after it.
    """
    if runtime.settings.jobs.backend == "saq":
        await run_saq_worker(runtime, stop, lease_s=lease_s)
        return
    queue = InProcessQueue(runtime, lease_s=lease_s)
    await queue.start()
    try:
        await stop.wait()
    finally:
        await queue.stop()
