"""DicomWebSource against the live Orthanc (auth on), its multipart parser, and fault cases."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from agent.config import DicomSettings
from agent.domain.events import ListObserver
from agent.domain.refs import InstanceRef
from agent.errors import InvalidResourceError, SourceUnavailableError
from agent.sources.dicomweb import DicomWebSource, parse_multipart_related
from agent.sources.factory import make_dicom_source
from tests.support.servers import REPO_ROOT, OrthancHandle, stow_dicom

DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
MANIFEST = REPO_ROOT / "fixtures" / "manifest.json"


def make_dx(path: Path, study: str, series: str, number: int, view: str | None) -> Path:
    """Write a small 12-bit DX instance with a preamble and file meta (as STOW-RS needs)."""
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "TEST-DICOMWEB"
    ds.Modality = "DX"
    if view:
        ds.ViewPosition = view
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 24, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * (number + 3)) % 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def study(orthanc: OrthancHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store a three-instance DX study (two series; one instance without ViewPosition)."""
    root = tmp_path_factory.mktemp("dx")
    study_uid, pa_series, lat_series = generate_uid(), generate_uid(), generate_uid()
    files = [
        make_dx(root / "pa-2.dcm", study_uid, pa_series, 2, "PA"),
        make_dx(root / "pa-1.dcm", study_uid, pa_series, 1, "PA"),
        make_dx(root / "lat.dcm", study_uid, lat_series, 1, None),
    ]
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, files) == 3
    return {"study_uid": study_uid, "files": files}


def _source(orthanc: OrthancHandle, observer: ListObserver, password: str | None = None) -> DicomWebSource:
    return DicomWebSource(
        orthanc.dicomweb_url,
        observer=observer,
        username=orthanc.username,
        password=password if password is not None else orthanc.password,
    )


# -- live Orthanc --------------------------------------------------------------------------------


async def test_list_instances(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        refs = await source.list_instances(study["study_uid"])
    expected = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in study["files"]}
    assert {r.sop_instance_uid for r in refs} == set(expected)
    for ref in refs:
        ds = expected[ref.sop_instance_uid]
        assert ref.study_uid == study["study_uid"]
        assert ref.series_uid == ds.SeriesInstanceUID
        assert ref.modality == "DX"
        assert ref.view_position == ds.get("ViewPosition")
        assert ref.instance_number == ds.InstanceNumber
    by_series = [r for r in refs if r.view_position == "PA"]
    assert [r.instance_number for r in by_series] == [1, 2]
    [event] = observer.dicom
    assert (event.backend, event.action, event.study_uid, event.status) == (
        "dicomweb",
        "search",
        study["study_uid"],
        200,
    )
    assert event.error is None


