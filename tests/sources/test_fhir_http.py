"""HttpFhirSource: against the live FHIR engine, and fault cases through httpx.MockTransport."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from agent.config import FhirSettings
from agent.domain.events import ListObserver
from agent.errors import InvalidResourceError, PatientNotFoundError, SourceUnavailableError
from agent.sources.fhir_http import HttpFhirSource
from tests.support.servers import REPO_ROOT, FhirServerHandle, free_port, load_fhir_bundles

MANIFEST = REPO_ROOT / "fixtures" / "manifest.json"
OBSERVATIONS = 7


@pytest.fixture(scope="module")
def seeded(fhir_server: FhirServerHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Load one patient with a condition and seven observations, ids unique to this module."""
    patient_id = str(uuid.uuid4())
    condition_id = str(uuid.uuid4())
    observation_ids = [str(uuid.uuid4()) for _ in range(OBSERVATIONS)]

    def put(resource: dict[str, Any]) -> dict[str, Any]:
        ref = f"{resource['resourceType']}/{resource['id']}"
        return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource, "request": {"method": "PUT", "url": ref}}

    subject = {"reference": f"urn:uuid:{patient_id}"}
    entries = [
        put(
            {
                "resourceType": "Patient",
                "id": patient_id,
                "identifier": [{"system": "urn:test:mrn", "value": f"MRN-{patient_id[:8]}"}],
                "name": [{"family": "Testperson", "given": ["Paging"]}],
                "birthDate": "1980-05-06",
            }
        ),
        put({"resourceType": "Condition", "id": condition_id, "subject": subject, "code": {"text": "asthma"}}),
    ]
    for index, oid in enumerate(observation_ids):
        entries.append(
            put(
                {
                    "resourceType": "Observation",
                    "id": oid,
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": subject,
                    "effectiveDateTime": f"2024-01-{index + 1:02d}",
                    "valueQuantity": {"value": 60 + index, "unit": "/min"},
                }
            )
        )
    path = tmp_path_factory.mktemp("seed") / "seed.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
    load_fhir_bundles(fhir_server.base_url, [path])
    return {
        "patient_id": patient_id,
        "condition_id": condition_id,
        "observation_ids": observation_ids,
        "mrn": f"MRN-{patient_id[:8]}",
    }


# -- live server ---------------------------------------------------------------------------------


async def test_read_patient(fhir_server: FhirServerHandle, seeded: dict[str, Any]) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        patient = await source.read("Patient", seeded["patient_id"])
    assert patient["resourceType"] == "Patient"
    assert patient["name"][0]["family"] == "Testperson"
    [event] = observer.fhir
    assert event.backend == "http"
    assert event.method == "GET"
    assert event.path == f"Patient/{seeded['patient_id']}"
    assert event.status == 200
    assert event.resource_ids == [f"Patient/{seeded['patient_id']}"]
    assert event.error is None
    assert event.duration_ms > 0


async def test_search_by_patient(fhir_server: FhirServerHandle, seeded: dict[str, Any]) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        conditions = await source.search("Condition", {"patient": seeded["patient_id"]})
        by_identifier = await source.search("Patient", {"identifier": f"urn:test:mrn|{seeded['mrn']}"})
    assert [c["id"] for c in conditions] == [seeded["condition_id"]]
    assert [p["id"] for p in by_identifier] == [seeded["patient_id"]]
    assert observer.fhir[0].path == f"Condition?patient={seeded['patient_id']}"
    assert observer.fhir[0].resource_ids == [f"Condition/{seeded['condition_id']}"]


async def test_search_follows_next_links_across_pages(fhir_server: FhirServerHandle, seeded: dict[str, Any]) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        found = await source.search("Observation", {"patient": seeded["patient_id"], "_count": "3"})
    assert sorted(o["id"] for o in found) == sorted(seeded["observation_ids"])
    assert len(observer.fhir) == 3  # 3 + 3 + 1
    assert [len(e.resource_ids) for e in observer.fhir] == [3, 3, 1]
    assert "_offset" not in observer.fhir[0].path
    assert all(e.path.startswith("Observation?") for e in observer.fhir)
    assert "_offset=3" in observer.fhir[1].path and "_offset=6" in observer.fhir[2].path
    assert all(e.status == 200 and e.error is None for e in observer.fhir)


async def test_search_stops_at_max_pages_and_says_so(fhir_server: FhirServerHandle, seeded: dict[str, Any]) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer, max_pages=2) as source:
        found = await source.search("Observation", {"patient": seeded["patient_id"], "_count": "2"})
    assert len(found) == 4
    assert len(observer.fhir) == 2
    assert observer.fhir[-1].error is not None and observer.fhir[-1].error.startswith("truncated")


