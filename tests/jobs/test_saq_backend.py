"""The SAQ backend against the real Redis on 127.0.0.1:6379: delivery, dedup, retries, recovery.

Each test uses its own queue name and deletes its keys afterwards. Without Redis the tests are
skipped loudly outside CI and fail in CI, like the other live-server tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agent.errors import ModelUnavailableError
from agent.inference.factory import LoadedModels
from agent.jobs.lifecycle import run_job_queue
from agent.jobs.queue import JobQueueUnavailableError, SaqQueue, run_saq_worker, saq_key
from agent.jobs.store import claim_job, create_job, get_job
from agent.runtime import AgentRuntime
from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner
from tests.jobs.helpers import PATIENTS, job_runtime, runs_of, wait_for_job

REDIS_URL = os.environ.get("MEDAGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CXR = PATIENTS["cxr"]["patient_id"]


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    """Yield a queue name of this test's own; delete every key saq made for it afterwards."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        message = f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must not skip Redis tests")
        pytest.skip(f"SKIPPING REDIS TESTS: {message}")
    name = f"medagent-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        for pattern in (f"saq:{name}:*", f"saq:job:{name}:*"):
            keys = [key async for key in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
        await client.aclose()


def _runtime(tmp_path: Path, queue_name: str, **kwargs: Any) -> AgentRuntime:
    return job_runtime(
        f"sqlite:///{tmp_path / 'jobs.db'}", backend="saq", redis_url=REDIS_URL, queue_name=queue_name, **kwargs
    )


async def _with_worker(runtime: AgentRuntime, **kwargs: Any) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(run_saq_worker(runtime, stop, lease_s=2.0, **kwargs))


async def _stop(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 15)


def _finished(job: Any) -> bool:
    return job.status in ("done", "dead")


async def test_the_api_side_only_enqueues_and_a_key_is_delivered_once(tmp_path: Path, queue_name: str) -> None:
    runtime = _runtime(tmp_path, queue_name)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    async with run_job_queue(runtime) as queue:
        assert isinstance(queue, SaqQueue)
        # the lifespan's recovery already enqueued the queued row; submitting again is a no-op
        assert await queue.enqueue(job) is False
        await queue.submit(job)
        assert await queue.saq.count("queued") == 1
        stored = await queue.saq.job(saq_key(job))
        assert stored is not None and stored.kwargs == {"job_id": job.id} and stored.retries == 1
    await asyncio.sleep(0.3)
    still = get_job(runtime.engine, job.id)
    assert still is not None and still.status == "queued"  # nothing runs jobs in the API process
    assert runs_of(runtime) == []


async def test_a_worker_runs_submitted_jobs_exactly_once(tmp_path: Path, queue_name: str) -> None:
    runtime = _runtime(tmp_path, queue_name, concurrency=2)
    runtime.ensure_schema()
    stop, worker = await _with_worker(runtime)
    try:
        api_side = SaqQueue(_runtime(tmp_path, queue_name))  # another process's connection
        await api_side.connect()
        ids = []
        for patient in PATIENTS.values():
            job, _ = create_job(runtime.engine, patient_id=patient["patient_id"], trigger="api", max_attempts=3)
            await api_side.submit(job)
            await api_side.submit(job)  # a duplicate delivery
            ids.append(job.id)
        await api_side.disconnect()
        jobs = [await wait_for_job(runtime, job_id, _finished) for job_id in ids]
    finally:
        await _stop(stop, worker)
    assert {(j.status, j.attempts) for j in jobs} == {("done", 1)}
    assert sorted(r.run_id for r in runs_of(runtime)) == sorted(str(j.run_id) for j in jobs)


async def test_a_retry_is_a_new_saq_job_scheduled_by_our_backoff(tmp_path: Path, queue_name: str) -> None:
    scorer, reasoner, calls = FakeScorer(), ScriptedReasoner(), []

    def flaky(_settings: Any) -> LoadedModels:
        calls.append(1)
        if len(calls) == 1:
            raise ModelUnavailableError("the model server is restarting")
        return LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False, banner=None)

    runtime = _runtime(tmp_path, queue_name, loader=flaky, backoff_s=1.0)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    stop, worker = await _with_worker(runtime)
    try:
        queued = await wait_for_job(runtime, job.id, lambda j: j.attempts == 1 and j.status == "queued")
        assert queued.error_code == "model_unavailable" and queued.next_attempt_at is not None
        queue = SaqQueue(runtime)
        scheduled = await queue.saq.job(saq_key(queued))  # "<id>:1", waiting for the retry time
        assert scheduled is not None and scheduled.scheduled >= int(queued.next_attempt_at.timestamp())
        done = await wait_for_job(runtime, job.id, _finished)
        first = await queue.saq.job(f"{job.id}:0")
        assert first is not None and first.status == "complete"  # saq did not retry; our executor did
        await queue.disconnect()
    finally:
        await _stop(stop, worker)
    assert (done.status, done.attempts) == ("done", 2)
    assert [r.status for r in runs_of(runtime)] == ["failed", "ok"]


async def test_a_worker_recovers_jobs_redis_never_had_and_expired_leases(tmp_path: Path, queue_name: str) -> None:
    runtime = _runtime(tmp_path, queue_name)
    runtime.ensure_schema()
    # queued while Redis was down (or flushed): only the SQL row exists
    lost, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    # claimed by a worker that died: running, with a lease that runs out
    orphan, _ = create_job(runtime.engine, patient_id=PATIENTS["noimg"]["patient_id"], trigger="api", max_attempts=3)
    assert claim_job(runtime.engine, orphan.id, lease_s=0.2) is not None
    await asyncio.sleep(0.3)
    stop, worker = await _with_worker(runtime)
    try:
        recovered = await wait_for_job(runtime, lost.id, _finished)
        taken_back = await wait_for_job(runtime, orphan.id, _finished)
    finally:
        await _stop(stop, worker)
    assert (recovered.status, recovered.attempts) == ("done", 1)
    assert (taken_back.status, taken_back.attempts) == ("done", 2)


async def test_an_unreachable_redis_does_not_fail_the_request(
    tmp_path: Path, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = job_runtime(
        f"sqlite:///{tmp_path / 'jobs.db'}",
        backend="saq",
        redis_url="redis://:sekret@127.0.0.1:1/0",
        queue_name=queue_name,
    )
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    queue = SaqQueue(runtime)
    await queue.connect()
    with caplog.at_level(logging.WARNING, logger="agent.jobs.queue"):
        await queue.submit(job)
    await queue.disconnect()
    assert "recovery will deliver it" in caplog.text
    still = get_job(runtime.engine, job.id)
    assert still is not None and still.status == "queued"
    # a worker, on the other hand, refuses to start, with a clear error that keeps the password out
    with pytest.raises(JobQueueUnavailableError, match="cannot be reached") as refused:
        await run_saq_worker(runtime, asyncio.Event())
    assert "sekret" not in refused.value.message and "127.0.0.1:1" in refused.value.message
