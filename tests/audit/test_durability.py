"""Concurrency, crashes and privileges: the chain stays valid under load, after SIGKILL, and for a limited role."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from agent.audit.db import grant_append_only, upgrade
from agent.audit.keys import verifiers_for
from agent.audit.reader import list_runs, load_run
from agent.audit.recovery import mark_interrupted_runs
from agent.audit.verify import verify_trace
from agent.config import PROJECT_ROOT
from tests.audit.trace_builder import SIGNER, record_run, rows
from tests.support.databases import EngineFactory, fresh_postgres_database

WRITER = textwrap.dedent(
    """
    import sys, time
    from agent.audit.db import make_engine
    from tests.audit.trace_builder import record_run
    url, runs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    engine = make_engine(url)
    if mode == "hang":
        recorder = record_run(engine, "killed", finish=False)
        print("READY", recorder.run_id, flush=True)
        time.sleep(600)
    for i in range(runs):
        record_run(engine, f"p{i}")
    print("DONE", flush=True)
    """
)


def _writer(url: str, runs: int, mode: str = "write") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(runs), mode],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_threads_recording_at_once_keep_one_valid_chain(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(5):
                record_run(engine, f"t{worker}-{i}", checkpoint_every=7)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = verify_trace(engine, verifiers=verifiers_for(SIGNER))
    assert report.ok, report.problems
    assert report.records == 6 * 5 * 7 and report.runs == 30
    chain = [r.chain_seq for r in rows(engine, "SELECT chain_seq FROM audit_events ORDER BY chain_seq")]
    assert chain == list(range(1, len(chain) + 1))


@pytest.mark.slow
def test_processes_recording_at_once_keep_one_valid_chain(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    writers = [_writer(db_url, 4) for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert all(w.returncode == 0 for w in writers) and all("DONE" in out for out in outputs)
    report = verify_trace(new_engine(db_url), verifiers=verifiers_for(SIGNER))
    assert report.ok, report.problems
    assert report.runs == 12 and report.records == 12 * 7


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_and_is_marked_interrupted(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    record_run(engine, "before")
    writer = _writer(db_url, 0, "hang")
    assert writer.stdout is not None
    line = writer.stdout.readline().split()
    assert line[0] == "READY"
    run_id = line[1]
    committed = len(load_run(engine, run_id).events)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdout.close()

    assert load_run(engine, run_id).run.status == "running"
    marked = mark_interrupted_runs(engine, signer=SIGNER)
    assert marked == [run_id]
    trace = load_run(engine, run_id)
    assert trace.run.status == "interrupted"
    assert len(trace.events) == committed + 1  # every committed record kept, one new record added
    assert "killed or crashed" in trace.events[-1].meta["reason"]
    assert verify_trace(engine, verifiers=verifiers_for(SIGNER)).ok
    assert mark_interrupted_runs(engine, signer=SIGNER) == []  # idempotent
    assert {r.status for r in list_runs(engine)} == {"ok", "interrupted"}


def test_a_live_run_is_not_marked_interrupted(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    recorder = record_run(engine, "alive", finish=False)  # this very process is alive
    assert mark_interrupted_runs(engine, signer=SIGNER) == []
    assert load_run(engine, recorder.run_id).run.status == "running"


@pytest.mark.postgres
def test_postgres_app_role_can_append_but_not_alter(new_engine: EngineFactory) -> None:
    with fresh_postgres_database() as db_url:
        _check_app_role(db_url, new_engine)


def _check_app_role(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    record_run(engine, "x")
    role = f"medagent_app_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE ROLE "{role}" NOLOGIN'))
        grant_append_only(engine, role)
        with engine.begin() as conn:
            conn.execute(text(f'SET LOCAL ROLE "{role}"'))
            conn.execute(text("SELECT count(*) FROM audit_events"))
            conn.execute(
                text("INSERT INTO audit_content (run_id, media_type, body) SELECT id, 'x', 'y' FROM audit_runs LIMIT 1")
            )
        for statement in ("UPDATE audit_events SET name = 'x'", "DELETE FROM audit_runs", "TRUNCATE audit_checkpoints"):
            # with the triggers disabled too, the role's missing privilege still refuses it
            with pytest.raises(DBAPIError, match="permission denied"), engine.begin() as conn:
                conn.execute(text("SET LOCAL session_replication_role = replica"))
                conn.execute(text(f'SET LOCAL ROLE "{role}"'))
                conn.execute(text(statement))
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()
