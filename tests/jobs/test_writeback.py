"""Write-back of summaries to the live FHIR engine (the session's medplum server), through real HTTP.

The agent reads the patient from the same server; the summary job then writes a DocumentReference
and its Provenance in one transaction, and both are read back. A fault proxy in front of the
server makes the write fail transiently (retried without re-running the agent) or permanently.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.provenance import Provenance

from agent.jobs.queue import InProcessQueue
from agent.jobs.store import JobRecord, create_job, get_job
from agent.jobs.worker import JobExecutor, load_summary
from agent.jobs.writeback import (
    SummaryToWrite,
    WriteBackUnsupportedError,
    build_transaction,
    check_write_back_possible,
)
from agent.runtime import AgentRuntime
from tests.jobs.helpers import PATIENTS, job_runtime, runs_of, wait_for_job
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import FhirServerHandle

CXR = PATIENTS["cxr"]["patient_id"]


def _documents_of_cxr(base: str) -> set[str]:
    bundle = httpx.get(f"{base}/DocumentReference", params={"subject": f"Patient/{CXR}", "_count": "1000"}).json()
    return {entry["resource"]["id"] for entry in bundle.get("entry") or []}


@pytest.fixture(autouse=True)
def _leave_the_shared_server_as_found(request: pytest.FixtureRequest) -> Any:
    """Delete what a test wrote to the session's FHIR server (other tests compare it with the fixtures)."""
    if "fhir_server" not in request.fixturenames:
        yield
        return
    base = request.getfixturevalue("fhir_server").base_url
    before = _documents_of_cxr(base)
    yield
    for document_id in _documents_of_cxr(base) - before:
        found = httpx.get(f"{base}/Provenance", params={"target": f"DocumentReference/{document_id}"}).json()
        for entry in found.get("entry") or []:
            httpx.delete(f"{base}/Provenance/{entry['resource']['id']}").raise_for_status()
        httpx.delete(f"{base}/DocumentReference/{document_id}").raise_for_status()
    assert _documents_of_cxr(base) == before


def _runtime(tmp_path: Path, base_url: str, **jobs: Any) -> AgentRuntime:
    runtime = job_runtime(f"sqlite:///{tmp_path / 'jobs.db'}", fhir={"base_url": base_url}, backoff_s=0.05, **jobs)
    runtime.ensure_schema()
    return runtime


async def _run(runtime: AgentRuntime, job: JobRecord, executor: JobExecutor | None = None) -> JobRecord:
    queue = InProcessQueue(runtime, lease_s=5, executor=executor)
    await queue.start()
    try:
        return await wait_for_job(runtime, job.id, lambda j: j.status in ("done", "dead"), timeout_s=60)
    finally:
        await queue.stop()


async def test_a_summary_is_written_back_as_a_document_with_its_provenance(
    tmp_path: Path, fhir_server: FhirServerHandle
) -> None:
    runtime = _runtime(tmp_path, fhir_server.base_url)
    job, _ = create_job(
        runtime.engine,
        patient_id=CXR,
        trigger="api",
        max_attempts=3,
        requested_by="dr-house",
        purpose_of_use="TREAT",
        write_back=True,
    )
    done = await _run(runtime, job)
    assert done.status == "done", done.model_dump()
    assert done.write_back_ref is not None and done.write_back_ref.startswith("DocumentReference/")
    summary = load_summary(runtime, str(done.run_id))

    base = fhir_server.base_url
    document = httpx.get(f"{base}/{done.write_back_ref}").json()
    DocumentReference.model_validate(document)
    assert document["status"] == "current"
    assert document["type"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "60591-5",
        "display": "Patient summary Document",
    }
    assert document["subject"]["reference"] == f"Patient/{CXR}"
    assert document["masterIdentifier"]["value"] == f"urn:uuid:{done.run_id}"
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "text/plain"
    assert base64.b64decode(attachment["data"]).decode("utf-8") == summary.summary
    assert "heart failure" in summary.summary

    provenances = httpx.get(f"{base}/Provenance", params={"target": done.write_back_ref}).json()["entry"]
    assert len(provenances) == 1
    provenance = provenances[0]["resource"]
    Provenance.model_validate(provenance)
    assert provenance["target"] == [{"reference": done.write_back_ref}]
    cited = [c.reference for c in summary.citations if c.valid]
    assert cited and [e["what"]["reference"] for e in provenance["entity"]] == cited  # not the made-up one
    assert {e["role"] for e in provenance["entity"]} == {"source"}
    who = [agent["who"] for agent in provenance["agent"]]
    assert who[0]["type"] == "Device" and "scripted-reasoner" in who[0]["display"]
    assert who[1]["display"] == "dr-house"
    # the cited resource really exists on the server it was written to
    assert httpx.get(f"{base}/{cited[0]}").status_code == 200


