"""Readiness: database, FHIR, DICOMweb and models each checked, over real servers; 503 names what failed."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.runner import run_ask
from agent.service.app import create_app
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime
from tests.support.servers import FhirServerHandle, OrthancHandle, free_port


def test_embedded_sources_are_ready_and_models_once_loaded(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    client = TestClient(create_app(runtime.settings, runtime))
    assert client.get("/healthz").json()["status"] == "ok"

    before = client.get("/readyz")
    assert before.status_code == 503
    checks = before.json()["checks"]
    assert checks["fhir"]["ok"] and checks["dicom"]["ok"] and checks["database"]["ok"]
    assert not checks["models"]["ok"] and "google/medgemma-4b-it" in checks["models"]["detail"]

    import asyncio

    asyncio.run(run_ask(runtime, patient_id=PATIENTS["noimg"]["patient_id"], question="Status?"))
    after = client.get("/readyz")
    assert after.status_code == 200, after.text
    assert after.json()["checks"]["models"]["detail"] == "loaded"


def test_real_servers_are_checked_and_a_dead_one_is_named(
    tmp_path: Path, fhir_server: FhirServerHandle, orthanc: OrthancHandle
) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    runtime.settings.models.use_test_models = True
    runtime.settings.fhir.base_url = fhir_server.base_url
    runtime.settings.dicom.dicomweb_url = orthanc.dicomweb_url
    runtime.settings.dicom.username = orthanc.username
    runtime.settings.dicom.password = SecretStr(orthanc.password)
    client = TestClient(create_app(runtime.settings, runtime))
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["dicom"]["detail"].startswith("QIDO-RS studies: HTTP 2")

    runtime.settings.dicom.password = SecretStr("wrong")
    denied = client.get("/readyz").json()["checks"]["dicom"]
    assert not denied["ok"] and "401" in denied["detail"] and "wrong" not in denied["detail"]

    runtime.settings.fhir.base_url = f"http://127.0.0.1:{free_port()}/fhir"
    down = client.get("/readyz")
    assert down.status_code == 503
    assert not down.json()["checks"]["fhir"]["ok"] and "Connect" in down.json()["checks"]["fhir"]["detail"]


def test_an_unmigrated_database_without_auto_migration_is_not_ready(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    runtime.settings.db.auto_migrate = False
    runtime.settings.models.use_test_models = True
    reply = TestClient(create_app(runtime.settings, runtime)).get("/readyz")
    assert reply.status_code == 503
    assert "medagent db upgrade" in reply.json()["checks"]["database"]["detail"]
