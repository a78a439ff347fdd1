"""What every router of the API shares: the process's runtime as a dependency, and error responses.

Kept apart from :mod:`agent.service.app` so routers can import it without importing the app.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from agent.errors import MedagentError
from agent.jobs.queue import JobQueue
from agent.runtime import AgentRuntime
from agent.service.schemas import Problem

PROBLEM_JSON = "application/problem+json"

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": Problem, "description": text}
    for status, text in (
        (401, "No valid credentials"),
        (403, "The caller lacks the role"),
        (404, "Not found"),
        (422, "Invalid request"),
        (429, "Too many requests (per-key rate limit)"),
        (502, "A source failed"),
        (503, "Unavailable"),
    )
}


def get_runtime(request: Request) -> AgentRuntime:
    """Return the process's runtime (a FastAPI dependency)."""
    runtime: AgentRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[AgentRuntime, Depends(get_runtime)]


class QueueNotRunningError(MedagentError):
    """The app's job queue is not running (the app was not started with its lifespan)."""

    code = "queue_not_running"
    exit_code = 1
    http_status = 503


def get_job_queue(request: Request) -> JobQueue:
    """Return the running job queue (a FastAPI dependency).

    Raises:
        QueueNotRunningError: the app's lifespan has not started it.
    """
    queue: JobQueue | None = getattr(request.app.state, "job_queue", None)
    if queue is None:
        raise QueueNotRunningError("the job queue is not running")
    return queue


JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
