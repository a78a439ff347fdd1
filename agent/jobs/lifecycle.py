"""(being built) Start and stop the configured job queue (and, in process, its worker) with the API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.jobs.queue import JobQueue
from agent.jobs.store import JobRecord
from agent.runtime import AgentRuntime


class _PollingQueue:
    async def submit(self, job: JobRecord) -> None:
        return None


@asynccontextmanager
async def run_job_queue(runtime: AgentRuntime) -> AsyncIterator[JobQueue]:
    """Yield the queue the API submits jobs to, for as long as the app runs."""
    yield _PollingQueue()
