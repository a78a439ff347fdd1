"""The recorder's driver-level write path, on SQLite and PostgreSQL: what is stored reads back as hashed.

The recorder writes each record with prebuilt driver SQL and stores ``meta`` as its canonical
JSON text. These tests hold it to what the SQLAlchemy path guaranteed: the meta read back
(through the JSON column and the reader) equals what was hashed, the chain verifies, and a failed
or interrupted write leaves no transaction, lock or connection behind.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine

from agent.audit.chain import canonical_json
from agent.audit.db import upgrade
from agent.audit.keys import HmacSigner, verifiers_for
from agent.audit.reader import load_run
from agent.audit.recorder import TraceRecorder
from agent.audit.verify import verify_trace
from agent.errors import AuditError
from tests.audit.trace_builder import SIGNER, record_run, rows
from tests.support.databases import EngineFactory

#: Values whose JSON text or Python value could drift between hashing and storing.
AWKWARD_METAS: list[dict[Any, Any]] = [
    {"text": "héllo wörld ✓ 漢字 🩻", "escapes": 'quote " backslash \\ tab \t nl \n', "ls": "\u2028\u2029"},
    {"floats": [0.1, 0.2 + 0.1, 1e-7, 1e300, -0.0, 2.5, 1 / 3, 123456789.123456789]},
    {"ints": [0, -1, 2**53 + 1, 2**70, -(2**64)], "bools": [True, False], "none": None},
    {"nested": {"b": [1, [2, [3, {"z": None, "a": []}]]], "a": {}}, "empty": [], "tuple": (1, "x")},
    {"int_keys": {2: "two", 10: "ten", 1: "one"}},  # canonical text sorts 2 < 10; its decoded form sorts "10" < "2"
    {"at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "amount": Decimal("1.10")},  # default=str
    {"Zebra": 1, "apple": 2, "_": 3, "ä": 4, "": 5},
    {},
]


@pytest.fixture
def engine(db_url: str, new_engine: EngineFactory) -> Engine:
    upgrade(db_url)
    return new_engine(db_url)


def test_meta_reads_back_exactly_as_hashed(engine: Engine) -> None:
    recorder = TraceRecorder(engine, signer=SIGNER)
    recorder.start_run(kind="ask", trigger="test", patient_ref="Patient/m", settings_fingerprint="f" * 64)
    seqs = [
        recorder.event("note", f"meta {i}", duration_ms=1.23456, meta=meta, content={"meta": meta})
        for i, meta in enumerate(AWKWARD_METAS)
    ]
    recorder.finish_run("ok")

    events = {e.seq: e for e in load_run(engine, recorder.run_id).events}
    for seq, meta in zip(seqs, AWKWARD_METAS, strict=True):
        expected = json.loads(canonical_json(meta))
        assert events[seq].meta == expected
        # equal as values and as the canonical text that is hashed (dict order and -0.0 included)
        assert canonical_json(events[seq].meta) == canonical_json(expected)
        assert events[seq].content == json.loads(canonical_json({"meta": meta}))
    report = verify_trace(engine, verifiers=verifiers_for(SIGNER))
    assert report.ok, report.problems
    assert report.records == len(AWKWARD_METAS) + 2


def test_stored_rows_are_what_sqlalchemy_would_store(engine: Engine) -> None:
    record_run(engine, "rows")
    times = [
        *rows(engine, "SELECT at AS stamp FROM audit_events"),
        *rows(engine, "SELECT created_at AS stamp FROM audit_checkpoints"),
        *rows(engine, "SELECT created_at AS stamp FROM audit_runs"),
    ]
    metas = [r.meta for r in rows(engine, "SELECT meta FROM audit_events")]
    assert len(times) == 7 + 1 + 1 and len(metas) == 7
    if engine.dialect.name == "sqlite":
        # SQLAlchemy's SQLite DATETIME text (naive UTC, microseconds); meta as canonical JSON text
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", r.stamp) for r in times)
        assert all(text == canonical_json(json.loads(text)) for text in metas)
    else:
        assert all(r.stamp.tzinfo is not None for r in times)
        assert all(isinstance(meta, dict) for meta in metas)


def test_a_rejected_write_fails_closed_and_releases_everything(engine: Engine) -> None:
    orphan = TraceRecorder(engine, run_id="no-such-run", signer=SIGNER)  # no run row: the foreign key refuses
    with pytest.raises(AuditError, match=r"cannot write to the trace \(note\)"):
        orphan.event("note", "x", meta={"a": 1})
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # the chain lock was released with the rolled-back transaction: other runs append at once
    record_run(engine, "after")
    report = verify_trace(engine, verifiers=verifiers_for(SIGNER))
    assert report.ok and report.records == 7


class _InterruptingSigner(HmacSigner):
    """Raise a BaseException (as a cancellation would) in the middle of one record's transaction."""

    armed = False

    def sign(self, message: bytes) -> str:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().sign(message)


def test_an_interrupted_write_is_rolled_back_and_the_recorder_goes_on(engine: Engine) -> None:
    signer = _InterruptingSigner(b"test-signing-key-0123456789abcdef")
    recorder = TraceRecorder(engine, signer=signer)
    recorder.start_run(kind="ask", trigger="test", patient_ref="Patient/i", settings_fingerprint="f" * 64)
    signer.armed = True
    with pytest.raises(KeyboardInterrupt):
        recorder.event("note", "interrupted", meta={"n": 1}, checkpoint=True)  # signed after the INSERT
    assert [r.name for r in rows(engine, "SELECT name FROM audit_events ORDER BY chain_seq")] == ["ask"]
    # same connection, no transaction left open: the next record and another writer both go through
    recorder.event("note", "next", meta={"n": 2})
    other = record_run(engine, "other")
    recorder.finish_run("ok")
    names = [e.name for e in load_run(engine, recorder.run_id).events]
    assert names == ["ask", "next", "ok"]
    assert len(load_run(engine, other.run_id).events) == 7
    report = verify_trace(engine, verifiers=verifiers_for(signer))
    assert report.ok, report.problems


def test_whole_number_durations_verify(engine: Engine) -> None:
    # The duration column is REAL: an int must be hashed as the float it reads back as.
    recorder = TraceRecorder(engine, signer=SIGNER)
    recorder.start_run(kind="ask", trigger="test", patient_ref="Patient/d", settings_fingerprint="f" * 64)
    recorder.event("note", "int duration", duration_ms=5)
    recorder.event("note", "zero duration", duration_ms=0)
    recorder.finish_run("ok")
    report = verify_trace(engine, verifiers=verifiers_for(SIGNER))
    assert report.ok, report.problems
