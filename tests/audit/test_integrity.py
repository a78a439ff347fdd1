"""Tamper evidence, on SQLite and PostgreSQL: every kind of tampering is detected and named.

Each scenario tampers directly in the database with the append-only triggers turned off (as an
attacker with database access could), then runs verification.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from agent.audit.chain import canonical_json, event_hash, sha256_hex
from agent.audit.db import upgrade
from agent.audit.keys import HmacSigner, verifiers_for
from agent.audit.recorder import checkpoint_message
from agent.audit.tables import AuditEvent
from agent.audit.verify import VerifyReport, verify_trace
from tests.audit.trace_builder import SIGNER, disable_guards, record_run, rows, tamper
from tests.support.databases import EngineFactory


@pytest.fixture
def traced(db_url: str, new_engine: EngineFactory) -> Engine:
    """A trace of three finished runs."""
    upgrade(db_url)
    engine = new_engine(db_url)
    for patient in ("a", "b", "c"):
        record_run(engine, patient)
    return engine


def _verify(engine: Engine, run_id: str | None = None) -> VerifyReport:
    return verify_trace(engine, verifiers=verifiers_for(SIGNER), run_id=run_id)


def _codes(report: VerifyReport) -> set[str]:
    return {p.code for p in report.problems}


def _run_ids(engine: Engine) -> list[str]:
    return [
        r.run_id
        for r in rows(engine, "SELECT run_id, min(chain_seq) AS s FROM audit_events GROUP BY run_id ORDER BY s")
    ]


def _rechain(engine: Engine) -> None:
    """Recompute every prev_hash/hash in chain order: what a forger who knows the algorithm does."""
    with Session(engine) as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.chain_seq)).all()
        prev = "0" * 64
        updates = []
        for e in events:
            digest = event_hash(
                chain_seq=e.chain_seq,
                prev_hash=prev,
                run_id=e.run_id,
                seq=e.seq,
                kind=e.kind,
                name=e.name,
                at=e.at,
                duration_ms=e.duration_ms,
                status=e.status,
                meta=e.meta,
                content_hash=e.content_hash,
            )
            updates.append(
                ("UPDATE audit_events SET prev_hash=:p, hash=:h WHERE id=:id", {"p": prev, "h": digest, "id": e.id})
            )
            prev = digest
    tamper(engine, *updates)


def test_intact_trace_verifies(traced: Engine) -> None:
    report = _verify(traced)
    assert report.ok, report.problems
    assert (report.records, report.runs) == (3 * 7, 3)
    assert report.checkpoints >= 3 and report.warnings == []
    last = rows(traced, "SELECT chain_seq, hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1")[0]
    assert report.head is not None
    assert (report.head["chain_seq"], report.head["hash"]) == (last.chain_seq, last.hash)
    assert report.head["checkpoint"]["head_hash"] == last.hash  # the last run's end is checkpointed
    for run_id in _run_ids(traced):
        assert _verify(traced, run_id).ok


def test_guards_refuse_update_and_delete(traced: Engine) -> None:
    for sql in (
        "UPDATE audit_events SET name = 'x'",
        "DELETE FROM audit_events",
        "UPDATE audit_runs SET user_id = 'x'",
        "DELETE FROM audit_content",
        "DELETE FROM audit_checkpoints",
    ):
        with pytest.raises(DBAPIError, match="append-only"), traced.begin() as conn:
            conn.exec_driver_sql(sql)
    if traced.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), traced.begin() as conn:
            conn.exec_driver_sql("TRUNCATE audit_events CASCADE")


def _update_field(engine: Engine) -> None:
    tamper(engine, "UPDATE audit_events SET name = 'innocent' WHERE chain_seq = 4")


def _update_meta(engine: Engine) -> None:
    meta = (
        json.loads(rows(engine, "SELECT meta FROM audit_events WHERE kind = 'fhir_request' LIMIT 1")[0].meta)
        if engine.dialect.name == "sqlite"
        else rows(engine, "SELECT meta FROM audit_events WHERE kind = 'fhir_request' LIMIT 1")[0].meta
    )
    meta["resource_ids"] = []
    tamper(
        engine,
        ("UPDATE audit_events SET meta = :m WHERE kind = 'fhir_request' AND chain_seq = 3", {"m": json.dumps(meta)}),
    )


def _delete_row(engine: Engine) -> None:
    tamper(engine, "DELETE FROM audit_events WHERE chain_seq = 4")


def _insert_naive(engine: Engine) -> None:
    run = _run_ids(engine)[0]
    tamper(
        engine,
        (
            "INSERT INTO audit_events (run_id, seq, chain_seq, prev_hash, hash, kind, name, at, meta) "
            "VALUES (:r, 99, 1000, :p, :h, 'fhir_request', 'GET Patient/x', '2026-01-01 00:00:00', '{}')",
            {"r": run, "p": "0" * 64, "h": "f" * 64},
        ),
    )


def _insert_rehashed_mid_run(engine: Engine) -> None:
    """Insert a record into the first run and renumber + rehash everything after it."""
    run = _run_ids(engine)[0]
    statements: list[tuple[str, dict[str, object]] | str] = [
        "UPDATE audit_events SET chain_seq = chain_seq + 100000 WHERE chain_seq >= 4",
        "UPDATE audit_events SET chain_seq = chain_seq - 100000 + 1 WHERE chain_seq >= 100000",
        ("UPDATE audit_events SET seq = seq + 100 WHERE run_id = :r AND seq >= 4", {"r": run}),
        ("UPDATE audit_events SET seq = seq - 100 + 1 WHERE run_id = :r AND seq >= 100", {"r": run}),
        (
            "INSERT INTO audit_events (run_id, seq, chain_seq, prev_hash, hash, kind, name, at, meta) "
            "VALUES (:r, 4, 4, 'x', 'x', 'fhir_request', 'GET Patient/other', '2026-01-01 00:00:00', '{}')",
            {"r": run},
        ),
    ]
    tamper(engine, *statements)
    _rechain(engine)


def _append_to_finished_run(engine: Engine) -> None:
    run = _run_ids(engine)[0]
    last = rows(engine, "SELECT chain_seq, hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1")[0]
    seq = rows(engine, "SELECT max(seq) AS s FROM audit_events WHERE run_id = :r", r=run)[0].s + 1
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    digest = event_hash(
        chain_seq=last.chain_seq + 1,
        prev_hash=last.hash,
        run_id=run,
        seq=seq,
        kind="fhir_request",
        name="GET Patient/z",
        at=at,
        duration_ms=None,
        status=None,
        meta={},
        content_hash=None,
    )
    tamper(
        engine,
        (
            "INSERT INTO audit_events (run_id, seq, chain_seq, prev_hash, hash, kind, name, at, meta) "
            "VALUES (:r, :s, :c, :p, :h, 'fhir_request', 'GET Patient/z', :at, '{}')",
            {"r": run, "s": seq, "c": last.chain_seq + 1, "p": last.hash, "h": digest, "at": at},
        ),
    )


def _forge_whole_run(engine: Engine) -> None:
    """Append a complete, correctly hashed run (no key, so no valid checkpoint)."""
    from datetime import UTC, datetime

    from agent.audit.chain import merkle_root

    last = rows(engine, "SELECT chain_seq, hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1")[0]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    fields = {
        "kind": "ask",
        "trigger": "test",
        "patient_ref": "Patient/forged",
        "user_id": "x",
        "user_role": None,
        "purpose_of_use": None,
        "thread_id": None,
        "software_version": "0.1.0",
        "settings_fingerprint": "f",
    }
    start_meta = json.loads(canonical_json({"run": fields, "process": {}}))
    h1 = event_hash(
        chain_seq=last.chain_seq + 1,
        prev_hash=last.hash,
        run_id="forged",
        seq=1,
        kind="run_started",
        name="ask",
        at=at,
        duration_ms=None,
        status=None,
        meta=start_meta,
        content_hash=None,
    )
    end_meta = {"merkle_root": merkle_root([h1]), "merkle_leaves": 1}
    h2 = event_hash(
        chain_seq=last.chain_seq + 2,
        prev_hash=h1,
        run_id="forged",
        seq=2,
        kind="run_finished",
        name="ok",
        at=at,
        duration_ms=None,
        status="ok",
        meta=end_meta,
        content_hash=None,
    )
    insert = (
        "INSERT INTO audit_events (run_id, seq, chain_seq, prev_hash, hash, kind, name, at, status, meta) "
        "VALUES ('forged', :s, :c, :p, :h, :k, :n, :at, :st, :m)"
    )
    tamper(
        engine,
        (
            "INSERT INTO audit_runs (id, created_at, kind, trigger, patient_ref, user_id, software_version, "
            "settings_fingerprint) "
            "VALUES ('forged', :at, 'ask', 'test', 'Patient/forged', 'x', '0.1.0', 'f')",
            {"at": at},
        ),
        (
            insert,
            {
                "s": 1,
                "c": last.chain_seq + 1,
                "p": last.hash,
                "h": h1,
                "k": "run_started",
                "n": "ask",
                "at": at,
                "st": None,
                "m": json.dumps(start_meta),
            },
        ),
        (
            insert,
            {
                "s": 2,
                "c": last.chain_seq + 2,
                "p": h1,
                "h": h2,
                "k": "run_finished",
                "n": "ok",
                "at": at,
                "st": "ok",
                "m": json.dumps(end_meta),
            },
        ),
    )


def _reorder(engine: Engine) -> None:
    run = _run_ids(engine)[0]
    tamper(
        engine,
        ("UPDATE audit_events SET seq = 1000 WHERE run_id = :r AND seq = 3", {"r": run}),
        ("UPDATE audit_events SET seq = 3 WHERE run_id = :r AND seq = 4", {"r": run}),
        ("UPDATE audit_events SET seq = 4 WHERE run_id = :r AND seq = 1000", {"r": run}),
    )


def _truncate_tail(engine: Engine) -> None:
    run = _run_ids(engine)[-1]
    tamper(
        engine,
        ("DELETE FROM audit_events WHERE run_id = :r", {"r": run}),
        ("DELETE FROM audit_content WHERE run_id = :r", {"r": run}),
        ("DELETE FROM audit_runs WHERE id = :r", {"r": run}),
    )


def _swap_content(engine: Engine) -> None:
    a, b = rows(engine, "SELECT id, body FROM audit_content ORDER BY id LIMIT 2")
    tamper(
        engine,
        ("UPDATE audit_content SET body = :b WHERE id = :id", {"b": b.body, "id": a.id}),
        ("UPDATE audit_content SET body = :b WHERE id = :id", {"b": a.body, "id": b.id}),
    )


def _update_run_row(engine: Engine) -> None:
    tamper(engine, "UPDATE audit_runs SET patient_ref = 'Patient/someone-else' WHERE patient_ref = 'Patient/a'")


def _forge_checkpoint(engine: Engine) -> None:
    head = rows(engine, "SELECT chain_seq, hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1")[0]
    wrong = HmacSigner(b"not-the-real-key-but-long-enough")
    tamper(
        engine,
        (
            "INSERT INTO audit_checkpoints (created_at, chain_seq, head_hash, algorithm, key_id, signature) "
            "VALUES ('2026-01-01 00:00:00', :c, :h, 'hmac-sha256', :k, :s)",
            {
                "c": head.chain_seq,
                "h": head.hash,
                "k": SIGNER.key_id,
                "s": wrong.sign(checkpoint_message(head.chain_seq, head.hash)),
            },
        ),
    )


SCENARIOS: dict[str, tuple[Callable[[Engine], None], set[str]]] = {
    "update a field": (_update_field, {"record_altered"}),
    "update data-access metadata": (_update_meta, {"record_altered"}),
    "delete a row": (_delete_row, {"records_missing"}),
    "insert a naive forged row": (_insert_naive, {"record_altered"}),
    "insert a rehashed row mid-run": (_insert_rehashed_mid_run, {"merkle_mismatch", "checkpoint_mismatch"}),
    "append a valid record to a finished run": (_append_to_finished_run, {"record_after_finish"}),
    "append a forged whole run": (_forge_whole_run, {"finish_unsigned"}),
    "reorder a run": (_reorder, {"record_altered"}),
    "truncate the tail": (_truncate_tail, {"tail_truncated"}),
    "swap content": (_swap_content, {"content_altered"}),
    "change the run row": (_update_run_row, {"run_altered"}),
    "forge a checkpoint": (_forge_checkpoint, {"checkpoint_forged"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tampering_is_detected_and_named(traced: Engine, scenario: str) -> None:
    action, expected = SCENARIOS[scenario]
    assert _verify(traced).ok
    action(traced)
    report = _verify(traced)
    assert not report.ok
    assert expected <= _codes(report), (scenario, report.problems)
    assert all(p.where for p in report.problems)


def test_single_run_verification_names_the_broken_record(traced: Engine) -> None:
    first, second, _ = _run_ids(traced)
    _update_field(traced)  # chain_seq 4 belongs to the first run
    report = _verify(traced, first)
    assert not report.ok and any("chain_seq=4" in p.where for p in report.problems)
    assert _verify(traced, second).ok


def test_verify_without_the_key_warns_but_still_checks_the_chain(traced: Engine) -> None:
    report = verify_trace(traced, verifiers=verifiers_for(HmacSigner(b"x" * 32)))
    assert not report.ok and _codes(report) == {"checkpoint_key_unknown"}


def test_encrypted_content_is_verifiable_without_the_key(
    db_url: str, new_engine: EngineFactory, tmp_path: Path
) -> None:
    from cryptography.fernet import Fernet

    from agent.audit.keys import ContentCipher
    from agent.audit.reader import load_run

    upgrade(db_url)
    engine = new_engine(db_url)
    cipher = ContentCipher(Fernet.generate_key().decode())
    recorder = record_run(engine, "enc", cipher=cipher)
    stored = [r.body for r in rows(engine, "SELECT body FROM audit_content")]
    assert stored and all("how is enc" not in body and "enc ok" not in body for body in stored)
    assert _verify(engine).ok
    with_key = load_run(engine, recorder.run_id, cipher=cipher)
    assert with_key.events[0].content == {"question": "how is enc?"}
    without_key = load_run(engine, recorder.run_id)
    assert without_key.events[0].content == {"encrypted": True}
    assert sha256_hex(stored[0]) == rows(engine, "SELECT content_hash FROM audit_events WHERE seq = 1")[0].content_hash


def test_disable_guards_helper_really_disables(traced: Engine) -> None:
    """The tamper helper must not be a no-op, or the scenarios above would prove nothing."""
    with traced.begin() as conn:
        disable_guards(conn)
        conn.exec_driver_sql("UPDATE audit_events SET name = 'changed' WHERE chain_seq = 1")
    assert rows(traced, "SELECT name FROM audit_events WHERE chain_seq = 1")[0].name == "changed"
