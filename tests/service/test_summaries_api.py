"""The summaries API over HTTP with the app's lifespan running the in-process job queue.

Queue a summary, poll it to done and read the summary; idempotency keys; roles (an auditor sees
no summary text); the dead-letter list and an admin's retry; problem+json for bad input.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.audit.reader import list_runs, load_run
from agent.runtime import AgentRuntime
from agent.service.app import create_app
from agent.service.auth import new_api_key
from tests.jobs.helpers import PATIENTS, job_runtime

CXR = PATIENTS["cxr"]["patient_id"]
ROLES = {
    "clinician": ["clinician"],
    "other-clinician": ["clinician"],
    "auditor": ["auditor"],
    "admin": ["admin"],
    "service": ["service"],
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], AgentRuntime]]:
    """Yield a started app (queue running), the headers of each role's key, and the runtime."""
    headers, specs = {}, []
    for label, roles in ROLES.items():
        key, spec = new_api_key(f"user-{label}", roles, label)  # type: ignore[arg-type]
        headers[label] = {"Authorization": f"Bearer {key}"}
        specs.append(spec.model_dump())
    runtime = job_runtime(
        f"sqlite:///{tmp_path / 'api.db'}",
        service={"api_keys": specs, "rate_limit_per_minute": 0},
        max_attempts=2,
        backoff_s=0.05,
    )
    with TestClient(create_app(runtime.settings, runtime)) as client:
        yield client, headers, runtime


def _poll(client: TestClient, job_id: str, headers: dict[str, str], timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = client.get(f"/v1/summaries/{job_id}", headers=headers)
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        if body["status"] in ("done", "dead"):
            return body
        assert time.monotonic() < deadline, f"job still {body['status']} after {timeout_s:g} s"
        time.sleep(0.1)


def test_queue_a_summary_and_read_it_when_done(api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime]) -> None:
    client, headers, runtime = api
    clinician = {**headers["clinician"], "X-Purpose-Of-Use": "TREAT"}
    reply = client.post(f"/v1/patients/{CXR}/summaries", headers=clinician)
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert reply.headers["location"] == f"/v1/summaries/{job['id']}"
    assert (job["patient_id"], job["trigger"], job["requested_by"]) == (CXR, "api", "user-clinician")
    assert job["status"] in ("queued", "running", "done") and job["write_back"] is False

    done = _poll(client, job["id"], clinician)
    assert done["status"] == "done" and done["attempts"] == 1 and done["run_id"]
    assert "heart failure" in done["summary"] and done["summary_readable"] is True
    assert [c["valid"] for c in done["citations"]] == [True, False]
    assert done["models"]["reasoner"] == "scripted-reasoner"
    assert done["created_at"].endswith(("Z", "+00:00"))
    [run] = [r for r in list_runs(runtime.engine) if r.kind == "ask"]
    assert (run.run_id, run.trigger, run.user_id, run.purpose_of_use) == (
        done["run_id"],
        "api",
        "user-clinician",
        "TREAT",
    )
    # reading the finished summary is itself recorded: who read which run's content
    read = next(r for r in list_runs(runtime.engine) if r.kind == "content-read")
    assert (read.user_id, read.user_role, read.patient_ref) == ("user-clinician", "clinician", f"Patient/{CXR}")
    assert load_run(runtime.engine, read.run_id, include_content=True).events[0].content == {
        "run_id": done["run_id"],
        "what": "summary",
    }
    # a service (e.g. an EHR integration) may request and read summaries too
    service_job = client.post(f"/v1/patients/{CXR}/summaries", headers=headers["service"]).json()
    assert _poll(client, service_job["id"], headers["service"])["summary"]


