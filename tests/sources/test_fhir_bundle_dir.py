"""BundleDirFhirSource over small folders built here and over fixtures/fhir; the FHIR factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import FhirSettings
from agent.domain.events import ListObserver
from agent.errors import InvalidResourceError, PatientNotFoundError, SourceUnavailableError
from agent.sources.factory import make_fhir_source
from agent.sources.fhir_bundle_dir import BundleDirFhirSource
from agent.sources.fhir_http import HttpFhirSource

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "fixtures"

P1 = "11111111-1111-4111-8111-111111111111"
P2 = "22222222-2222-4222-8222-222222222222"


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a transaction bundle (urn:uuid links), a collection and a lone resource."""
    root = tmp_path / "bundles"
    _write(
        root / "a.json",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{P1}",
                    "resource": {
                        "resourceType": "Patient",
                        "id": P1,
                        "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
                        "name": [{"family": "Quill", "given": ["Arthur"]}],
                        "birthDate": "1959-03-11",
                    },
                    "request": {"method": "PUT", "url": f"Patient/{P1}"},
                },
                {
                    # No id in the resource: it comes from the request URL.
                    "fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001",
                    "resource": {"resourceType": "Condition", "subject": {"reference": f"urn:uuid:{P1}"}},
                    "request": {"method": "PUT", "url": "Condition/c1"},
                },
                {
                    "resource": {
                        "resourceType": "AllergyIntolerance",
                        "id": "a1",
                        "patient": {"reference": f"Patient/{P1}"},
                    },
                    "request": {"method": "PUT", "url": "AllergyIntolerance/a1"},
                },
                {"request": {"method": "DELETE", "url": "Condition/gone"}},
            ],
        },
    )
    _write(
        root / "nested" / "b.json",
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Patient", "id": P2, "name": [{"family": "Lindqvist"}]}},
                {"resource": {"resourceType": "Condition", "id": "c2", "subject": {"reference": f"Patient/{P2}"}}},
                {"resource": {"resourceType": "Condition", "id": "c3", "subject": {"reference": f"Group/{P1}"}}},
            ],
        },
    )
    _write(root / "lone.json", {"resourceType": "Observation", "id": "o1", "subject": {"reference": f"Patient/{P1}"}})
    return root


async def test_read_and_events(folder: Path) -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(folder, observer=observer)
    patient = await source.read("Patient", P1)
    assert patient["name"][0]["family"] == "Quill"
    [event] = observer.fhir
    assert (event.backend, event.method, event.path, event.status) == ("bundle-dir", "GET", f"Patient/{P1}", 200)
    assert event.resource_ids == [f"Patient/{P1}"]


async def test_returned_resources_are_copies(folder: Path) -> None:
    source = BundleDirFhirSource(folder, observer=ListObserver())
    (await source.read("Patient", P1))["name"] = []
    assert (await source.read("Patient", P1))["name"]


async def test_search_by_patient_resolves_urn_references(folder: Path) -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(folder, observer=observer)
    conditions = await source.search("Condition", {"patient": P1})
    assert [c["id"] for c in conditions] == ["c1"]
    assert conditions[0]["subject"]["reference"] == f"Patient/{P1}"
    assert observer.fhir[0].path == f"Condition?patient={P1}"
    assert observer.fhir[0].resource_ids == ["Condition/c1"]

    assert [c["id"] for c in await source.search("Condition", {"patient": f"Patient/{P2}"})] == ["c2"]
    assert [a["id"] for a in await source.search("AllergyIntolerance", {"patient": P1})] == ["a1"]
    assert [o["id"] for o in await source.search("Observation", {"patient": P1, "_count": "1", "_sort": "-date"})] == [
        "o1"
    ]


async def test_subject_matches_any_type_with_a_bare_id(folder: Path) -> None:
    source = BundleDirFhirSource(folder, observer=ListObserver())
    assert sorted(c["id"] for c in await source.search("Condition", {"subject": P1})) == ["c1", "c3"]
    assert [c["id"] for c in await source.search("Condition", {"subject": f"Group/{P1}"})] == ["c3"]
    assert sorted(c["id"] for c in await source.search("Condition", {"patient": f"{P1},{P2}"})) == ["c1", "c2"]


async def test_search_by_id_identifier_name_and_birthdate(folder: Path) -> None:
    source = BundleDirFhirSource(folder, observer=ListObserver())
    assert [p["id"] for p in await source.search("Patient", {"_id": P2})] == [P2]
    assert [p["id"] for p in await source.search("Patient", {"identifier": "urn:mrn|MRN-1"})] == [P1]
    assert [p["id"] for p in await source.search("Patient", {"identifier": "MRN-1"})] == [P1]
    assert await source.search("Patient", {"identifier": "urn:other|MRN-1"}) == []
    assert [p["id"] for p in await source.search("Patient", {"family": "quI", "birthdate": "1959-03-11"})] == [P1]
    assert [p["id"] for p in await source.search("Patient", {"name": "lind"})] == [P2]
    assert sorted(p["id"] for p in await source.search("Patient", {})) == [P1, P2]


