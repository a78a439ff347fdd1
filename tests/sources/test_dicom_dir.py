"""DicomDirSource against the project's fixture folder (and broken copies of it in tmp_path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.domain.events import ListObserver
from agent.domain.refs import InstanceRef
from agent.errors import SourceUnavailableError
from agent.sources.dicom_dir import DicomDirSource
from agent.sources.pixels import prepare_instance
from agent.sources.protocols import DicomSource

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DICOM_DIR = FIXTURES / "dicom"


def _patient(key: str) -> dict[str, Any]:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    patient: dict[str, Any] = next(p for p in manifest["patients"] if p["key"] == key)
    return patient


def _study(key: str, index: int) -> dict[str, Any]:
    study: dict[str, Any] = _patient(key)["studies"][index]
    return study


@pytest.fixture
def observer() -> ListObserver:
    return ListObserver()


@pytest.fixture
def source(observer: ListObserver) -> DicomDirSource:
    return DicomDirSource(DICOM_DIR, observer)


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    shutil.copytree(DICOM_DIR, root)
    return root


def test_satisfies_the_protocol(source: DicomDirSource) -> None:
    typed: DicomSource = source  # checked by mypy; here it only has to construct
    assert typed is source


async def test_lists_current_cxr_frontal_series_first(source: DicomDirSource, observer: ListObserver) -> None:
    study = _study("cxr", 1)
    refs = await source.list_instances(study["study_uid"])
    assert [r.view_position for r in refs] == ["PA", "LL"]
    assert {r.modality for r in refs} == {"DX"}
    assert {r.sop_instance_uid for r in refs} == {i["sop_instance_uid"] for i in study["instances"]}
    assert len({r.series_uid for r in refs}) == 2
    assert all(r.study_uid == study["study_uid"] for r in refs)
    (event,) = observer.dicom
    assert (event.backend, event.action, event.study_uid, event.error) == (
        "dicom-dir",
        "search",
        study["study_uid"],
        None,
    )


async def test_lists_ct_slices_in_instance_order(source: DicomDirSource) -> None:
    refs = await source.list_instances(_study("ct", 0)["study_uid"])
    assert [r.instance_number for r in refs] == [1, 2, 3, 4]
    assert {r.modality for r in refs} == {"CT"}
    assert all(r.view_position is None for r in refs)


async def test_retrieve_returns_pixels_and_records_the_read(source: DicomDirSource, observer: ListObserver) -> None:
    study = _study("cxr", 0)
    (ref,) = await source.list_instances(study["study_uid"])
    ds = await source.retrieve(ref)
    assert "PixelData" in ds
    assert ds.pixel_array.shape == (256, 200)
    search, read = observer.dicom
    assert search.action == "search"
    assert read.action == "retrieve"
    assert (read.study_uid, read.series_uid, read.sop_instance_uid) == (
        ref.study_uid,
        ref.series_uid,
        ref.sop_instance_uid,
    )
    assert read.transfer_syntax == "1.2.840.10008.1.2.1"
    assert read.bytes == (FIXTURES / study["files"][0]).stat().st_size
    assert read.error is None and read.duration_ms >= 0
    prepared = prepare_instance(ds, ref)
    assert prepared.image.size == (256, 256)
    assert np.asarray(prepared.image).any()


async def test_events_and_errors_carry_no_patient_name(source: DicomDirSource, observer: ListObserver) -> None:
    for key in ("cxr", "ct"):
        for study in _patient(key)["studies"]:
            for ref in await source.list_instances(study["study_uid"]):
                await source.retrieve(ref)
    with pytest.raises(SourceUnavailableError) as info:
        await source.list_instances("1.2.3.999")
    dumped = json.dumps([e.model_dump() for e in observer.dicom]) + info.value.message
    for key in ("cxr", "ct"):
        family, given = _patient(key)["name"].split()[::-1]
        assert family not in dumped and given not in dumped
        assert _patient(key)["mrn"] not in dumped


async def test_missing_folder(tmp_path: Path, observer: ListObserver) -> None:
    source = DicomDirSource(tmp_path / "nowhere", observer)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        await source.list_instances("1.2.3")
    (event,) = observer.dicom
    assert event.action == "search" and event.error is not None


async def test_unknown_study_is_an_error_not_an_empty_list(source: DicomDirSource, observer: ListObserver) -> None:
    with pytest.raises(SourceUnavailableError, match=r"study 1\.2\.3\.999 not found") as info:
        await source.list_instances("1.2.3.999")
    assert info.value.code == "source_unavailable"
    assert observer.dicom[-1].error is not None


async def test_unknown_instance(source: DicomDirSource, observer: ListObserver) -> None:
    ref = InstanceRef(study_uid="1.2.3", series_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5")
    with pytest.raises(SourceUnavailableError, match=r"instance 1\.2\.3\.4\.5 not found"):
        await source.retrieve(ref)
    assert observer.dicom[-1].action == "retrieve"
    assert observer.dicom[-1].error is not None


async def test_file_corrupted_after_indexing(copied: Path, observer: ListObserver) -> None:
    source = DicomDirSource(copied, observer)
    study = _study("cxr", 1)
    refs = await source.list_instances(study["study_uid"])
    target = copied / "cxr-current" / "pa.dcm"
    target.write_bytes(target.read_bytes()[:300])  # cut inside the header
    with pytest.raises(SourceUnavailableError, match=r"cannot read DICOM file cxr-current/pa\.dcm") as info:
        await source.retrieve(refs[0])
    assert info.value.details["file"] == "cxr-current/pa.dcm"
    event = observer.dicom[-1]
    assert event.action == "retrieve" and event.error is not None and event.bytes is None


async def test_file_replaced_after_indexing(copied: Path, observer: ListObserver) -> None:
    source = DicomDirSource(copied, observer)
    refs = await source.list_instances(_study("cxr", 1)["study_uid"])
    shutil.copyfile(copied / "cxr-prior" / "pa.dcm", copied / "cxr-current" / "pa.dcm")
    with pytest.raises(SourceUnavailableError, match="changed since it was indexed"):
        await source.retrieve(refs[0])


async def test_unreadable_file_at_scan_time_is_skipped(copied: Path, observer: ListObserver) -> None:
    (copied / "garbage.dcm").write_bytes(b"not a dicom file at all")
    source = DicomDirSource(copied, observer)
    refs = await source.list_instances(_study("ct", 0)["study_uid"])
    assert len(refs) == 4
    assert source.unreadable == ["garbage.dcm"]


async def test_study_added_after_first_scan_is_found(tmp_path: Path, observer: ListObserver) -> None:
    root = tmp_path / "dicom"
    shutil.copytree(DICOM_DIR / "ct-chest", root / "ct-chest")
    source = DicomDirSource(root, observer)
    await source.list_instances(_study("ct", 0)["study_uid"])
    shutil.copytree(DICOM_DIR / "cxr-prior", root / "cxr-prior")
    refs = await source.list_instances(_study("cxr", 0)["study_uid"])
    assert len(refs) == 1


async def test_aclose_forgets_the_index(source: DicomDirSource) -> None:
    await source.list_instances(_study("ct", 0)["study_uid"])
    await source.aclose()
    assert len(await source.list_instances(_study("ct", 0)["study_uid"])) == 4


async def test_series_descriptions_are_listed(source: DicomDirSource) -> None:
    refs = await source.list_instances(_study("cxr", 1)["study_uid"])
    assert [(r.view_position, r.series_description) for r in refs] == [("PA", "CHEST PA"), ("LL", "CHEST LAT")]


async def test_search_studies_newest_first_with_their_summary(source: DicomDirSource, observer: ListObserver) -> None:
    found = await source.search_studies()
    expected = sorted(
        (s for key in ("cxr", "ct") for s in _patient(key)["studies"]), key=lambda s: s["started"], reverse=True
    )
    assert [s.study_uid for s in found] == [s["study_uid"] for s in expected]
    current = next(s for s in found if s.study_uid == _study("cxr", 1)["study_uid"])
    assert current.model_dump() == {
        "study_uid": _study("cxr", 1)["study_uid"],
        "patient_id": _patient("cxr")["mrn"],
        "modalities": ("DX",),
        "study_date": "20261014",
        "description": "XR CHEST PA AND LATERAL",
        "number_of_instances": 2,
    }
    (event,) = observer.dicom
    assert (event.backend, event.action, event.study_uid, event.error) == ("dicom-dir", "search", None, None)


async def test_search_studies_filters(source: DicomDirSource) -> None:
    cxr, ct = _patient("cxr"), _patient("ct")
    by_patient = await source.search_studies(patient_id=cxr["mrn"])
    assert {s.study_uid for s in by_patient} == {s["study_uid"] for s in cxr["studies"]}
    assert [s.study_uid for s in await source.search_studies(patient_id=cxr["mrn"], limit=1)] == [
        cxr["studies"][1]["study_uid"]  # the newer one
    ]
    assert [s.study_uid for s in await source.search_studies(modality="ct")] == [ct["studies"][0]["study_uid"]]
    assert await source.search_studies(patient_id=ct["mrn"], modality="DX") == []
    [one] = await source.search_studies(study_uid=cxr["studies"][0]["study_uid"])
    assert (one.description, one.number_of_instances) == ("XR CHEST PA", 1)
    assert await source.search_studies(patient_id="MRN-NOBODY") == []
    with pytest.raises(ValueError, match="limit"):
        await source.search_studies(limit=0)


async def test_search_studies_finds_studies_added_after_the_first_scan(tmp_path: Path, observer: ListObserver) -> None:
    root = tmp_path / "dicom"
    shutil.copytree(DICOM_DIR / "ct-chest", root / "ct-chest")
    source = DicomDirSource(root, observer)
    assert await source.search_studies(patient_id=_patient("cxr")["mrn"]) == []
    shutil.copytree(DICOM_DIR / "cxr-prior", root / "cxr-prior")
    [found] = await source.search_studies(patient_id=_patient("cxr")["mrn"])
    assert found.study_uid == _study("cxr", 0)["study_uid"]


async def test_search_studies_in_a_missing_folder(tmp_path: Path, observer: ListObserver) -> None:
    source = DicomDirSource(tmp_path / "nowhere", observer)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        await source.search_studies()
    assert observer.dicom[-1].error is not None