async def test_retrieve_returns_the_stored_pixels(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        refs = await source.list_instances(study["study_uid"])
        for ref in refs:
            ds = await source.retrieve(ref)
            original = next(
                pydicom.dcmread(f) for f in study["files"] if pydicom.dcmread(f).SOPInstanceUID == ref.sop_instance_uid
            )
            assert ds.SOPInstanceUID == ref.sop_instance_uid
            assert ds.PixelData == original.PixelData
            assert np.array_equal(ds.pixel_array, original.pixel_array)
    retrievals = [e for e in observer.dicom if e.action == "retrieve"]
    assert len(retrievals) == 3
    for event in retrievals:
        assert event.status == 200
        assert event.transfer_syntax == ExplicitVRLittleEndian
        assert event.bytes is not None and event.bytes > 24 * 32 * 2
        assert event.sop_instance_uid and event.series_uid and event.study_uid == study["study_uid"]


async def test_wrong_password_says_authentication_failed(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer, password="wrong") as source:
        with pytest.raises(SourceUnavailableError, match="authentication failed"):
            await source.list_instances(study["study_uid"])
    assert observer.dicom[0].status == 401
    assert observer.dicom[0].error is not None and "authentication failed" in observer.dicom[0].error


async def test_unknown_study_is_not_found(orthanc: OrthancHandle) -> None:
    observer = ListObserver()
    unknown = generate_uid()
    async with _source(orthanc, observer) as source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.list_instances(unknown)
    assert info.value.message == f"study {unknown} not found on {orthanc.dicomweb_url}"
    assert observer.dicom[0].error == info.value.message


async def test_unknown_instance_is_not_found(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    async with _source(orthanc, ListObserver()) as source:
        [ref, *_] = await source.list_instances(study["study_uid"])
        missing = ref.model_copy(update={"sop_instance_uid": generate_uid()})
        with pytest.raises(SourceUnavailableError, match="not found"):
            await source.retrieve(missing)


async def test_fixture_studies(orthanc: OrthancHandle) -> None:
    if not MANIFEST.is_file():
        pytest.skip("fixtures/manifest.json is not generated yet")
    manifest = json.loads(MANIFEST.read_text())
    async with _source(orthanc, ListObserver()) as source:
        for patient in manifest["patients"]:
            for entry in patient["studies"]:
                refs = await source.list_instances(entry["study_uid"])
                assert {r.sop_instance_uid for r in refs} == {i["sop_instance_uid"] for i in entry["instances"]}
                assert {r.modality for r in refs} == {entry["modality"]}
                for instance in entry["instances"]:
                    ref = next(r for r in refs if r.sop_instance_uid == instance["sop_instance_uid"])
                    assert ref.view_position == instance.get("view_position")
                    assert ref.instance_number == instance["instance_number"]
                    ds = await source.retrieve(ref)
                    original = pydicom.dcmread(REPO_ROOT / "fixtures" / instance["file"])
                    assert ds.PixelData == original.PixelData


async def test_invalid_uid_is_refused_before_any_request(orthanc: OrthancHandle) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        with pytest.raises(InvalidResourceError):
            await source.list_instances("1.2.3/../../system")
    assert observer.dicom == []


# -- multipart parsing ---------------------------------------------------------------------------


def test_multipart_with_quoted_boundary_preamble_and_epilogue() -> None:
    body = (
        b"preamble to ignore\r\n"
        b"--b-1 \t\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\n"
        b"first\r\n--b-1x not a delimiter\r\n"
        b"--b-1\r\nContent-Type: application/dicom\r\nContent-Length: 6\r\n\r\nsecond"
        b"\r\n--b-1--\r\nepilogue"
    )
    parts = parse_multipart_related(body, 'multipart/related; type="application/dicom"; boundary="b-1"')
    assert [p.content for p in parts] == [b"first\r\n--b-1x not a delimiter", b"second"]
    assert parts[0].content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert parts[1].headers["content-length"] == "6"


def test_multipart_with_unquoted_boundary_and_binary_content() -> None:
    payload = bytes(range(256)) * 4
    body = b"--abc\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--abc--"
    [part] = parse_multipart_related(body, "multipart/related; type=application/dicom; boundary=abc")
    assert part.content == payload


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"--abc\r\n\r\nx", "multipart/related; boundary=abc", "truncated"),
        (b"x", "multipart/related", "no boundary"),
        (b"nothing here", "multipart/related; boundary=abc", "does not contain"),
        (b"x", "application/json", "expected a multipart"),
    ],
)
def test_multipart_errors(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(InvalidResourceError, match=message):
        parse_multipart_related(body, content_type)


# -- fault cases through MockTransport -----------------------------------------------------------

BASE = "https://pacs.example.org/dicom-web"


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[DicomWebSource, ListObserver]:
    observer = ListObserver()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return DicomWebSource(BASE, observer=observer, client=client), observer


def _always(response: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return response

    return handler


def _qido_item(series: str, sop: str, modality: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00200013": {"vr": "IS", "Value": ["3"]},
    }
    if modality:
        item["00080060"] = {"vr": "CS", "Value": [modality]}
    return item


async def test_modality_falls_back_to_the_series_query() -> None:
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(request.url.path)
        if request.url.path.endswith("/series"):
            return httpx.Response(
                200, json=[{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, "00080060": {"vr": "CS", "Value": ["CR"]}}]
            )
        return httpx.Response(200, json=[_qido_item("1.2.3", "1.2.3.4")])

    source, observer = _mock(handler)
    [ref] = await source.list_instances("1.2")
    assert ref.modality == "CR"
    assert ref.instance_number == 3
    assert requested == ["/dicom-web/studies/1.2/instances", "/dicom-web/studies/1.2/series"]
    assert [e.action for e in observer.dicom] == ["search", "search"]


async def test_includefields_are_requested() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[_qido_item("1.2.3", "1.2.3.4", "DX")])

    source, _ = _mock(handler)
    await source.list_instances("1.2")
    assert seen[0].url.params.get_list("includefield") == ["00080060", "00185101", "00200013"]
    assert seen[0].headers["accept"] == "application/dicom+json"


async def test_empty_answers_mean_not_found() -> None:
    for response in (httpx.Response(204), httpx.Response(404), httpx.Response(200, json=[])):
        source, observer = _mock(_always(response))
        with pytest.raises(SourceUnavailableError, match=r"study 1\.2 not found"):
            await source.list_instances("1.2")
        assert observer.dicom[0].error


async def test_server_error_and_bad_json() -> None:
    source, observer = _mock(lambda request: httpx.Response(503))
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        await source.list_instances("1.2")
    assert observer.dicom[0].status == 503
    source, _ = _mock(lambda request: httpx.Response(200, content=b"not json"))
    with pytest.raises(InvalidResourceError):
        await source.list_instances("1.2")


async def test_single_part_dicom_answer_is_accepted(tmp_path: Path) -> None:
    path = make_dx(tmp_path / "x.dcm", "1.2", "1.2.3", 1, "AP")
    ds = pydicom.dcmread(path)
    source, observer = _mock(
        lambda request: httpx.Response(200, content=path.read_bytes(), headers={"content-type": "application/dicom"})
    )
    ref = InstanceRef(study_uid="1.2", series_uid="1.2.3", sop_instance_uid=str(ds.SOPInstanceUID))
    got = await source.retrieve(ref)
    assert got.PixelData == ds.PixelData
    assert observer.dicom[0].bytes == path.stat().st_size


async def test_a_different_instance_is_refused(tmp_path: Path) -> None:
    path = make_dx(tmp_path / "x.dcm", "1.2", "1.2.3", 1, "AP")
    body = b"--q\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--q--\r\n"
    source, observer = _mock(
        lambda request: httpx.Response(200, content=body, headers={"content-type": 'multipart/related; boundary="q"'})
    )
    with pytest.raises(InvalidResourceError, match="different instance"):
        await source.retrieve(InstanceRef(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="9.9.9"))
    assert observer.dicom[0].error


async def test_garbage_instance_is_invalid_resource() -> None:
    body = b"--q\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--q--\r\n"
    source, _ = _mock(
        lambda request: httpx.Response(200, content=body, headers={"content-type": "multipart/related; boundary=q"})
    )
    with pytest.raises(InvalidResourceError, match="not a DICOM instance"):
        await source.retrieve(InstanceRef(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4"))


async def test_unreachable_server_is_source_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    source, observer = _mock(handler)
    with pytest.raises(SourceUnavailableError, match="could not be reached"):
        await source.list_instances("1.2")
    assert observer.dicom[0].status is None


async def test_factory_picks_the_source(tmp_path: Path) -> None:
    observer = ListObserver()
    remote = make_dicom_source(DicomSettings(dicomweb_url=BASE + "/", username="u"), observer)
    assert isinstance(remote, DicomWebSource) and remote.base_url == BASE
    await remote.aclose()
    pytest.importorskip("agent.sources.dicom_dir")
    from agent.sources.dicom_dir import DicomDirSource

    local = make_dicom_source(DicomSettings(dicom_dir=tmp_path), observer)
    assert isinstance(local, DicomDirSource)