async def test_a_failed_write_is_retried_without_running_the_agent_again(
    tmp_path: Path, fhir_server: FhirServerHandle
) -> None:
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^$", [Fault.status_code(503)])  # the transaction POST goes to the base itself
        runtime = _runtime(tmp_path, proxy.base_url)
        job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3, write_back=True)
        done = await _run(runtime, job)
        posts = [r.action for r in proxy.records if r.method == "POST"]
    assert (done.status, done.attempts) == ("done", 2), done.model_dump()
    assert posts == ["503", "forward"]
    [run] = runs_of(runtime)  # one agent run; the second attempt only wrote it back
    assert done.run_id == run.run_id and done.write_back_ref is not None
    written = httpx.get(f"{fhir_server.base_url}/{done.write_back_ref}").json()
    assert written["masterIdentifier"]["value"] == f"urn:uuid:{run.run_id}"


async def test_a_refused_write_is_a_permanent_error(tmp_path: Path, fhir_server: FhirServerHandle) -> None:
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^$", [Fault.outcome(403, code="forbidden", diagnostics="no write scope")])
        runtime = _runtime(tmp_path, proxy.base_url)
        job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3, write_back=True)
        dead = await _run(runtime, job)
    assert (dead.status, dead.attempts, dead.error_code) == ("dead", 1, "write_back_rejected")
    assert "HTTP 403" in (dead.error_message or "")
    [run] = runs_of(runtime)
    assert run.status == "ok" and dead.run_id == run.run_id  # the summary exists; only the write failed


async def test_bundle_folders_cannot_be_written_back(tmp_path: Path) -> None:
    runtime = job_runtime(f"sqlite:///{tmp_path / 'jobs.db'}")
    with pytest.raises(WriteBackUnsupportedError, match="write-back needs a FHIR server"):
        check_write_back_possible(runtime.settings.fhir)
    runtime.ensure_schema()
    job, _ = create_job(runtime.engine, patient_id=CXR, trigger="api", max_attempts=3, write_back=True)
    dead = await _run(runtime, job)
    assert (dead.status, dead.attempts, dead.error_code) == ("dead", 1, "write_back_unsupported")
    assert runs_of(runtime) == []  # refused before asking the agent anything
    assert get_job(runtime.engine, job.id) == dead


def test_the_transaction_links_the_provenance_to_the_document() -> None:
    bundle = build_transaction(
        SummaryToWrite(
            patient_id="p1",
            run_id="0b7f1f7e-0000-4000-8000-000000000001",
            text="Stable [Condition/c1].",
            models={"reasoner": "google/medgemma-4b-it"},
            cited=["Condition/c1", "Condition/c1", "Observation/o1"],
            requested_by="dr-a",
            purpose_of_use="TREAT",
            focus="ImagingStudy/s1",
        )
    )
    assert bundle["type"] == "transaction"
    document_entry, provenance_entry = bundle["entry"]
    assert document_entry["request"]["ifNoneExist"].endswith("urn:uuid:0b7f1f7e-0000-4000-8000-000000000001")
    provenance = provenance_entry["resource"]
    assert provenance["target"] == [{"reference": document_entry["fullUrl"]}]
    assert [e["what"]["reference"] for e in provenance["entity"]] == ["Condition/c1", "Observation/o1"]
    assert provenance["reason"][0]["coding"][0]["code"] == "TREAT"
    assert document_entry["resource"]["context"]["related"] == [{"reference": "ImagingStudy/s1"}]
    assert base64.b64decode(document_entry["resource"]["content"][0]["attachment"]["data"]) == b"Stable [Condition/c1]."
