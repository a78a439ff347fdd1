"""Build small but realistic traces directly through the recorder, and tamper with them as an attacker would."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from agent.audit.keys import HmacSigner
from agent.audit.recorder import TraceRecorder
from agent.audit.tables import AUDIT_TABLES
from agent.domain.events import DicomRetrievalEvent, FhirRequestEvent

SIGNER = HmacSigner(b"test-signing-key-0123456789abcdef")


def record_run(engine: Engine, patient: str, *, finish: bool = True, **options: Any) -> TraceRecorder:
    """Record one run with nodes, data accesses, a model call with content, and its end."""
    recorder = TraceRecorder(engine, signer=SIGNER, **options)
    recorder.start_run(
        kind="ask",
        trigger="test",
        patient_ref=f"Patient/{patient}",
        settings_fingerprint="f" * 64,
        user_id="dr-who",
        user_role="clinician",
        purpose_of_use="TREAT",
        request={"question": f"how is {patient}?"},
    )
    with recorder.node("fetch_history"):
        recorder.fhir_request(
            FhirRequestEvent(
                backend="http",
                method="GET",
                path=f"Condition?patient={patient}",
                status=200,
                resource_ids=[f"Condition/{patient}-c1"],
            )
        )
        recorder.dicom_retrieval(
            DicomRetrievalEvent(backend="dicomweb", action="retrieve", study_uid="1.2.3", sop_instance_uid="1.2.3.4")
        )
    recorder.event("model_call", "medgemma.generate", meta={"model_id": "m"}, content={"output": f"{patient} ok"})
    if finish:
        recorder.finish_run("ok")
    return recorder


def disable_guards(conn: Any) -> None:
    """Turn the append-only triggers off for this connection, as someone with database access could."""
    if conn.dialect.name == "sqlite":
        for table in AUDIT_TABLES:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_update")
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    else:
        conn.exec_driver_sql("SET session_replication_role = replica")


def tamper(engine: Engine, *statements: tuple[str, dict[str, Any]] | str) -> None:
    """Run raw SQL with the guards off, in one transaction."""
    with engine.begin() as conn:
        disable_guards(conn)
        for statement in statements:
            sql, params = (statement, {}) if isinstance(statement, str) else statement
            conn.execute(text(sql), params)


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    """Return the rows of a query."""
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))
