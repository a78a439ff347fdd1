"""Record views for the web UI: patient search, a run's cited sources, image thumbnails, service info.

Real: the app over HTTP (ASGI), bundle-folder FHIR, DICOM-folder imaging, pixel preparation and the
SQL trace. Scripted: the models (see tests/graph/test_ask_flow.py). Every data access must be a
traced ``view`` run naming who read what and why; refusals read nothing and record nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageStat
from pydantic import ValidationError

from agent.audit.reader import load_run
from agent.audit.verify import verify_trace
from agent.config import DEFAULT_FIXTURES
from agent.runtime import AgentRuntime
from agent.service.app import create_app
from agent.service.auth import new_api_key
from agent.service.routes_records import BIRTHDATE_PATTERN, IDENTIFIER_PATTERN, NAME_PATTERN, PatientSearch
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime

CXR = PATIENTS["cxr"]


def make_app(runtime: AgentRuntime) -> FastAPI:
    """Return the app for this runtime."""
    return create_app(runtime.settings, runtime)


class Keys:
    """API keys of three callers: a clinician, an auditor, and an admin who is not a clinician."""

    def __init__(self, runtime: AgentRuntime) -> None:
        self.clinician, clinician = new_api_key("dr-house", ["clinician"], "clinician key")
        self.auditor, auditor = new_api_key("ann-auditor", ["auditor"], "auditor key")
        runtime.settings.service.api_keys.extend([clinician, auditor])

    def clinician_headers(self, purpose: str = "TREAT") -> dict[str, str]:
        return {"X-API-Key": self.clinician, "X-Purpose-Of-Use": purpose}

    def auditor_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.auditor}


@pytest.fixture
def runtime(tmp_path: Path) -> AgentRuntime:
    return _runtime(tmp_path, FakeScorer(), ScriptedReasoner())


@pytest.fixture
def keys(runtime: AgentRuntime) -> Keys:
    return Keys(runtime)


@pytest.fixture
def client(runtime: AgentRuntime, keys: Keys) -> TestClient:
    return TestClient(make_app(runtime))


@pytest.fixture
def asked(client: TestClient, keys: Keys) -> dict[str, Any]:
    """One answered question about the CXR patient (its result, as the API returned it)."""
    reply = client.post(
        "/v1/ask",
        json={"patient_id": CXR["patient_id"], "question": "Heart failure status?"},
        headers=keys.clinician_headers(),
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def view_runs(runtime: AgentRuntime) -> list[Any]:
    """Return the traces of every ``view`` run, oldest first."""
    from agent.audit.reader import list_runs

    runtime.ensure_schema()
    runs = [r for r in list_runs(runtime.engine, limit=500) if r.kind == "view"]
    return [load_run(runtime.engine, r.run_id) for r in reversed(runs)]


def fhir_paths(trace: Any) -> list[str]:
    return [e.meta["path"] for e in trace.events if e.kind == "fhir_request"]


# -- patients -------------------------------------------------------------------------------------


def test_listing_patients_returns_the_source_patients_and_is_traced(
    client: TestClient, keys: Keys, runtime: AgentRuntime
) -> None:
    reply = client.get("/v1/patients", headers=keys.clinician_headers("ETREAT"))
    assert reply.status_code == 200, reply.text
    listed = {p["id"]: p for p in reply.json()}
    assert set(listed) == {p["patient_id"] for p in PATIENTS.values()}
    assert listed[CXR["patient_id"]]["name"] == CXR["name"]
    assert listed[CXR["patient_id"]]["birth_date"] == CXR["birth_date"]

    assert len(client.get("/v1/patients", params={"limit": 2}, headers=keys.clinician_headers()).json()) == 2

    first, second = view_runs(runtime)
    assert first.run.user_id == "dr-house" and first.run.user_role == "clinician"
    assert first.run.purpose_of_use == "ETREAT" and first.run.status == "ok"
    assert fhir_paths(first) == ["Patient?_count=50"]
    assert fhir_paths(second) == ["Patient?_count=2"]
    assert first.events[0].content == {"view": "patients", "limit": 50}


def search(client: TestClient, keys: Keys, body: dict[str, Any]) -> Any:
    return client.post("/v1/patients/_search", json=body, headers=keys.clinician_headers())


def test_search_by_identifier_or_name_and_birth_date(client: TestClient, keys: Keys, runtime: AgentRuntime) -> None:
    by_mrn = search(client, keys, {"identifier": f"{CXR['mrn_system']}|{CXR['mrn']}"})
    assert [p["id"] for p in by_mrn.json()] == [CXR["patient_id"]]
    assert f"{CXR['mrn_system']}|{CXR['mrn']}" in by_mrn.json()[0]["identifiers"]

    by_name = search(client, keys, {"name": CXR["name"], "birthdate": CXR["birth_date"]})
    assert [p["id"] for p in by_name.json()] == [CXR["patient_id"]]
    family_first = search(client, keys, {"name": "quill, arthur", "birthdate": CXR["birth_date"]})
    assert [p["id"] for p in family_first.json()] == [CXR["patient_id"]]

    nobody = search(client, keys, {"identifier": "NO-SUCH-MRN"})
    assert nobody.status_code == 200 and nobody.json() == []

    searches = view_runs(runtime)
    assert [fhir_paths(t)[0].split("?")[1].split("=")[0] for t in searches] == [
        "identifier",
        "family",
        "family",
        "identifier",
    ]
    # what was searched is content (it names a patient), kept apart from the metadata auditors read
    assert searches[1].events[0].content["query"] == {"family": "Quill", "given": "Arthur", "birthdate": "1959-03-11"}
    metadata_only = load_run(runtime.engine, searches[1].run.run_id, include_content=False)
    assert "Quill" not in json.dumps(metadata_only.events[0].meta)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        # (app.py's handler names only the failing location; for these, the whole body)
        ({"name": "Arthur Quill"}, "body"),
        ({"birthdate": "1959-03-11"}, "body"),
        ({}, "body"),
        ({"identifier": "MRN-1", "name": "Arthur Quill", "birthdate": "1959-03-11"}, "body"),
        ({"name": "Arthur Quill", "birthdate": "11/03/1959"}, "body.birthdate"),
        ({"name": "Arthur Quill", "birthdate": "1959-02-29"}, "body.birthdate"),  # not a leap year
        ({"identifier": "a,b"}, "body.identifier"),
        ({"identifier": "MRN-1", "name": None}, "body"),
        ({"identifier": "MRN-1", "ssn": "x"}, "body.ssn"),
    ],
)
def test_bad_searches_are_refused_before_any_read(
    client: TestClient, keys: Keys, runtime: AgentRuntime, body: dict[str, Any], says: str
) -> None:
    reply = search(client, keys, body)
    assert reply.status_code == 422
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert reply.json()["code"] == "invalid_request" and says in reply.json()["detail"]
    assert view_runs(runtime) == []


def test_search_rules_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="not both"):
        PatientSearch(identifier="MRN-1", name="Arthur Quill", birthdate="1959-03-11")
    with pytest.raises(ValidationError, match="a name and a birth date"):
        PatientSearch(name="Arthur Quill")
    with pytest.raises(ValidationError, match="leave out rather than null"):
        PatientSearch.model_validate({"identifier": "MRN-1", "birthdate": None})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    identifier=st.from_regex(IDENTIFIER_PATTERN, fullmatch=True).filter(lambda v: len(v) <= 401),
    name=st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda v: len(v) <= 200),
    birthdate=st.from_regex(BIRTHDATE_PATTERN, fullmatch=True),
)
def test_whatever_the_schema_allows_the_resolution_step_accepts(identifier: str, name: str, birthdate: str) -> None:
    # The API's schema promises these searches are well formed; PatientQuery must agree, or a
    # client following the schema would be refused.
    assert PatientSearch(identifier=identifier).query().identifier is not None
    assert PatientSearch(name=name, birthdate=birthdate).query().family


def test_patients_need_a_clinician(client: TestClient, keys: Keys, runtime: AgentRuntime) -> None:
    assert client.get("/v1/patients").status_code == 401
    refused = client.get("/v1/patients", headers=keys.auditor_headers())
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    body = {"identifier": CXR["mrn"]}
    assert client.post("/v1/patients/_search", json=body).status_code == 401
    assert client.post("/v1/patients/_search", json=body, headers=keys.auditor_headers()).status_code == 403
    assert view_runs(runtime) == []


# -- a run's sources --------------------------------------------------------------------------------


def test_a_cited_source_opens_as_the_run_read_it(
    client: TestClient, keys: Keys, runtime: AgentRuntime, asked: dict[str, Any]
) -> None:
    run_id = asked["run_id"]
    valid = next(c["reference"] for c in asked["citations"] if c["valid"])
    assert valid.startswith("Condition/") and valid in asked["sources"]

    reply = client.get(f"/v1/runs/{run_id}/sources/{valid}", headers=keys.clinician_headers())
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/fhir+json")
    assert reply.headers["cache-control"] == "no-store"
    resource = reply.json()
    assert f"{resource['resourceType']}/{resource['id']}" == valid
    assert resource["subject"]["reference"] == f"Patient/{CXR['patient_id']}"

    (view,) = view_runs(runtime)
    assert view.run.status == "ok" and view.run.patient_ref == f"Patient/{CXR['patient_id']}"
    assert view.run.user_id == "dr-house" and view.run.purpose_of_use == "TREAT"
    assert fhir_paths(view) == [valid]
    assert view.events[0].content == {"view": "source", "run_id": run_id, "reference": valid}
    assert verify_trace(runtime.engine, verifiers={}, run_id=view.run.run_id).ok


def _other_patients_condition() -> str:
    bundle = json.loads((DEFAULT_FIXTURES / PATIENTS["noimg"]["bundle"]).read_text())
    resources = [entry["resource"] for entry in bundle["entry"]]
    return next(f"Condition/{r['id']}" for r in resources if r["resourceType"] == "Condition")


def test_only_the_runs_own_sources_open(
    client: TestClient, keys: Keys, runtime: AgentRuntime, asked: dict[str, Any]
) -> None:
    run_id = asked["run_id"]
    dangling = next(c["reference"] for c in asked["citations"] if not c["valid"])
    other = _other_patients_condition()  # exists on the source, but this run never read it
    for reference in (dangling, other):
        reply = client.get(f"/v1/runs/{run_id}/sources/{reference}", headers=keys.clinician_headers())
        assert reply.status_code == 404, reference
        assert reply.json()["code"] == "not_a_run_source" and reference in reply.json()["detail"]

    valid = next(c["reference"] for c in asked["citations"] if c["valid"])
    auditor = client.get(f"/v1/runs/{run_id}/sources/{valid}", headers=keys.auditor_headers())
    assert auditor.status_code == 403 and auditor.json()["code"] == "forbidden"
    unknown_run = client.get(f"/v1/runs/no-such-run/sources/{valid}", headers=keys.clinician_headers())
    assert unknown_run.status_code == 404 and unknown_run.json()["code"] == "run_not_found"
    malformed = client.get(f"/v1/runs/{run_id}/sources/condition/x y", headers=keys.clinician_headers())
    assert malformed.status_code == 422
    assert view_runs(runtime) == []  # nothing was read, so nothing to trace


# -- a run's images ---------------------------------------------------------------------------------


def test_thumbnail_of_an_analysed_image(
    client: TestClient, keys: Keys, runtime: AgentRuntime, asked: dict[str, Any]
) -> None:
    run_id = asked["run_id"]
    uid = asked["findings"][0]["image"]["sop_instance_uid"]
    reply = client.get(f"/v1/runs/{run_id}/images/{uid}.png", params={"size": 96}, headers=keys.clinician_headers())
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png" and reply.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(reply.content))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB"
    assert max(image.size) <= 96 and image.size[0] == image.size[1]  # padded to square, as the models saw it
    assert ImageStat.Stat(image.convert("L")).stddev[0] > 5  # a picture, not a blank

    default = client.get(f"/v1/runs/{run_id}/images/{uid}.png", headers=keys.clinician_headers())
    assert max(Image.open(io.BytesIO(default.content)).size) <= 256

    view = view_runs(runtime)[0]
    assert view.run.status == "ok" and view.run.patient_ref == f"Patient/{CXR['patient_id']}"
    retrieved = [e.meta for e in view.events if e.kind == "dicom_retrieval"]
    assert [(m["action"], m["sop_instance_uid"]) for m in retrieved] == [("retrieve", uid)]
    rendered = next(e for e in view.events if e.kind == "node_finished" and e.name == "render_image")
    assert rendered.meta["outputs"]["steps"][0].startswith("preset ")


def test_images_the_run_did_not_analyse_are_refused(
    client: TestClient, keys: Keys, runtime: AgentRuntime, asked: dict[str, Any]
) -> None:
    run_id = asked["run_id"]
    prior = next(s for s in CXR["studies"] if s["started"].startswith("2024"))
    not_analysed = prior["instances"][0]["sop_instance_uid"]  # the prior study: on disk, not in this run
    reply = client.get(f"/v1/runs/{run_id}/images/{not_analysed}.png", headers=keys.clinician_headers())
    assert reply.status_code == 404 and reply.json()["code"] == "not_a_run_image"
    assert client.get(f"/v1/runs/{run_id}/images/not-a-uid.png", headers=keys.clinician_headers()).status_code == 422
    uid = asked["findings"][0]["image"]["sop_instance_uid"]
    too_big = client.get(f"/v1/runs/{run_id}/images/{uid}.png", params={"size": 5000}, headers=keys.clinician_headers())
    assert too_big.status_code == 422
    assert client.get(f"/v1/runs/{run_id}/images/{uid}.png", headers=keys.auditor_headers()).status_code == 403
    assert view_runs(runtime) == []


def test_a_failed_read_is_traced_as_a_failed_view(
    client: TestClient, keys: Keys, runtime: AgentRuntime, asked: dict[str, Any], tmp_path: Path
) -> None:
    uid = asked["findings"][0]["image"]["sop_instance_uid"]
    runtime.settings.dicom.dicom_dir = tmp_path / "emptied-archive"  # the study has gone from the archive
    (tmp_path / "emptied-archive").mkdir()
    reply = client.get(f"/v1/runs/{asked['run_id']}/images/{uid}.png", headers=keys.clinician_headers())
    assert reply.status_code == 502 and reply.json()["code"] == "source_unavailable"
    (view,) = view_runs(runtime)
    assert reply.json()["run_id"] == view.run.run_id
    assert view.run.status == "failed"
    assert view.events[-1].meta["failing_step"] == "render_image"
    assert [e.status for e in view.events if e.kind == "dicom_retrieval"] == ["failed"]


# -- info -------------------------------------------------------------------------------------------


def test_info_names_version_models_and_the_disclaimer(client: TestClient, runtime: AgentRuntime) -> None:
    info = client.get("/v1/info").json()  # no credentials: nothing in it is about a patient
    assert info["version"] and "not a diagnostic device" in info["disclaimer"]
    assert info["models"] == {"reasoner": runtime.settings.models.medgemma, "scorer": runtime.settings.models.medsiglip}
    assert info["test_models"] is False and info["model_backend"] == "local"
    spec = client.get("/openapi.json").json()
    assert {"/v1/patients", "/v1/patients/_search", "/v1/info"} <= set(spec["paths"])
    assert "/v1/runs/{run_id}/images/{sop_instance_uid}.png" in spec["paths"]
