"""What the job tests share: a runtime over the fixture patients with fake models, and waiting for a job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agent.audit.reader import RunSummary, list_runs
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.inference.factory import LoadedModels
from agent.inference.protocols import GenerationRequest, GenerationResult
from agent.jobs.store import JobRecord, get_job
from agent.runtime import AgentRuntime, ModelCache
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner

__all__ = ["PATIENTS", "SlowReasoner", "job_runtime", "runs_of", "wait_for_job"]


class SlowReasoner(ScriptedReasoner):
    """The scripted reasoner, taking ``delay_s`` per call (a job that is still running when a test acts)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def generate(self, request: GenerationRequest) -> GenerationResult:
        time.sleep(self.delay_s)
        return super().generate(request)


def job_runtime(
    db_url: str,
    *,
    reasoner: Any = None,
    loader: Callable[[Any], LoadedModels] | None = None,
    fhir: dict[str, Any] | None = None,
    dicom: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
    **jobs: Any,
) -> AgentRuntime:
    """Return a runtime over the fixture patients with fast job timings (overridable via ``jobs``)."""
    settings = get_settings(
        fhir=fhir or {"bundle_dir": DEFAULT_FIXTURES / "fhir"},
        dicom=dicom or {"dicom_dir": DEFAULT_FIXTURES / "dicom"},
        db={"url": db_url},
        jobs={"poll_interval_s": 0.05, "backoff_s": 0.2, **jobs},
        service=service,
    )
    scorer, reasoner = FakeScorer(), reasoner or ScriptedReasoner()
    loader = loader or (lambda _s: LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False, banner=None))
    return AgentRuntime(settings=settings, models=ModelCache(loader=loader))


async def wait_for_job(
    runtime: AgentRuntime, job_id: str, until: Callable[[JobRecord], bool], *, timeout_s: float = 30.0
) -> JobRecord:
    """Poll the jobs table until ``until(job)`` holds; fail with the job's last state after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await asyncio.to_thread(get_job, runtime.engine, job_id)
        assert job is not None
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not get there in {timeout_s:g} s; last state: {job.model_dump()}")
        await asyncio.sleep(0.05)


def runs_of(runtime: AgentRuntime) -> list[RunSummary]:
    """Return every traced run, oldest first, with its status derived from the trace."""
    return list(reversed(list_runs(runtime.engine, limit=500)))
