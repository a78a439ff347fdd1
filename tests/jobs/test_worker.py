"""Summary jobs end to end on the in-process backend: the real agent flow over the fixture patients, SQL
jobs and trace, fake models. Retries with backoff, the dead-letter state, permanent errors, timeouts,
idempotent delivery, concurrent workers, shutdown, a lost lease, and a job that outlives a killed worker.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from agent.audit.db import upgrade
from agent.errors import ModelUnavailableError
from agent.inference.factory import LoadedModels
from agent.jobs.queue import InProcessQueue
from agent.jobs.store import claim_job, create_job, get_job
from agent.jobs.tables import SummaryJob
from agent.jobs.worker import JobExecutor, load_summary, retry_delay_s, with_warnings
from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner
from tests.jobs.helpers import PATIENTS, SlowReasoner, job_runtime, runs_of, wait_for_job
from tests.support.servers import REPO_ROOT

CXR = PATIENTS["cxr"]["patient_id"]


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


def _finished(job: Any) -> bool:
    return job.status in ("done", "dead")


async def _run_queue(queue: InProcessQueue, runtime: Any, job_id: str, timeout_s: float = 30.0) -> Any:
    await queue.start()
    try:
        await queue.submit(get_job(runtime.engine, job_id))  # type: ignore[arg-type]
        return await wait_for_job(runtime, job_id, _finished, timeout_s=timeout_s)
    finally:
        await queue.stop()


async def test_a_job_runs_the_traced_agent_and_its_summary_stays_in_the_trace(tmp_path: Path) -> None:
    runtime = job_runtime(_sqlite(tmp_path))
    runtime.ensure_schema()
    job, _ = create_job(
        runtime.engine,
        patient_id=CXR,
        trigger="subscription",
        max_attempts=3,
        requested_by="fhir-server",
        focus="ImagingStudy/abc",
    )
    done = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert done.status == "done" and done.attempts == 1 and done.run_id and done.finished_at
    assert done.error_code is None and done.write_back_ref is None
    summary = load_summary(runtime, done.run_id)
    assert "heart failure" in summary.summary and summary.models["reasoner"] == "scripted-reasoner"
    assert [c.valid for c in summary.citations] == [True, False]
    [run] = runs_of(runtime)
    assert (run.run_id, run.status, run.trigger) == (done.run_id, "ok", "subscription")
    assert (run.user_id, run.user_role, run.purpose_of_use) == ("fhir-server", "service", "TREAT")
    # the jobs table holds references only, never the summary text
    with runtime.engine.connect() as conn:
        row = conn.execute(select(SummaryJob.__table__).where(SummaryJob.id == job.id)).one()
    assert "heart failure" not in repr(row)


async def test_a_summary_says_what_its_run_could_not_read(tmp_path: Path) -> None:
    # the imaging archive holds none of the patient's studies: the summary is written all the same,
    # and it (and the copy written back to the record) says which study was not read
    empty = tmp_path / "empty-archive"
    empty.mkdir()
    runtime = job_runtime(_sqlite(tmp_path), dicom={"dicom_dir": empty})
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="subscription", max_attempts=1)
    done = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert done.status == "done"
    summary = load_summary(runtime, done.run_id)
    [warning] = summary.warnings
    assert warning.startswith("ImagingStudy/") and "not found in the imaging source" in warning
    written = with_warnings(summary.summary, summary.warnings)
    assert written.startswith(summary.summary.rstrip()) and written.endswith(f"Not read for this summary:\n- {warning}")
    assert with_warnings("text", []) == "text"


def test_retry_delays_double_with_jitter() -> None:
    rng = random.Random(7)
    delays = [retry_delay_s(2.0, attempts, rng) for attempts in (1, 2, 3, 4)]
    for attempts, delay in zip((1, 2, 3, 4), delays, strict=True):
        nominal = 2.0 * 2 ** (attempts - 1)
        assert 0.5 * nominal <= delay <= nominal
    assert len({round(d / (2.0 * 2**i), 6) for i, d in enumerate(delays)}) == 4  # jittered, not fixed


async def test_transient_failures_are_retried_with_backoff_until_the_job_succeeds(tmp_path: Path) -> None:
    scorer, reasoner, calls = FakeScorer(), ScriptedReasoner(), []

    def flaky(_settings: Any) -> LoadedModels:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ModelUnavailableError("the model server is restarting")
        return LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False, banner=None)

    runtime = job_runtime(_sqlite(tmp_path), loader=flaky, backoff_s=0.4)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    done = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert (done.status, done.attempts, done.error_code) == ("done", 3, None)
    assert [run.status for run in runs_of(runtime)] == ["failed", "failed", "ok"]
    assert runs_of(runtime)[-1].run_id == done.run_id
    # each retry waited at least half its nominal backoff: 0.4 s, then 0.8 s
    assert calls[1] - calls[0] >= 0.2 and calls[2] - calls[1] >= 0.4


async def test_a_job_failing_every_attempt_is_dead_and_keeps_its_last_error(tmp_path: Path) -> None:
    def broken(_settings: Any) -> LoadedModels:
        raise ModelUnavailableError("the model weights are missing")

    runtime = job_runtime(_sqlite(tmp_path), loader=broken, backoff_s=0.05)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=2)
    dead = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert (dead.status, dead.attempts, dead.error_code) == ("dead", 2, "model_unavailable")
    assert dead.error_message == "the model weights are missing" and dead.finished_at is not None
    runs = runs_of(runtime)
    assert [run.status for run in runs] == ["failed", "failed"] and dead.run_id == runs[-1].run_id


async def test_a_permanent_error_is_dead_at_once_and_its_phi_message_is_withheld(tmp_path: Path) -> None:
    runtime = job_runtime(_sqlite(tmp_path))
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id="no-such-patient", trigger="api", max_attempts=3)
    dead = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert (dead.status, dead.attempts, dead.error_code) == ("dead", 1, "patient_not_found")
    assert "no-such-patient" not in (dead.error_message or "") and "withheld" in (dead.error_message or "")
    [run] = runs_of(runtime)
    assert run.status == "failed" and dead.run_id == run.run_id


async def test_an_attempt_past_the_job_timeout_is_stopped_and_counted(tmp_path: Path) -> None:
    runtime = job_runtime(_sqlite(tmp_path), reasoner=SlowReasoner(1.5), job_timeout_s=0.5)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=1)
    dead = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)

    assert (dead.status, dead.attempts, dead.error_code) == ("dead", 1, "job_timeout")
    [run] = runs_of(runtime)
    assert run.status == "cancelled"


async def test_repeated_requests_and_deliveries_run_a_job_once(tmp_path: Path) -> None:
    runtime = job_runtime(_sqlite(tmp_path))
    runtime.ensure_schema()
    job, created = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3, idempotency_key="order-1")
    again, created_again = create_job(
        runtime.engine, patient_id=CXR, trigger="api", max_attempts=3, idempotency_key="order-1"
    )
    assert created and not created_again and again.id == job.id
    queue = InProcessQueue(runtime, lease_s=5)
    await queue.start()
    try:
        for _ in range(5):
            await queue.submit(job)
        await wait_for_job(runtime, job.id, _finished)
        await asyncio.sleep(0.3)  # a few more polls: nothing else runs
    finally:
        await queue.stop()
    assert len(runs_of(runtime)) == 1


async def test_concurrent_workers_never_run_a_job_twice(db_url: str) -> None:
    upgrade(db_url)
    runtimes = [job_runtime(db_url, concurrency=2) for _ in range(3)]  # three workers, own engines
    try:
        runtimes[0].ensure_schema()
        ids = [
            create_job(runtimes[0].engine, patient_id=p["patient_id"], trigger="api", max_attempts=3)[0].id
            for p in list(PATIENTS.values()) * 2
        ][:8]
        queues = [InProcessQueue(r, lease_s=5) for r in runtimes]
        for queue in queues:
            await queue.start()
        try:
            for job_id in ids:
                await wait_for_job(runtimes[0], job_id, _finished, timeout_s=60)
        finally:
            for queue in queues:
                await queue.stop()
        jobs = [get_job(runtimes[0].engine, job_id) for job_id in ids]
        assert {(j.status, j.attempts) for j in jobs if j is not None} == {("done", 1)}
        runs = runs_of(runtimes[0])
        assert len(runs) == len(ids) and {j.run_id for j in jobs if j is not None} == {r.run_id for r in runs}
    finally:
        for runtime in runtimes:
            runtime.engine.dispose()


async def test_a_stopping_worker_hands_its_job_back_uncounted(tmp_path: Path) -> None:
    reasoner = SlowReasoner(2.0)
    runtime = job_runtime(_sqlite(tmp_path), reasoner=reasoner)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    queue = InProcessQueue(runtime, lease_s=5)
    await queue.start()
    await wait_for_job(runtime, job.id, lambda j: j.status == "running")
    await asyncio.sleep(0.3)
    await queue.stop()
    handed_back = get_job(runtime.engine, job.id)
    assert handed_back is not None and (handed_back.status, handed_back.attempts) == ("queued", 0)
    assert [run.status for run in runs_of(runtime)] == ["cancelled"]

    reasoner.delay_s = 0
    done = await _run_queue(InProcessQueue(runtime, lease_s=5), runtime, job.id)
    assert (done.status, done.attempts) == ("done", 1)


async def test_a_worker_that_lost_its_lease_stops_and_records_nothing(tmp_path: Path) -> None:
    runtime = job_runtime(_sqlite(tmp_path), reasoner=SlowReasoner(3.0))
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)
    claimed = claim_job(runtime.engine, job.id, lease_s=0.3)
    assert claimed is not None
    attempt = asyncio.create_task(JobExecutor(runtime, lease_s=0.3).run_claimed(claimed))
    await asyncio.sleep(0.2)
    with runtime.engine.begin() as conn:  # another worker took the job over (its claim bumped attempts)
        conn.execute(update(SummaryJob).where(SummaryJob.id == job.id).values(attempts=2))
    started = time.monotonic()
    after = await asyncio.wait_for(attempt, 5)
    assert time.monotonic() - started < 2.0  # stopped at the next heartbeat, not after the slow model
    assert (after.status, after.attempts, after.run_id, after.error_code) == ("running", 2, None, None)
    assert [run.status for run in runs_of(runtime)] == ["cancelled"]


def _start_worker(tmp_path: Path, db_url: str, *, delay_s: float, lease_s: float, log: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.worker_process", db_url, str(delay_s), str(lease_s)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(predicate: Any, timeout_s: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s:g} s; worker log:\n{logs.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_job_outlives_a_killed_worker_and_finishes_exactly_once(tmp_path: Path) -> None:
    db_url = _sqlite(tmp_path)
    runtime = job_runtime(db_url)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3)

    first = _start_worker(tmp_path, db_url, delay_s=120, lease_s=1.0, log="first.log")
    try:
        # mid-job: claimed, and its run has started talking to the (slow) model
        _wait(
            lambda: (j := get_job(runtime.engine, job.id)) is not None and j.status == "running" and runs_of(runtime),
            90,
            "the first worker claiming the job",
            tmp_path / "first.log",
        )
        time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed = get_job(runtime.engine, job.id)
    assert killed is not None and (killed.status, killed.attempts) == ("running", 1)

    second = _start_worker(tmp_path, db_url, delay_s=0, lease_s=1.0, log="second.log")
    try:
        _wait(
            lambda: (j := get_job(runtime.engine, job.id)) is not None and j.status == "done",
            90,
            "the second worker finishing the job",
            tmp_path / "second.log",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(20)
    assert code == 0  # a clean stop on SIGTERM

    done = get_job(runtime.engine, job.id)
    assert done is not None and (done.status, done.attempts) == ("done", 2)
    runs = runs_of(runtime)
    # the killed attempt's run is closed as interrupted; exactly one run finished, and it is the job's
    assert sorted(run.status for run in runs) == ["interrupted", "ok"]
    assert [run.run_id for run in runs if run.status == "ok"] == [done.run_id]
