"""The HTTP API: POST /v1/ask and GET /v1/runs/{id}, problem+json errors, OpenAPI."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.service.app import create_app
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    return TestClient(create_app(runtime.settings, runtime))


def test_ask_then_read_the_trace(client: TestClient) -> None:
    patient_id = PATIENTS["cxr"]["patient_id"]
    reply = client.post("/v1/ask", json={"patient_id": patient_id, "question": "Heart failure status?"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "ok"
    assert f"Patient/{patient_id}" in body["sources"]
    assert {c["valid"] for c in body["citations"]} == {True, False}
    trace = client.get(f"/v1/runs/{body['run_id']}")
    assert trace.status_code == 200
    kinds = [e["kind"] for e in trace.json()["events"]]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert {"fhir_request", "dicom_retrieval", "model_call"} <= set(kinds)
    listed = client.get("/v1/runs").json()
    assert [r["run_id"] for r in listed] == [body["run_id"]]
    assert listed[0]["trigger"] == "api"


def test_unknown_patient_is_problem_json_with_the_run_id(client: TestClient) -> None:
    reply = client.post("/v1/ask", json={"patient_id": "nobody", "question": "?"})
    assert reply.status_code == 404
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem = reply.json()
    assert problem["code"] == "patient_not_found" and problem["run_id"]
    trace = client.get(f"/v1/runs/{problem['run_id']}").json()
    assert trace["run"]["status"] == "failed"


def test_invalid_request_and_unknown_run(client: TestClient) -> None:
    bad = client.post("/v1/ask", json={"patient_id": "../etc", "question": ""})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    missing = client.get("/v1/runs/does-not-exist")
    assert missing.status_code == 404 and missing.json()["code"] == "run_not_found"


def test_openapi_documents_the_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/ask", "/v1/runs/{run_id}"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_auditor_endpoints_verify_export_and_replay(client: TestClient) -> None:
    patient_id = PATIENTS["cxr"]["patient_id"]
    body = client.post("/v1/ask", json={"patient_id": patient_id, "question": "Heart failure status?"}).json()
    run_id = body["run_id"]

    assert client.get(f"/v1/runs/{run_id}/verify").json()["ok"] is True
    full = client.post("/v1/audit/verify").json()
    assert full["ok"] is True and full["runs"] == 1

    bundle = client.get(f"/v1/runs/{run_id}/export", params={"format": "fhir"}).json()
    kinds = [entry["resource"]["resourceType"] for entry in bundle["entry"]]
    assert "AuditEvent" in kinds and kinds.count("Provenance") == 1
    spans = client.get(f"/v1/runs/{run_id}/export", params={"format": "otel"}).json()
    assert spans["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert "Heart failure status?" not in str(spans)  # content is off unless asked for

    replayed = client.get(f"/v1/runs/{run_id}/replay").json()
    assert replayed["answer"] == body["answer"] and replayed["sources"] == body["sources"]

    metadata_only = client.get(f"/v1/runs/{run_id}", params={"content": "false"}).json()
    assert "Heart failure status?" not in str(metadata_only)
    assert client.get("/v1/runs", params={"status": "failed"}).json() == []
    assert client.get("/v1/runs/nope/verify").status_code == 404


def test_reading_clinical_content_is_itself_recorded(client: TestClient) -> None:
    patient_id = PATIENTS["cxr"]["patient_id"]
    asked = client.post("/v1/ask", json={"patient_id": patient_id, "question": "Heart failure status?"}).json()
    headers = {"X-Purpose-Of-Use": "HQUALIMP"}

    def reads() -> list[dict[str, object]]:
        return [r for r in client.get("/v1/runs").json() if r["kind"] == "content-read"]

    assert client.get(f"/v1/runs/{asked['run_id']}", headers=headers).status_code == 200
    assert reads() == []  # metadata only: nothing clinical was read
    client.get(f"/v1/runs/{asked['run_id']}", params={"content": "true"}, headers=headers)
    client.get(f"/v1/runs/{asked['run_id']}/replay", headers=headers)
    client.get(f"/v1/runs/{asked['run_id']}/export", params={"content": "true", "format": "fhir"}, headers=headers)
    recorded = reads()
    assert len(recorded) == 3
    assert {(r["user_id"], r["purpose_of_use"], r["patient_ref"]) for r in recorded} == {
        ("dev", "HQUALIMP", f"Patient/{patient_id}")
    }
    whats = set()
    for read in recorded:
        trace = client.get(f"/v1/runs/{read['run_id']}", params={"content": "true"}).json()
        assert trace["events"][0]["content"]["run_id"] == asked["run_id"]
        whats.add(trace["events"][0]["content"]["what"])
    assert whats == {"trace", "replay", "export:fhir"}