async def test_read_unknown_patient_raises_patient_not_found(fhir_server: FhirServerHandle) -> None:
    observer = ListObserver()
    missing = str(uuid.uuid4())
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        with pytest.raises(PatientNotFoundError) as info:
            await source.read("Patient", missing)
    assert info.value.message == f"patient {missing} not found on {fhir_server.base_url}"
    assert observer.fhir[0].status == 404
    assert observer.fhir[0].error


async def test_read_unknown_other_type_is_source_unavailable(fhir_server: FhirServerHandle) -> None:
    async with HttpFhirSource(fhir_server.base_url, observer=ListObserver()) as source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.read("Observation", str(uuid.uuid4()))
    assert info.value.details == {"status": 404}


async def test_fixture_patients_are_served(fhir_server: FhirServerHandle) -> None:
    if not MANIFEST.is_file():
        pytest.skip("fixtures/manifest.json is not generated yet")
    manifest = json.loads(MANIFEST.read_text())
    async with HttpFhirSource(fhir_server.base_url, observer=ListObserver()) as source:
        for patient in manifest["patients"]:
            resource = await source.read("Patient", patient["patient_id"])
            assert any(i.get("value") == patient["mrn"] for i in resource.get("identifier", []))
            by_mrn = await source.search("Patient", {"identifier": f"{patient['mrn_system']}|{patient['mrn']}"})
            assert [p["id"] for p in by_mrn] == [patient["patient_id"]]
            studies = await source.search("ImagingStudy", {"patient": patient["patient_id"], "_count": "1"})
            assert sorted(s["id"] for s in studies) == sorted(s["imaging_study_id"] for s in patient["studies"])
            bundle = json.loads((REPO_ROOT / "fixtures" / patient["bundle"]).read_text())
            expected = {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"}
            observations = await source.search("Observation", {"patient": patient["patient_id"], "_count": "5"})
            assert {o["id"] for o in observations} == expected


async def test_unreachable_server_is_source_unavailable_without_query_values() -> None:
    port = free_port()  # nothing listens there now
    observer = ListObserver()
    async with HttpFhirSource(f"http://127.0.0.1:{port}/fhir", observer=observer, timeout_s=5) as source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.search("Patient", {"identifier": "urn:mrn|MRN-SECRET-42"})
    message = info.value.message
    assert f"127.0.0.1:{port}" in message
    assert "could not be reached" in message
    assert "MRN-SECRET-42" not in message
    [event] = observer.fhir
    assert event.status is None and event.error == message


# -- fault injection through MockTransport --------------------------------------------------------

BASE = "https://fhir.example.org/r4"


def _source(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> tuple[HttpFhirSource, ListObserver]:
    observer = ListObserver()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpFhirSource(BASE, observer=observer, client=client, **kwargs), observer


def _bundle(resources: list[dict[str, Any]], next_url: str | None = None, mode: str | None = "match") -> dict[str, Any]:
    entries = [{"resource": r, **({"search": {"mode": mode}} if mode else {})} for r in resources]
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries, "link": links}


async def test_server_error_reports_status_and_outcome_diagnostics() -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": "database is down"}],
    }
    source, observer = _source(lambda request: httpx.Response(500, json=outcome))
    with pytest.raises(SourceUnavailableError) as info:
        await source.search("Condition", {"patient": "p1"})
    assert "HTTP 500" in info.value.message
    assert "database is down" in info.value.message
    assert info.value.details == {"status": 500}
    assert observer.fhir[0].status == 500
    assert observer.fhir[0].error == info.value.message


async def test_invalid_json_is_invalid_resource() -> None:
    source, observer = _source(lambda request: httpx.Response(200, content=b"<html>oops</html>"))
    with pytest.raises(InvalidResourceError):
        await source.read("Patient", "p1")
    assert observer.fhir[0].status == 200 and observer.fhir[0].error


async def test_search_answer_that_is_not_a_bundle_is_invalid_resource() -> None:
    source, _ = _source(lambda request: httpx.Response(200, json={"resourceType": "Patient", "id": "p1"}))
    with pytest.raises(InvalidResourceError, match="instead of a Bundle"):
        await source.search("Patient", {})


async def test_read_of_wrong_type_is_invalid_resource() -> None:
    source, _ = _source(lambda request: httpx.Response(200, json={"resourceType": "Observation", "id": "p1"}))
    with pytest.raises(InvalidResourceError):
        await source.read("Patient", "p1")


