"""Ingest: a DICOM folder, the live Orthanc (DICOMweb) and an ImagingStudy on the live FHIR server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from agent.config import DEFAULT_FIXTURES, DicomSettings, FhirSettings
from agent.domain.events import ListObserver
from agent.inference.medsiglip import MedSigLIP
from agent.retrieval.file_index import FileIndex
from agent.retrieval.ingest import ingest_dicom_source, ingest_folder, ingest_imaging_study, public_url
from agent.sources.dicomweb import DicomWebSource
from agent.sources.factory import make_fhir_source
from tests.support.servers import FhirServerHandle, OrthancHandle

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
CXR = next(p for p in MANIFEST["patients"] if p["key"] == "cxr")
CURRENT = max(CXR["studies"], key=lambda s: s["started"])
ALL_STUDIES = {s["study_uid"] for p in MANIFEST["patients"] for s in p["studies"]}


def test_folder_ingest_indexes_every_study_and_skips_undecodable(tiny_medsiglip: MedSigLIP, tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(DEFAULT_FIXTURES / "dicom", folder)
    broken = pydicom.dcmread(folder / "cxr-prior" / "pa.dcm")
    broken.StudyInstanceUID, broken.SOPInstanceUID = generate_uid(), generate_uid()
    broken.PixelData = broken.PixelData[:64]  # truncated pixel data: cannot be decoded
    broken.save_as(folder / "broken.dcm")
    (folder / "notes.txt").write_text("not DICOM")

    with FileIndex(tmp_path / "ix", create=True) as index:
        report = ingest_folder(folder, tiny_medsiglip, index, per_study=4)
        info = index.info()
        assert report.studies == ALL_STUDIES
        assert (
            report.added
            == info.count
            == sum(min(4, len(s["instances"])) for p in MANIFEST["patients"] for s in p["studies"])
        )
        assert [item["sop_instance_uid"] for item in report.skipped] == [str(broken.SOPInstanceUID)]
        assert report.skipped[0]["code"] == "dicom_undecodable"
        assert info.model_id == "tiny-medsiglip" and info.revision == tiny_medsiglip.identity.revision

        # An indexed image finds its own study first, with score 1.
        pa = next(i for i in CURRENT["instances"] if i["view_position"] == "PA")
        from agent.domain.refs import InstanceRef
        from agent.sources.pixels import prepare_instance

        ds = pydicom.dcmread(DEFAULT_FIXTURES / pa["file"])
        ref = InstanceRef(
            study_uid=CURRENT["study_uid"], series_uid=pa["series_uid"], sop_instance_uid=pa["sop_instance_uid"]
        )
        query = tiny_medsiglip.embed_images([prepare_instance(ds, ref).image]).numpy()[0]
        top = index.search(query, 3)
        assert top[0].study_uid == CURRENT["study_uid"] and top[0].sop_instance_uid == pa["sop_instance_uid"]
        assert top[0].score == pytest.approx(1.0, abs=1e-4) and top[0].source == "dicom-dir"
        assert len(top) == 3


def test_public_url_drops_credentials() -> None:
    assert public_url("http://user:secret@127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"


async def test_dicomweb_ingest_of_one_study_carries_wado_urls(
    orthanc: OrthancHandle, tiny_medsiglip: MedSigLIP, tmp_path: Path
) -> None:
    observer = ListObserver()
    source = DicomWebSource(
        orthanc.dicomweb_url, observer=observer, username=orthanc.username, password=orthanc.password
    )
    with FileIndex(tmp_path / "ix", create=True) as index:
        try:
            report = await ingest_dicom_source(
                source, tiny_medsiglip, index, dicomweb_url=orthanc.dicomweb_url, study_uid=CURRENT["study_uid"]
            )
        finally:
            await source.aclose()
        assert report.added == 2 and not report.skipped
        retrieved = {e.sop_instance_uid for e in observer.dicom if e.action == "retrieve"}
        assert retrieved == {i["sop_instance_uid"] for i in CURRENT["instances"]}
        hit = index.search(tiny_medsiglip.embed_texts(["chest x-ray"]).numpy()[0], 1)[0]
    assert hit.study_uid == CURRENT["study_uid"] and hit.source == "dicomweb"
    assert hit.study_url == f"{orthanc.dicomweb_url.rstrip('/')}/studies/{CURRENT['study_uid']}"
    assert hit.instance_url and hit.instance_url.endswith(f"/instances/{hit.sop_instance_uid}")


async def test_imaging_study_ingest_carries_fhir_refs(
    fhir_server: FhirServerHandle, orthanc: OrthancHandle, tiny_medsiglip: MedSigLIP, tmp_path: Path
) -> None:
    observer = ListObserver()
    fhir = make_fhir_source(FhirSettings(base_url=fhir_server.base_url), observer)
    dicom = DicomSettings(dicomweb_url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    with FileIndex(tmp_path / "ix", create=True) as index:
        try:
            report = await ingest_imaging_study(
                fhir, CURRENT["imaging_study_id"], dicom, observer, tiny_medsiglip, index
            )
        finally:
            await fhir.aclose()
        assert report.studies == {CURRENT["study_uid"]} and report.added == 2
        hits = index.search(tiny_medsiglip.embed_texts(["pleural effusion"]).numpy()[0], 5)
    assert len(hits) == 1
    assert hits[0].imaging_study_ref == f"ImagingStudy/{CURRENT['imaging_study_id']}"
    assert hits[0].patient_ref == f"Patient/{CXR['patient_id']}"
    assert any(e.path.startswith(f"ImagingStudy/{CURRENT['imaging_study_id']}") for e in observer.fhir)
