"""The jobs table's state machine on SQLite and PostgreSQL: idempotency, claims, leases, fencing, dead letters."""

from __future__ import annotations

import threading
from datetime import UTC, timedelta

import pytest
from sqlalchemy import Engine

from agent.audit.db import upgrade
from agent.audit.tables import utcnow
from agent.jobs.store import (
    claim_job,
    claim_next,
    create_job,
    get_job,
    latest_done_job,
    list_jobs,
    mark_dead,
    mark_done,
    queued_jobs,
    reclaim_expired,
    release_job,
    renew_lease,
    requeue_dead,
    schedule_retry,
)
from tests.support.databases import EngineFactory


@pytest.fixture
def engine(db_url: str, new_engine: EngineFactory) -> Engine:
    upgrade(db_url)
    return new_engine(db_url)


def _job(engine: Engine, patient: str = "p1", **kwargs: object) -> str:
    job, created = create_job(engine, patient_id=patient, trigger="api", max_attempts=3, **kwargs)  # type: ignore[arg-type]
    assert created
    return job.id


def test_same_idempotency_key_gives_the_same_job(engine: Engine) -> None:
    first, created = create_job(engine, patient_id="p1", trigger="api", max_attempts=3, idempotency_key="k-1")
    again, created_again = create_job(engine, patient_id="p1", trigger="api", max_attempts=3, idempotency_key="k-1")
    other, _ = create_job(engine, patient_id="p1", trigger="api", max_attempts=3, idempotency_key="k-2")
    assert created and not created_again
    assert again.id == first.id and other.id != first.id
    assert len(list_jobs(engine)) == 2
    assert first.status == "queued" and first.attempts == 0
    assert first.created_at.tzinfo is not None and first.next_attempt_at is not None
    assert first.next_attempt_at.utcoffset() == timedelta(0)


def test_a_claim_takes_a_due_job_once_and_counts_the_attempt(engine: Engine) -> None:
    job_id = _job(engine)
    claimed = claim_job(engine, job_id, lease_s=30)
    assert claimed is not None and claimed.status == "running" and claimed.attempts == 1
    assert claimed.lease_until is not None and claimed.lease_until > utcnow() + timedelta(seconds=25)
    assert claim_job(engine, job_id, lease_s=30) is None  # already running
    assert claim_next(engine, lease_s=30) is None


def test_concurrent_claims_never_hand_out_a_job_twice(engine: Engine) -> None:
    ids = {_job(engine, patient=f"p{i}") for i in range(24)}
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker() -> None:
        start.wait()
        while (job := claim_next(engine, lease_s=30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert {job.attempts for job in list_jobs(engine)} == {1}


def test_a_retry_is_not_due_before_its_time(engine: Engine) -> None:
    job_id = _job(engine)
    claimed = claim_job(engine, job_id, lease_s=30)
    assert claimed is not None
    retry_at = utcnow() + timedelta(seconds=60)
    assert schedule_retry(
        engine, job_id, 1, retry_at=retry_at, error_code="source_unavailable", error_message="down", run_id="r1"
    )
    queued = get_job(engine, job_id)
    assert queued is not None and queued.status == "queued" and queued.error_code == "source_unavailable"
    assert queued.run_id == "r1" and queued.lease_until is None
    assert claim_next(engine, lease_s=30) is None
    assert claim_next(engine, lease_s=30, now=retry_at + timedelta(seconds=1)) is not None


def test_an_expired_lease_is_taken_back_and_the_old_worker_is_fenced_off(engine: Engine) -> None:
    job_id = _job(engine)
    first = claim_job(engine, job_id, lease_s=30)
    assert first is not None and renew_lease(engine, job_id, first.attempts, lease_s=30)
    assert reclaim_expired(engine) == []  # lease still valid
    later = utcnow() + timedelta(seconds=31)
    [reclaimed] = reclaim_expired(engine, now=later)
    assert reclaimed.status == "queued" and reclaimed.error_code == "worker_lost"
    second = claim_next(engine, lease_s=30, now=later)
    assert second is not None and second.attempts == 2
    # the first worker wakes up: none of its updates apply any more
    assert not renew_lease(engine, job_id, first.attempts, lease_s=30)
    assert not mark_done(engine, job_id, first.attempts, run_id="stale")
    assert mark_done(engine, job_id, second.attempts, run_id="fresh", write_back_ref="DocumentReference/1")
    done = get_job(engine, job_id)
    assert done is not None and done.status == "done" and done.run_id == "fresh"
    assert done.finished_at is not None and done.error_code is None
    assert latest_done_job(engine, "p1") == done


def test_a_lost_last_attempt_is_dead_and_an_admin_can_requeue_it(engine: Engine) -> None:
    job, _ = create_job(engine, patient_id="p1", trigger="api", max_attempts=1)
    assert claim_job(engine, job.id, lease_s=1) is not None
    assert requeue_dead(engine, job.id, extra_attempts=2) is None  # running, not dead
    [dead] = reclaim_expired(engine, now=utcnow() + timedelta(seconds=5))
    assert dead.status == "dead" and dead.finished_at is not None
    assert [j.id for j in list_jobs(engine, status="dead")] == [job.id]
    requeued = requeue_dead(engine, job.id, extra_attempts=2)
    assert requeued is not None and requeued.status == "queued"
    assert (requeued.attempts, requeued.max_attempts) == (1, 3)  # history kept, allowance grown
    assert requeue_dead(engine, job.id, extra_attempts=2) is None
    assert claim_next(engine, lease_s=30) is not None


def test_dead_and_release(engine: Engine) -> None:
    dead_id, released_id = _job(engine, "p1"), _job(engine, "p2")
    assert claim_job(engine, dead_id, lease_s=30) is not None
    assert mark_dead(engine, dead_id, 1, error_code="patient_not_found", error_message="withheld", run_id="r")
    assert not mark_dead(engine, dead_id, 1, error_code="x", error_message="x", run_id=None)  # not running
    assert claim_job(engine, released_id, lease_s=30) is not None
    assert release_job(engine, released_id, 1)
    released = get_job(engine, released_id)
    assert released is not None and released.status == "queued" and released.attempts == 0
    assert [j.id for j in queued_jobs(engine)] == [released_id]
    assert [j.id for j in list_jobs(engine, patient_id="p1")] == [dead_id]
    assert list_jobs(engine, status="done") == []
    assert all(j.created_at.tzinfo == UTC for j in list_jobs(engine))