async def test_authentication_failure_is_named() -> None:
    source, observer = _source(lambda request: httpx.Response(401, json={"resourceType": "OperationOutcome"}))
    with pytest.raises(SourceUnavailableError, match="authentication failed"):
        await source.read("Patient", "p1")
    assert observer.fhir[0].status == 401


async def test_timeout_names_the_limit() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    source, observer = _source(handler, timeout_s=5)
    with pytest.raises(SourceUnavailableError, match=r"timed out after 5s"):
        await source.read("Patient", "p1")
    assert observer.fhir[0].status is None


async def test_relative_next_links_are_followed_and_includes_left_out() -> None:
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        if "page=2" in str(request.url):
            return httpx.Response(200, json=_bundle([{"resourceType": "Condition", "id": "c2"}]))
        page = _bundle([{"resourceType": "Condition", "id": "c1"}], next_url="Condition?patient=p1&page=2")
        page["entry"].append({"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "include"}})
        return httpx.Response(200, json=page)

    source, observer = _source(handler)
    found = await source.search("Condition", {"patient": "p1"})
    assert [r["id"] for r in found] == ["c1", "c2"]
    assert requested == [f"{BASE}/Condition?patient=p1", f"{BASE}/Condition?patient=p1&page=2"]
    assert [e.path for e in observer.fhir] == ["Condition?patient=p1", "Condition?patient=p1&page=2"]
    assert observer.fhir[0].resource_ids == ["Condition/c1"]


async def test_entries_without_mode_count_when_of_the_searched_type() -> None:
    bundle = _bundle(
        [{"resourceType": "Condition", "id": "c1"}, {"resourceType": "OperationOutcome", "id": "oo"}], mode=None
    )
    source, _ = _source(lambda request: httpx.Response(200, json=bundle))
    assert [r["id"] for r in await source.search("Condition", {})] == ["c1"]


async def test_next_link_to_another_host_is_refused() -> None:
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        return httpx.Response(
            200,
            json=_bundle([{"resourceType": "Condition", "id": "c1"}], next_url="https://evil.example.com/r4/Condition"),
        )

    source, _ = _source(handler, username="u", password="p")
    with pytest.raises(InvalidResourceError, match="another origin"):
        await source.search("Condition", {"patient": "p1"})
    assert requested == [f"{BASE}/Condition?patient=p1"]


async def test_next_link_downgrading_to_http_is_refused() -> None:
    page = _bundle([], next_url="http://fhir.example.org/r4/Condition?page=2")
    source, _ = _source(lambda request: httpx.Response(200, json=page))
    with pytest.raises(InvalidResourceError, match="another origin"):
        await source.search("Condition", {})


async def test_repeated_next_link_does_not_loop() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=_bundle([{"resourceType": "Condition", "id": "c1"}], next_url=str(request.url)))

    source, _ = _source(handler)
    assert [r["id"] for r in await source.search("Condition", {"patient": "p1"})] == ["c1"]
    assert calls == 1


async def test_basic_auth_and_accept_header_are_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})

    source, _ = _source(handler, username="alice", password="s3cret")
    await source.read("Patient", "p1")
    assert seen[0].headers["accept"] == "application/fhir+json"
    assert seen[0].headers["authorization"] == httpx.BasicAuth("alice", "s3cret")._auth_header


async def test_bearer_token_wins_over_basic_auth() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})

    source, _ = _source(handler, username="alice", password="x", bearer_token="tok")
    await source.read("Patient", "p1")
    assert seen[0].headers["authorization"] == "Bearer tok"


async def test_ids_are_escaped_and_types_checked() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"resourceType": "OperationOutcome"})

    source, _ = _source(handler)
    with pytest.raises(PatientNotFoundError):
        await source.read("Patient", "../metadata?x=1")
    assert seen[0].url.raw_path == b"/r4/Patient/..%2Fmetadata%3Fx%3D1"
    with pytest.raises(ValueError):
        await source.read("Patient/../x", "1")


async def test_from_settings_unwraps_secrets(tmp_path: Path) -> None:
    settings = FhirSettings(
        base_url="https://fhir.example.org/r4/", bearer_token=SecretStr("tok"), max_pages=3, timeout_s=7
    )
    source = HttpFhirSource.from_settings(settings, ListObserver())
    try:
        assert source.base_url == BASE
        assert source._headers["Authorization"] == "Bearer tok"
        assert source._max_pages == 3
    finally:
        await source.aclose()
    with pytest.raises(ValueError):
        HttpFhirSource.from_settings(FhirSettings(bundle_dir=tmp_path), ListObserver())