async def test_deleted_entries_are_skipped(folder: Path) -> None:
    source = BundleDirFhirSource(folder, observer=ListObserver())
    with pytest.raises(SourceUnavailableError):
        await source.read("Condition", "gone")


async def test_unsupported_parameter_is_refused_like_a_strict_server(folder: Path) -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(folder, observer=observer)
    with pytest.raises(SourceUnavailableError, match="category") as info:
        await source.search("Observation", {"patient": P1, "category": "vital-signs"})
    assert info.value.details == {"status": 400}
    assert observer.fhir[0].status == 400
    with pytest.raises(SourceUnavailableError, match="identifier"):
        await source.search("Condition", {"identifier": "x"})


async def test_unknown_patient_and_unknown_resource(folder: Path) -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(folder, observer=observer)
    with pytest.raises(PatientNotFoundError, match="patient nobody not found"):
        await source.read("Patient", "nobody")
    with pytest.raises(SourceUnavailableError) as info:
        await source.read("Condition", "nothing")
    assert info.value.details == {"status": 404}
    assert [e.status for e in observer.fhir] == [404, 404]


async def test_latest_version_wins(tmp_path: Path) -> None:
    old = {"resourceType": "Patient", "id": "p", "gender": "male", "meta": {"lastUpdated": "2024-01-02T00:00:00Z"}}
    new = {"resourceType": "Patient", "id": "p", "gender": "female", "meta": {"lastUpdated": "2025-01-02T00:00:00Z"}}
    _write(tmp_path / "a.json", new)
    _write(tmp_path / "b.json", old)  # read later, but older
    source = BundleDirFhirSource(tmp_path, observer=ListObserver())
    assert (await source.read("Patient", "p"))["gender"] == "female"


async def test_missing_folder_is_source_unavailable(tmp_path: Path) -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(tmp_path / "nope", observer=observer)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        await source.search("Condition", {"patient": "p"})
    assert observer.fhir[0].status is None and observer.fhir[0].error


async def test_malformed_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps({"resourceType": "Patient", "id": "p"}))
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", ')
    observer = ListObserver()
    source = BundleDirFhirSource(tmp_path, observer=observer)
    with pytest.raises(InvalidResourceError, match=r"broken\.json"):
        await source.read("Patient", "p")
    assert observer.fhir[0].error is not None and "broken.json" in observer.fhir[0].error


async def test_json_that_is_not_fhir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(InvalidResourceError, match=r"x\.json"):
        await BundleDirFhirSource(tmp_path, observer=ListObserver()).search("Patient", {})


async def test_fixture_bundles(tmp_path: Path) -> None:
    manifest_path = FIXTURES / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("fixtures/manifest.json is not generated yet")
    manifest = json.loads(manifest_path.read_text())
    source = BundleDirFhirSource(FIXTURES / "fhir", observer=ListObserver())
    for patient in manifest["patients"]:
        resource = await source.read("Patient", patient["patient_id"])
        assert resource["birthDate"] == patient["birth_date"]
        by_mrn = await source.search("Patient", {"identifier": f"{patient['mrn_system']}|{patient['mrn']}"})
        assert [p["id"] for p in by_mrn] == [patient["patient_id"]]
        studies = await source.search("ImagingStudy", {"patient": patient["patient_id"]})
        assert sorted(s["id"] for s in studies) == sorted(s["imaging_study_id"] for s in patient["studies"])
        bundle = json.loads((FIXTURES / patient["bundle"]).read_text())
        for kind in ("Condition", "Observation", "MedicationRequest", "AllergyIntolerance", "Encounter"):
            expected = {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind}
            found = await source.search(kind, {"patient": patient["patient_id"]})
            assert {r["id"] for r in found} == expected, kind


async def test_factory_picks_the_source(tmp_path: Path) -> None:
    observer = ListObserver()
    local = make_fhir_source(FhirSettings(bundle_dir=tmp_path), observer)
    assert isinstance(local, BundleDirFhirSource) and local.root == tmp_path
    default = make_fhir_source(FhirSettings(), observer)
    assert isinstance(default, BundleDirFhirSource) and default.root == FIXTURES / "fhir"
    remote = make_fhir_source(FhirSettings(base_url="http://127.0.0.1:1/fhir", bundle_dir=tmp_path), observer)
    assert isinstance(remote, HttpFhirSource)
    await remote.aclose()
