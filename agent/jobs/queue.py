"""(being built) How job ids reach a worker: the protocol every queue backend implements."""

from __future__ import annotations

from typing import Protocol

from agent.jobs.store import JobRecord


class JobQueue(Protocol):
    """Delivers queued jobs to a worker; the SQL row stays the source of truth for their state."""

    async def submit(self, job: JobRecord) -> None:
        """Hand a newly created job to the workers (a no-op for a queue that polls the table)."""
        ...
