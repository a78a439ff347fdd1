"""Which DICOM study an ImagingStudy names: every identifier form real servers write, located for real.

The parsing is pure (agent/sources/study_identity.py); locating asks the live Orthanc (QIDO-RS
across all series / instances) and the DICOM folder source (its header index) for the study of a
listed series or instance, then lists that study's instances.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from agent.domain.events import ListObserver
from agent.errors import InvalidResourceError, SourceUnavailableError, StudyNotFoundError
from agent.sources.dicom_dir import DicomDirSource
from agent.sources.dicomweb import DicomWebSource
from agent.sources.protocols import DicomSource
from agent.sources.study_identity import (
    StudyIdentity,
    dicom_uid,
    identifier_study_uid,
    study_identity,
    study_instance_uid,
)
from agent.sources.study_location import LocatedStudy, locate_study_uid
from tests.sources.test_dicomweb import make_dx
from tests.support.servers import OrthancHandle, stow_dicom

#: This module's own patient, so nothing another module stores can match.
PATIENT_ID = f"TEST-STUDY-ID-{uuid.uuid4().hex[:8]}"


def imaging_study(
    identifiers: list[dict[str, Any]] | None = None, series: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Return a minimal R4 ImagingStudy with these identifiers and series."""
    resource: dict[str, Any] = {"resourceType": "ImagingStudy", "id": "s1", "status": "available"}
    if identifiers is not None:
        resource["identifier"] = identifiers
    if series is not None:
        resource["series"] = series
    return resource


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        ({"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.1"}, "1.2.840.1"),
        ({"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.840.1"}, "1.2.840.1"),  # Synthea
        ({"value": "urn:oid:1.2.840.1"}, "1.2.840.1"),
        ({"system": "urn:dicom:uid", "value": "1.2.840.1"}, "1.2.840.1"),
        ({"system": "urn:dicom:uid", "value": " URN:OID:1.2.840.1 "}, "1.2.840.1"),
        # a bare number elsewhere may be an accession or order number
        ({"system": "urn:ietf:rfc:3986", "value": "1.2.840.1"}, None),
        ({"value": "1.2.840.1"}, None),
        ({"system": "http://hospital.example/accession", "value": "urn:oid:1.2.840.1"}, None),
        ({"system": "urn:dicom:uid", "value": "urn:oid:1.2.abc"}, None),
        ({"system": "urn:dicom:uid", "value": "urn:oid:1.2.840/../studies"}, None),
        ({"system": "urn:dicom:uid", "value": "1." + "2" * 70}, None),  # longer than 64 characters
        ({"system": "urn:dicom:uid", "value": 12}, None),
    ],
)
def test_identifier_forms(identifier: dict[str, Any], expected: str | None) -> None:
    assert identifier_study_uid(imaging_study([identifier])) == expected