def test_an_idempotency_key_returns_the_first_job(
    api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime],
) -> None:
    client, headers, _ = api
    url = f"/v1/patients/{CXR}/summaries"
    first = client.post(url, headers={**headers["clinician"], "Idempotency-Key": "order-77"})
    again = client.post(url, headers=headers["clinician"], json={"idempotency_key": "order-77"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    # keys are per caller: another clinician's identical key is another job
    theirs = client.post(url, headers={**headers["other-clinician"], "Idempotency-Key": "order-77"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    # the same key for another patient, or header and body disagreeing, is refused
    other_patient = PATIENTS["noimg"]["patient_id"]
    reused = client.post(
        f"/v1/patients/{other_patient}/summaries", headers={**headers["clinician"], "Idempotency-Key": "order-77"}
    )
    assert reused.status_code == 409 and reused.json()["code"] == "idempotency_conflict"
    mismatch = client.post(url, headers={**headers["clinician"], "Idempotency-Key": "a"}, json={"idempotency_key": "b"})
    assert mismatch.status_code == 409
    listed = client.get("/v1/summaries", params={"patient": CXR}, headers=headers["clinician"]).json()
    assert len(listed) == 2


def test_roles(api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime]) -> None:
    client, headers, _ = api
    url = f"/v1/patients/{CXR}/summaries"
    for label in ("auditor", "admin"):
        assert client.post(url, headers=headers[label]).json()["code"] == "forbidden"
    job = client.post(url, headers=headers["clinician"]).json()
    _poll(client, job["id"], headers["clinician"])

    refused = client.get(f"/v1/summaries/{job['id']}", headers=headers["auditor"])
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("application/problem+json")
    metadata = client.get(f"/v1/summaries/{job['id']}", params={"content": "false"}, headers=headers["auditor"])
    assert metadata.status_code == 200
    assert metadata.json()["status"] == "done" and metadata.json()["summary"] is None
    assert metadata.json()["citations"] == []
    assert client.get("/v1/summaries", headers=headers["auditor"]).status_code == 403
    assert client.get("/v1/summaries", headers=headers["admin"]).status_code == 200
    assert client.get(f"/v1/summaries/{job['id']}").status_code == 401


def test_a_dead_job_is_listed_and_an_admin_can_retry_it(
    api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime],
) -> None:
    client, headers, _ = api
    dead_id = client.post("/v1/patients/no-such-patient/summaries", headers=headers["clinician"]).json()["id"]
    dead = _poll(client, dead_id, headers["clinician"])
    assert (dead["status"], dead["attempts"], dead["error_code"]) == ("dead", 1, "patient_not_found")
    assert dead["summary"] is None and dead["run_id"]
    ok_id = client.post(f"/v1/patients/{CXR}/summaries", headers=headers["clinician"]).json()["id"]
    _poll(client, ok_id, headers["clinician"])

    letters = client.get("/v1/summaries", params={"status": "dead"}, headers=headers["admin"]).json()
    assert [j["id"] for j in letters] == [dead_id]
    assert client.get("/v1/summaries", params={"status": "done"}, headers=headers["clinician"]).json()[0]["id"] == ok_id

    assert client.post(f"/v1/summaries/{dead_id}/retry", headers=headers["clinician"]).status_code == 403
    not_dead = client.post(f"/v1/summaries/{ok_id}/retry", headers=headers["admin"])
    assert not_dead.status_code == 409 and not_dead.json()["code"] == "job_not_dead"
    retried = client.post(f"/v1/summaries/{dead_id}/retry", headers=headers["admin"])
    assert retried.status_code == 202, retried.text
    assert (retried.json()["status"], retried.json()["max_attempts"]) == ("queued", 3)
    again = _poll(client, dead_id, headers["clinician"])
    assert (again["status"], again["attempts"]) == ("dead", 2)  # the patient still does not exist


def test_bad_input_is_a_clear_problem(api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime]) -> None:
    client, headers, _ = api
    clinician = headers["clinician"]
    write_back = client.post(f"/v1/patients/{CXR}/summaries", headers=clinician, json={"write_back": True})
    assert write_back.status_code == 409 and write_back.json()["code"] == "write_back_unsupported"
    assert "write-back needs a FHIR server" in write_back.json()["detail"]
    for bad in (
        client.post("/v1/patients/bad$id/summaries", headers=clinician),
        client.post(f"/v1/patients/{CXR}/summaries", headers={**clinician, "Idempotency-Key": "has space"}),
        client.post(f"/v1/patients/{CXR}/summaries", headers=clinician, json={"write_back": "perhaps"}),
        client.get("/v1/summaries/not-a-job-id", headers=clinician),
        client.get("/v1/summaries", params={"status": "lost"}, headers=clinician),
        client.get("/v1/summaries", params={"limit": 0}, headers=clinician),
    ):
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request", bad.text
    missing = client.get("/v1/summaries/00000000-0000-4000-8000-000000000000", headers=clinician)
    assert missing.status_code == 404 and missing.json()["code"] == "summary_not_found"
    assert client.get("/v1/summaries", headers=clinician).json() == []  # nothing was queued


def test_openapi_documents_the_summaries_endpoints(
    api: tuple[TestClient, dict[str, dict[str, str]], AgentRuntime],
) -> None:
    client, _, _ = api
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    post = paths["/v1/patients/{patient_id}/summaries"]["post"]
    assert {"200", "202", "409"} <= set(post["responses"]) and post["description"]
    assert paths["/v1/summaries/{job_id}"]["get"]["responses"]["200"]["content"]
    assert {"/v1/summaries", "/v1/summaries/{job_id}/retry"} <= set(paths)
    schemas = spec["components"]["schemas"]
    assert schemas["SummaryRequest"].get("examples") and "summary" in schemas["SummaryJobView"]["properties"]
