"""The trace: migrations create the schema, events are committed one by one, reads derive status."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from agent.audit.db import current_revision, ensure_schema, head_revision, upgrade
from agent.audit.reader import list_runs, load_run
from agent.audit.recorder import TraceRecorder
from agent.audit.render import render_run
from agent.domain.events import DicomRetrievalEvent, FhirRequestEvent
from agent.errors import AuditError, PatientNotFoundError, RunNotFoundError
from tests.support.databases import EngineFactory

TABLES = {"audit_runs", "audit_events", "audit_content", "alembic_version"}


def _start(engine, patient: str = "Patient/p1") -> TraceRecorder:  # type: ignore[no-untyped-def]
    recorder = TraceRecorder(engine)
    recorder.start_run(
        kind="ask",
        trigger="test",
        patient_ref=patient,
        settings_fingerprint="f" * 64,
        request={"question": "secret clinical question"},
    )
    return recorder


def test_migrations_create_the_schema(db_url: str, new_engine: EngineFactory) -> None:
    engine = new_engine(db_url)
    assert current_revision(engine) is None
    upgrade(db_url)
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= TABLES


def test_unmigrated_database_is_refused_without_auto_migrate(db_url: str, new_engine: EngineFactory) -> None:
    engine = new_engine(db_url)
    with pytest.raises(AuditError, match="medagent db upgrade"):
        ensure_schema(engine, auto_migrate=False)
    ensure_schema(engine, auto_migrate=True)
    ensure_schema(engine, auto_migrate=False)  # now current: accepted


def test_events_are_read_back_in_order_with_status(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    recorder = _start(engine)
    with recorder.node("fetch_history"):
        recorder.fhir_request(
            FhirRequestEvent(
                backend="http",
                method="GET",
                path="Condition?patient=p1",
                status=200,
                resource_ids=["Condition/c1"],
            )
        )
        recorder.dicom_retrieval(
            DicomRetrievalEvent(
                backend="dicomweb",
                action="retrieve",
                study_uid="1.2",
                series_uid="1.2.3",
                sop_instance_uid="1.2.3.4",
                transfer_syntax="1.2.840.10008.1.2.1",
                bytes=1234,
                status=200,
            )
        )
    recorder.finish_run("ok")

    trace = load_run(engine, recorder.run_id)
    assert trace.run.status == "ok"
    assert [e.kind for e in trace.events] == [
        "run_started",
        "node_started",
        "fhir_request",
        "dicom_retrieval",
        "node_finished",
        "run_finished",
    ]
    assert [e.seq for e in trace.events] == list(range(1, 7))
    assert trace.events[2].meta["resource_ids"] == ["Condition/c1"]
    assert trace.events[0].content == {"question": "secret clinical question"}
    text = render_run(trace)
    assert "GET Condition?patient=p1 -> 200" in text and "instance=1.2.3.4" in text and "bytes=1234" in text


def test_metadata_review_excludes_content(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    recorder = _start(engine)
    trace = load_run(engine, recorder.run_id, include_content=False)
    assert all(event.content is None for event in trace.events)
    assert "secret clinical question" not in trace.model_dump_json()


def test_failed_node_and_run_record_step_and_code(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    recorder = _start(engine)
    error = PatientNotFoundError("patient p1 not found")
    with pytest.raises(PatientNotFoundError), recorder.node("resolve_patient"):
        raise error
    recorder.finish_run("failed", error=error)
    trace = load_run(engine, recorder.run_id)
    assert trace.run.status == "failed"
    final = trace.events[-1]
    assert final.meta["failing_step"] == "resolve_patient"
    assert final.meta["error"]["code"] == "patient_not_found"
    assert trace.events[-2].status == "failed"


def test_half_written_run_is_readable_as_running(db_url: str, new_engine: EngineFactory) -> None:
    """A run killed mid-way leaves committed events; audit show still renders it."""
    upgrade(db_url)
    engine = new_engine(db_url)
    recorder = _start(engine)
    recorder.event("node_started", "fetch_history")
    # a second engine, as a different process would read it
    other = new_engine(db_url)
    trace = load_run(other, recorder.run_id)
    assert trace.run.status == "running"
    assert "NODE ▶      fetch_history" in render_run(trace)
    assert [r.run_id for r in list_runs(other)] == [recorder.run_id]


def test_unknown_run_is_a_clear_error(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    with pytest.raises(RunNotFoundError, match="no run with id nope"):
        load_run(new_engine(db_url), "nope")


def test_unreachable_database_fails_closed(new_engine: EngineFactory) -> None:
    engine = new_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(AuditError, match="unreachable"):
        ensure_schema(engine, auto_migrate=True)
    with pytest.raises(AuditError, match="cannot start the run's trace"):
        _start(engine)


def test_list_runs_filters_by_patient(db_url: str, new_engine: EngineFactory) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    a = _start(engine, "Patient/a")
    _start(engine, "Patient/b")
    assert [r.run_id for r in list_runs(engine, patient_ref="Patient/a")] == [a.run_id]
    assert len(list_runs(engine)) == 2