def test_dicom_uid_system_wins_and_accession_numbers_are_skipped() -> None:
    accession = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
        "value": "urn:oid:9.9.9",
    }
    study = imaging_study(
        [
            accession,
            {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.1"},
            {"system": "urn:dicom:uid", "value": "2.2"},
        ]
    )
    assert identifier_study_uid(study) == "2.2"
    assert identifier_study_uid(imaging_study([accession])) is None


def test_identity_lists_series_and_instances_once_in_order() -> None:
    study = imaging_study(
        series=[
            {"uid": "1.2.3", "instance": [{"uid": "1.2.3.1"}, {"uid": "1.2.3.2"}, {"uid": "not a uid"}]},
            {"uid": "urn:oid:1.2.4", "instance": [{"uid": "1.2.3.1"}]},
            {"uid": "1.2.3"},
            "garbage",
        ]
    )
    assert study_identity(study) == StudyIdentity(
        reference="ImagingStudy/s1",
        study_uid=None,
        series_uids=("1.2.3", "1.2.4"),
        instance_uids=("1.2.3.1", "1.2.3.2"),
    )
    assert study_identity(study).locatable
    assert not study_identity(imaging_study([{"value": "ACC-7"}])).locatable


def test_study_instance_uid_names_the_study_and_the_forms_read() -> None:
    assert study_instance_uid(imaging_study([{"value": "urn:oid:1.2"}])) == "1.2"
    with pytest.raises(SourceUnavailableError, match=r"ImagingStudy/s1 has no DICOM study UID .*urn:oid:"):
        study_instance_uid(imaging_study([{"system": "urn:ietf:rfc:3986", "value": "1.2"}]))


def test_dicom_uid() -> None:
    assert dicom_uid("urn:oid:1.2") == "1.2"
    assert dicom_uid("1.2") == "1.2"
    assert dicom_uid("urn:oid:") is None and dicom_uid(None) is None and dicom_uid("1..2") is None


def test_graph_and_ingest_name_studies_the_same_way() -> None:
    from agent.graph import imaging_fetch, nodes

    assert imaging_fetch.study_instance_uid is study_instance_uid
    assert nodes.study_instance_uid is study_instance_uid


# -- located against real sources ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Write one two-series DX study (PA and lateral) for this module's patient."""
    root = tmp_path_factory.mktemp("study-identity")
    study_uid, pa_series, lat_series = generate_uid(), generate_uid(), generate_uid()
    files = [
        make_dx(root / "pa.dcm", study_uid, pa_series, 1, "PA", patient_id=PATIENT_ID),
        make_dx(root / "lat.dcm", study_uid, lat_series, 1, "LL", patient_id=PATIENT_ID),
    ]
    return {"root": root, "study_uid": study_uid, "files": files, "series": [pa_series, lat_series]}


@pytest.fixture(scope="module")
def stored(orthanc: OrthancHandle, dx_files: dict[str, Any]) -> dict[str, Any]:
    """Store the study in the session's Orthanc."""
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, dx_files["files"]) == 2
    return dx_files


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def forms(files: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Return each way of naming the study, as an ImagingStudy, with how it should be located."""
    uid = files["study_uid"]
    lateral_series = files["series"][1]
    lateral_sop = _sop(files["files"][1])
    return {
        "oid_under_dicom_uid": (imaging_study([{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]), "identifier"),
        "oid_under_rfc3986": (
            imaging_study([{"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{uid}"}]),
            "identifier",
        ),
        "oid_without_system": (imaging_study([{"value": f"urn:oid:{uid}"}]), "identifier"),
        "bare_uid_under_dicom_uid": (imaging_study([{"system": "urn:dicom:uid", "value": uid}]), "identifier"),
        # the first listed series is unknown to the source: the next one is tried
        "series_uid_only": (
            imaging_study([{"value": "ACC-1"}], [{"uid": generate_uid()}, {"uid": lateral_series}]),
            f"series {lateral_series}",
        ),
        "instance_uid_only": (
            imaging_study(series=[{"instance": [{"uid": lateral_sop}]}]),
            f"instance {lateral_sop}",
        ),
    }


FORMS = [
    "oid_under_dicom_uid",
    "oid_under_rfc3986",
    "oid_without_system",
    "bare_uid_under_dicom_uid",
    "series_uid_only",
    "instance_uid_only",
]


async def _locate_and_list(source: DicomSource, files: dict[str, Any], form: str) -> None:
    study, via = forms(files)[form]
    located = await locate_study_uid(source, study_identity(study))
    assert located == LocatedStudy(files["study_uid"], via)
    refs = await source.list_instances(located.study_uid)
    assert {ref.sop_instance_uid for ref in refs} == {_sop(path) for path in files["files"]}


@pytest.mark.parametrize("form", FORMS)
async def test_each_form_is_located_on_orthanc(orthanc: OrthancHandle, stored: dict[str, Any], form: str) -> None:
    observer = ListObserver()
    async with DicomWebSource(
        orthanc.dicomweb_url, observer=observer, username=orthanc.username, password=orthanc.password
    ) as source:
        await _locate_and_list(source, stored, form)
    searches = [e for e in observer.dicom if e.action == "search"]
    assert searches and all(e.error is None for e in searches)


@pytest.mark.parametrize("form", FORMS)
async def test_each_form_is_located_in_a_dicom_folder(dx_files: dict[str, Any], form: str) -> None:
    source = DicomDirSource(dx_files["root"], ListObserver())
    await _locate_and_list(source, dx_files, form)


async def test_orthanc_lookups_are_qido_searches_across_all_studies(
    orthanc: OrthancHandle, stored: dict[str, Any]
) -> None:
    observer = ListObserver()
    lateral_series, lateral_sop = stored["series"][1], _sop(stored["files"][1])
    async with DicomWebSource(
        orthanc.dicomweb_url, observer=observer, username=orthanc.username, password=orthanc.password
    ) as source:
        assert await source.find_study_uid(series_uid=lateral_series) == stored["study_uid"]
        assert await source.find_study_uid(sop_instance_uid=lateral_sop) == stored["study_uid"]
        assert await source.find_study_uid(series_uid=generate_uid()) is None
        assert await source.find_study_uid(sop_instance_uid=generate_uid()) is None
        with pytest.raises(InvalidResourceError, match="not a valid DICOM series UID"):
            await source.find_study_uid(series_uid="1.2/../../system")
        with pytest.raises(ValueError, match="exactly one"):
            await source.find_study_uid()
        with pytest.raises(StudyNotFoundError, match=r"not found on"):
            await source.list_instances(generate_uid())
    assert [(e.series_uid, e.sop_instance_uid) for e in observer.dicom[:2]] == [
        (lateral_series, None),
        (None, lateral_sop),
    ]


async def test_nothing_found_is_none_on_both_sources(orthanc: OrthancHandle, dx_files: dict[str, Any]) -> None:
    unknown = study_identity(imaging_study(series=[{"uid": generate_uid(), "instance": [{"uid": generate_uid()}]}]))
    folder = DicomDirSource(dx_files["root"], ListObserver())
    assert await locate_study_uid(folder, unknown) is None
    async with DicomWebSource(
        orthanc.dicomweb_url, observer=ListObserver(), username=orthanc.username, password=orthanc.password
    ) as source:
        assert await locate_study_uid(source, unknown) is None
    with pytest.raises(ValueError, match="exactly one"):
        await folder.find_study_uid(series_uid="1.2", sop_instance_uid="1.2.3")


async def test_folder_lookup_rescans_for_files_added_since(tmp_path: Path) -> None:
    observer = ListObserver()
    source = DicomDirSource(tmp_path, observer)
    series = generate_uid()
    assert await source.find_study_uid(series_uid=series) is None
    study = generate_uid()
    make_dx(tmp_path / "late.dcm", study, series, 1, "PA")
    assert await source.find_study_uid(series_uid=series) == study
    assert observer.dicom[-1].study_uid == study and observer.dicom[-1].series_uid == series


async def test_lookups_are_bounded() -> None:
    class CountingSource:
        def __init__(self) -> None:
            self.asked: list[tuple[str | None, str | None]] = []

        async def find_study_uid(self, *, series_uid: str | None = None, sop_instance_uid: str | None = None) -> None:
            self.asked.append((series_uid, sop_instance_uid))

    identity = StudyIdentity(
        "ImagingStudy/x", None, tuple(f"1.{n}" for n in range(10)), tuple(f"2.{n}" for n in range(10))
    )
    source = CountingSource()
    assert await locate_study_uid(source, identity, max_lookups=2) is None  # type: ignore[arg-type]
    assert source.asked == [("1.0", None), ("1.1", None), (None, "2.0"), (None, "2.1")]
