"""The synthetic fixtures: valid FHIR, DICOM that matches its ImagingStudy, reproducible bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
GENERATOR = REPO / "tools" / "make_fixtures.py"


def _manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
    return manifest


def _bundles() -> dict[str, dict[str, Any]]:
    return {p["key"]: json.loads((FIXTURES / p["bundle"]).read_text()) for p in _manifest()["patients"]}


def _resources(bundle: dict[str, Any], resource_type: str | None = None) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle["entry"]
        if resource_type is None or e["resource"]["resourceType"] == resource_type
    ]


def _references(node: Any) -> list[str]:
    """Return every ``reference`` string anywhere in a resource."""
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [ref for value in node.values() for ref in _references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _references(value)]
    return []


def test_manifest_lists_the_three_patients() -> None:
    patients = _manifest()["patients"]
    assert [p["key"] for p in patients] == ["cxr", "ct", "noimg"]
    for p in patients:
        assert {"key", "patient_id", "mrn", "mrn_system", "bundle", "studies"} <= p.keys()
        for study in p["studies"]:
            assert {"study_uid", "modality", "imaging_study_id", "started", "files"} <= study.keys()
            assert all((FIXTURES / f).is_file() for f in study["files"])
    cxr, ct, noimg = patients
    assert [s["modality"] for s in cxr["studies"]] == ["DX", "DX"]
    assert cxr["studies"][0]["started"] < cxr["studies"][1]["started"]
    assert [s["modality"] for s in ct["studies"]] == ["CT"]
    assert noimg["studies"] == []


@pytest.mark.parametrize("key", ["cxr", "ct", "noimg"])
def test_bundle_validates_with_fhir_resources_r4b(key: str) -> None:
    bundle = _bundles()[key]
    get_fhir_model_class("Bundle").model_validate(bundle)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        uuid.UUID(resource["id"])  # the test FHIR engine needs UUID ids
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}


@pytest.mark.parametrize("key", ["cxr", "ct", "noimg"])
def test_references_resolve_inside_the_bundle(key: str) -> None:
    bundle = _bundles()[key]
    present = {f"{r['resourceType']}/{r['id']}" for r in _resources(bundle)}
    refs = {ref for r in _resources(bundle) for ref in _references(r)}
    assert refs, "a bundle without references cannot exercise citation checks"
    assert refs <= present


def test_patients_match_the_manifest() -> None:
    for p, bundle in zip(_manifest()["patients"], _bundles().values(), strict=True):
        (patient,) = _resources(bundle, "Patient")
        assert patient["id"] == p["patient_id"]
        assert {"system": p["mrn_system"], "value": p["mrn"]}.items() <= patient["identifier"][0].items()
        assert patient["name"] and patient["gender"] and patient["birthDate"]
        subjects = {
            ref
            for r in _resources(bundle)
            if r["resourceType"] != "Patient"
            for ref in _references({"s": r.get("subject"), "p": r.get("patient")})
        }
        assert subjects == {f"Patient/{p['patient_id']}"}


def _study_triples_from_fhir() -> set[tuple[str, str, str]]:
    triples = set()
    for bundle in _bundles().values():
        for study in _resources(bundle, "ImagingStudy"):
            (uid,) = [i["value"] for i in study["identifier"] if i.get("system") == "urn:dicom:uid"]
            assert uid.startswith("urn:oid:")
            study_uid = uid.removeprefix("urn:oid:")
            assert study["numberOfSeries"] == len(study["series"])
            assert study["numberOfInstances"] == sum(len(s["instance"]) for s in study["series"])
            for series in study["series"]:
                assert series["modality"]["code"] in {m["code"] for m in study["modality"]}
                for instance in series["instance"]:
                    triples.add((study_uid, series["uid"], instance["uid"]))
    return triples


def _dicom_files() -> list[Path]:
    return sorted((FIXTURES / "dicom").rglob("*.dcm"))


def test_every_imaging_study_matches_dicom_files_and_back() -> None:
    from_files = set()
    for path in _dicom_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        from_files.add((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    assert from_files == _study_triples_from_fhir()
    assert len(from_files) == 7


def test_dicom_files_are_part10_and_name_their_patient() -> None:
    by_study = {s["study_uid"]: p for p in _manifest()["patients"] for s in p["studies"]}
    for path in _dicom_files():
        raw = path.read_bytes()
        assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        patient = by_study[str(ds.StudyInstanceUID)]
        assert ds.PatientID == patient["mrn"]
        given, family = patient["name"].split()
        assert str(ds.PatientName) == f"{family}^{given}"


def _generated_files(root: Path) -> list[Path]:
    """Return the generator's outputs under ``root`` (other tools may add files beside them)."""
    files = [root / "manifest.json", root / "README.md"]
    files += [p for sub in ("fhir", "dicom") for p in (root / sub).rglob("*") if p.is_file()]
    return sorted(p.relative_to(root) for p in files if p.is_file())


def test_fixtures_stay_small() -> None:
    total = sum((FIXTURES / rel).stat().st_size for rel in _generated_files(FIXTURES))
    assert total < 2 * 1024 * 1024


def test_generator_is_reproducible(tmp_path: Path) -> None:
    out = tmp_path / "fixtures"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True, capture_output=True)
    made = _generated_files(out)
    assert made == _generated_files(FIXTURES)
    for rel in made:
        assert (out / rel).read_bytes() == (FIXTURES / rel).read_bytes(), f"{rel} differs"
