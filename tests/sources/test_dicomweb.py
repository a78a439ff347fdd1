"""DicomWebSource against the live Orthanc (auth on), its multipart parser, and fault cases."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
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
from agent.errors import DicomDecodeError, InvalidResourceError, SourceUnavailableError
from agent.sources.dicomweb import DicomWebSource, parse_multipart_related
from agent.sources.factory import make_dicom_source
from agent.sources.pixels import prepare_instance
from tests.support.http_handlers import LoopbackServer, send
from tests.support.servers import REPO_ROOT, OrthancHandle, stow_dicom

DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
#: This module's own patient, so searches are not disturbed by what other modules store.
PATIENT_ID = f"TEST-DICOMWEB-{uuid.uuid4().hex[:8]}"
MANIFEST = REPO_ROOT / "fixtures" / "manifest.json"


def make_dx(
    path: Path,
    study: str,
    series: str,
    number: int,
    view: str | None,
    *,
    description: str | None = None,
    patient_id: str = PATIENT_ID,
    frames: int = 1,
    truncate_pixels: bool = False,
) -> Path:
    """Write a small 12-bit DX instance with a preamble and file meta (as STOW-RS needs).

    ``truncate_pixels`` keeps only part of the pixel data: the file still parses, its pixels do not decode.
    """
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
    ds.PatientID = patient_id
    ds.StudyDate = "20250102"
    ds.StudyDescription = "XR CHEST"
    ds.Modality = "DX"
    if view:
        ds.ViewPosition = view
    if description:
        ds.SeriesDescription = description
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 24, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = (np.arange(frames * 24 * 32, dtype=np.uint32).reshape(frames, 24, 32) * (number + 3)) % 4096
    data = pixels.astype(np.uint16).tobytes()
    ds.PixelData = data[: len(data) // 3] if truncate_pixels else data
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def study(orthanc: OrthancHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store a three-instance DX study (two series; one instance without ViewPosition)."""
    root = tmp_path_factory.mktemp("dx")
    study_uid, pa_series, lat_series = generate_uid(), generate_uid(), generate_uid()
    files = [
        make_dx(root / "pa-2.dcm", study_uid, pa_series, 2, "PA", description="CHEST PA"),
        make_dx(root / "pa-1.dcm", study_uid, pa_series, 1, "PA", description="CHEST PA"),
        make_dx(root / "lat.dcm", study_uid, lat_series, 1, None, description="CHEST LAT"),
    ]
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, files) == 3
    return {"study_uid": study_uid, "files": files, "pa_series": pa_series, "lat_series": lat_series}


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
        assert ref.series_description == ds.SeriesDescription
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
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        [ref, *_] = await source.list_instances(study["study_uid"])
        missing = ref.model_copy(update={"sop_instance_uid": generate_uid()})
        with pytest.raises(SourceUnavailableError) as info:
            await source.retrieve(missing)
    for uid in (missing.study_uid, missing.series_uid, missing.sop_instance_uid):
        assert uid in info.value.message
    assert info.value.details["sop_instance_uid"] == missing.sop_instance_uid
    assert observer.dicom[-1].action == "retrieve" and observer.dicom[-1].error == info.value.message


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
                200,
                json=[
                    {
                        "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
                        "00080060": {"vr": "CS", "Value": ["CR"]},
                        "0008103E": {"vr": "LO", "Value": ["CHEST AP PORTABLE"]},
                    }
                ],
            )
        return httpx.Response(200, json=[_qido_item("1.2.3", "1.2.3.4")])

    source, observer = _mock(handler)
    [ref] = await source.list_instances("1.2")
    assert ref.modality == "CR"
    assert ref.series_description == "CHEST AP PORTABLE"
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
    assert seen[0].url.params.get_list("includefield") == ["00080060", "00185101", "00200013", "0008103E"]
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


# -- QIDO-RS study search, WADO-RS metadata and frames: live Orthanc ------------------------------


@pytest.fixture(scope="module")
def frames_study(orthanc: OrthancHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store a study of one 3-frame DX instance (each frame different)."""
    root = tmp_path_factory.mktemp("dx-frames")
    study_uid, series_uid = generate_uid(), generate_uid()
    path = make_dx(root / "multi.dcm", study_uid, series_uid, 1, "PA", frames=3)
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, [path]) == 1
    ds = pydicom.dcmread(path)
    ref = InstanceRef(study_uid=study_uid, series_uid=series_uid, sop_instance_uid=str(ds.SOPInstanceUID))
    return {"ref": ref, "pixels": ds.pixel_array}


@pytest.fixture(scope="module")
def corrupt_study(orthanc: OrthancHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store a study with one good instance and one whose pixel data is cut to a third."""
    root = tmp_path_factory.mktemp("dx-corrupt")
    study_uid, series_uid = generate_uid(), generate_uid()
    good = make_dx(root / "good.dcm", study_uid, series_uid, 1, "PA")
    bad = make_dx(root / "bad.dcm", study_uid, series_uid, 2, "PA", truncate_pixels=True)
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, [good, bad]) == 2
    return {
        "study_uid": study_uid,
        "good": str(pydicom.dcmread(good).SOPInstanceUID),
        "bad": str(pydicom.dcmread(bad).SOPInstanceUID),
    }


def _manifest_patient(key: str) -> dict[str, Any]:
    if not MANIFEST.is_file():
        pytest.skip("fixtures/manifest.json is not generated yet")
    patient: dict[str, Any] = next(p for p in json.loads(MANIFEST.read_text())["patients"] if p["key"] == key)
    return patient


async def test_search_studies_by_patient(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        [found] = await source.search_studies(patient_id=PATIENT_ID)
    assert found.study_uid == study["study_uid"]
    assert found.patient_id == PATIENT_ID
    assert found.modalities == ("DX",)
    assert found.study_date == "20250102"
    assert found.description == "XR CHEST"
    assert found.number_of_instances == 3
    [event] = observer.dicom
    assert (event.action, event.status, event.error, event.study_uid) == ("search", 200, None, None)


async def test_search_fixture_studies_by_modality_uid_and_limit(orthanc: OrthancHandle) -> None:
    cxr, ct = _manifest_patient("cxr"), _manifest_patient("ct")
    async with _source(orthanc, ListObserver()) as source:
        cxr_studies = await source.search_studies(patient_id=cxr["mrn"])
        assert {s["study_uid"] for s in cxr["studies"]} <= {s.study_uid for s in cxr_studies}
        assert {s.patient_id for s in cxr_studies} == {cxr["mrn"]}
        assert len(await source.search_studies(patient_id=cxr["mrn"], limit=1)) == 1

        [ct_study] = await source.search_studies(patient_id=ct["mrn"], modality="ct")
        assert ct_study.study_uid == ct["studies"][0]["study_uid"]
        assert ct_study.number_of_instances == 4
        assert await source.search_studies(patient_id=ct["mrn"], modality="DX") == []

        current = cxr["studies"][1]
        [by_uid] = await source.search_studies(study_uid=current["study_uid"])
        assert by_uid.description == current["description"]
        assert by_uid.modalities == ("DX",)
        assert await source.search_studies(study_uid=generate_uid()) == []


async def test_metadata_of_study_and_series(orthanc: OrthancHandle, study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        whole = await source.retrieve_metadata(study["study_uid"])
        pa = await source.retrieve_metadata(study["study_uid"], study["pa_series"])
    expected = {str(pydicom.dcmread(f).SOPInstanceUID) for f in study["files"]}
    assert {item["00080018"]["Value"][0] for item in whole} == expected
    assert {item["0020000E"]["Value"][0] for item in pa} == {study["pa_series"]}
    assert sorted(int(item["00200013"]["Value"][0]) for item in pa) == [1, 2]
    assert all(item["00280010"]["Value"] == [24] for item in whole)
    assert [(e.action, e.series_uid, e.status) for e in observer.dicom] == [
        ("metadata", None, 200),
        ("metadata", study["pa_series"], 200),
    ]


async def test_metadata_of_unknown_study_is_not_found(orthanc: OrthancHandle) -> None:
    unknown = generate_uid()
    async with _source(orthanc, ListObserver()) as source:
        with pytest.raises(SourceUnavailableError, match=f"study {unknown} not found"):
            await source.retrieve_metadata(unknown)


async def test_frames_come_back_uncompressed_in_the_order_asked(
    orthanc: OrthancHandle, frames_study: dict[str, Any]
) -> None:
    observer = ListObserver()
    ref: InstanceRef = frames_study["ref"]
    pixels = frames_study["pixels"]
    async with _source(orthanc, observer) as source:
        third, first = await source.retrieve_frames(ref, [3, 1])
    assert np.array_equal(np.frombuffer(third, dtype="<u2").reshape(24, 32), pixels[2])
    assert np.array_equal(np.frombuffer(first, dtype="<u2").reshape(24, 32), pixels[0])
    [event] = observer.dicom
    assert (event.action, event.sop_instance_uid, event.status, event.bytes) == (
        "frames",
        ref.sop_instance_uid,
        200,
        2 * 24 * 32 * 2,
    )
    assert event.transfer_syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


async def test_frame_past_the_end_is_an_error(orthanc: OrthancHandle, frames_study: dict[str, Any]) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        # Orthanc may have started its multipart answer before noticing: a cut answer is fine too.
        with pytest.raises((SourceUnavailableError, InvalidResourceError)):
            await source.retrieve_frames(frames_study["ref"], [4])
    assert observer.dicom[-1].error is not None


async def test_corrupt_instance_comes_back_and_fails_alone_at_decoding(
    orthanc: OrthancHandle, corrupt_study: dict[str, Any]
) -> None:
    observer = ListObserver()
    async with _source(orthanc, observer) as source:
        refs = {r.sop_instance_uid: r for r in await source.list_instances(corrupt_study["study_uid"])}
        good = await source.retrieve(refs[corrupt_study["good"]])
        bad = await source.retrieve(refs[corrupt_study["bad"]])
    # The source hands both over; only pixel preparation finds the truncated one undecodable.
    assert prepare_instance(good, refs[corrupt_study["good"]]).image.size[0] > 0
    with pytest.raises(DicomDecodeError, match="Explicit VR Little Endian") as info:
        prepare_instance(bad, refs[corrupt_study["bad"]])
    assert info.value.details["transfer_syntax"] == ExplicitVRLittleEndian
    assert [e.error for e in observer.dicom if e.action == "retrieve"] == [None, None]


# -- auth over real HTTP (a recording server on 127.0.0.1) --------------------------------------


class RecordingDicomWeb(LoopbackServer):
    """A tiny DICOMweb stand-in that records each request's path and Authorization header.

    It answers QIDO-RS with one instance (or one study for ``/studies``), so a source can run
    against it; what matters is what the client sent.
    """

    thread_name = "recording-dicomweb"

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 9, 5.0)  # no upstream: nothing is forwarded
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append((handler.path, handler.headers.get("Authorization")))
        if handler.path.split("?")[0].endswith("/studies"):
            body = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]
        else:
            body = [_qido_item("1.2.3.4", "1.2.3.4.5", "DX")]
        send(handler, 200, [("Content-Type", "application/dicom+json")], json.dumps(body).encode())

    @property
    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [auth for _, auth in self.requests]


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        ({"username": "alice", "password": "s3cret"}, "Basic " + base64.b64encode(b"alice:s3cret").decode()),
        ({"bearer_token": "tok-123"}, "Bearer tok-123"),
        ({"username": "alice", "password": "s3cret", "bearer_token": "tok-123"}, "Bearer tok-123"),
        ({}, None),
    ],
)
async def test_credentials_are_sent_as_configured(credentials: dict[str, str], expected: str | None) -> None:
    with RecordingDicomWeb() as server:
        async with DicomWebSource(
            server.origin + "/dicom-web",
            observer=ListObserver(),
            username=credentials.get("username"),
            password=credentials.get("password"),
            bearer_token=credentials.get("bearer_token"),
        ) as source:
            await source.search_studies(patient_id="P1")
            await source.list_instances("1.2.3")
        assert server.authorizations == [expected, expected]


# -- search, metadata and frames: protocol details through MockTransport -------------------------


async def test_search_studies_sends_filters_and_includefields() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json=[
                {
                    "0020000D": {"vr": "UI", "Value": ["1.2.9"]},
                    "00100020": {"vr": "LO", "Value": ["P-7"]},
                    "00080061": {"vr": "CS", "Value": ["CT", "SR"]},
                    "00080020": {"vr": "DA", "Value": ["20240101"]},
                    "00081030": {"vr": "LO", "Value": ["CT CHEST"]},
                    "00201208": {"vr": "IS", "Value": [120]},
                },
                {"0020000D": {"vr": "UI", "Value": ["1.2.10"]}},
            ],
        )

    source, observer = _mock(handler)
    first, second = await source.search_studies(patient_id="P-7", study_uid="1.2.9", modality=" ct ", limit=5)
    params = seen[0].url.params
    assert seen[0].url.path == "/dicom-web/studies"
    assert (params["00100020"], params["0020000D"], params["00080061"], params["limit"]) == ("P-7", "1.2.9", "CT", "5")
    assert params.get_list("includefield") == ["00081030", "00080061", "00201208", "00080020"]
    assert first.model_dump() == {
        "study_uid": "1.2.9",
        "patient_id": "P-7",
        "modalities": ("CT", "SR"),
        "study_date": "20240101",
        "description": "CT CHEST",
        "number_of_instances": 120,
    }
    assert (second.study_uid, second.modalities, second.description) == ("1.2.10", (), None)
    assert observer.dicom[0].study_uid == "1.2.9"


async def test_search_studies_keeps_to_the_limit_when_the_server_ignores_it() -> None:
    items = [{"0020000D": {"vr": "UI", "Value": [f"1.2.{n}"]}} for n in range(4)]
    source, _ = _mock(_always(httpx.Response(200, json=items)))
    assert [s.study_uid for s in await source.search_studies(limit=2)] == ["1.2.0", "1.2.1"]


async def test_search_studies_with_no_match_is_empty() -> None:
    for response in (httpx.Response(204), httpx.Response(200, json=[]), httpx.Response(200, content=b"")):
        source, observer = _mock(_always(response))
        assert await source.search_studies(patient_id="P-1") == []
        assert observer.dicom[0].error is None


async def test_search_studies_404_points_at_the_url() -> None:
    source, observer = _mock(_always(httpx.Response(404)))
    with pytest.raises(SourceUnavailableError, match="DICOMweb root"):
        await source.search_studies(patient_id="P-1")
    assert observer.dicom[0].status == 404


@pytest.mark.parametrize("patient_id", ["*", "MRN-1*", "MRN?12", "MRN-1,MRN-2", "MRN-1\\MRN-2", " "])
async def test_search_studies_refuses_patient_ids_that_would_match_others(patient_id: str) -> None:
    source, observer = _mock(_always(httpx.Response(200, json=[])))
    with pytest.raises(InvalidResourceError, match="cannot be searched exactly") as info:
        await source.search_studies(patient_id=patient_id)
    # The ID is patient data: it stays out of the message.
    assert len(patient_id.strip()) < 2 or patient_id not in info.value.message
    assert observer.dicom == []


async def test_search_studies_refuses_bad_modality_and_limit() -> None:
    source, _ = _mock(_always(httpx.Response(200, json=[])))
    with pytest.raises(InvalidResourceError, match="modality"):
        await source.search_studies(modality="CT&x=1")
    with pytest.raises(ValueError, match="limit"):
        await source.search_studies(limit=0)


async def test_metadata_not_found_names_the_series() -> None:
    source, observer = _mock(_always(httpx.Response(204)))
    with pytest.raises(SourceUnavailableError, match=r"series 1\.2\.3 of study 1\.2 not found"):
        await source.retrieve_metadata("1.2", "1.2.3")
    assert observer.dicom[0].action == "metadata"


REF = InstanceRef(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4")


def _frames_answer(parts: list[tuple[str, bytes]], outer: str = "application/octet-stream") -> httpx.Response:
    body = b"".join(f"--fb\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for ctype, data in parts)
    return httpx.Response(
        200,
        content=body + b"--fb--\r\n",
        headers={"content-type": f"multipart/related; type={outer}; boundary=fb"},
    )


async def test_frames_request_and_orthanc_style_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        # Orthanc writes the parameter as "transferSyntax" for some syntaxes.
        return _frames_answer(
            [
                ("application/octet-stream; transferSyntax=1.2.840.10008.1.2.1", b"\x01\x00" * 4),
                ("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", b"\x02\x00" * 4),
            ]
        )

    source, observer = _mock(handler)
    parts = await source.retrieve_frame_parts(REF, [2, 1])
    assert seen[0].url.path == "/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4/frames/2,1"
    assert seen[0].headers["accept"] == 'multipart/related; type="application/octet-stream"'
    assert [(f.number, f.content, f.transfer_syntax) for f in parts] == [
        (2, b"\x01\x00" * 4, "1.2.840.10008.1.2.1"),
        (1, b"\x02\x00" * 4, "1.2.840.10008.1.2.1"),
    ]
    assert (observer.dicom[0].action, observer.dicom[0].bytes) == ("frames", 16)


async def test_frames_as_stored_report_each_parts_syntax() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _frames_answer([("image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90", b"\xff\x4f\xff\x51")])

    source, observer = _mock(handler)
    [frame] = await source.retrieve_frame_parts(REF, [1], transfer_syntax="*")
    assert seen[0].headers["accept"] == 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    assert (frame.media_type, frame.transfer_syntax, frame.content) == (
        "image/jp2",
        "1.2.840.10008.1.2.4.90",
        b"\xff\x4f\xff\x51",
    )
    assert observer.dicom[0].transfer_syntax == "1.2.840.10008.1.2.4.90"


async def test_compressed_frames_when_uncompressed_were_asked_are_refused() -> None:
    source, observer = _mock(
        _always(_frames_answer([("image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50", b"\xff\xd8")]))
    )
    with pytest.raises(InvalidResourceError, match=r"1\.2\.840\.10008\.1\.2\.4\.50") as info:
        await source.retrieve_frames(REF, [1])
    assert info.value.details["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
    assert observer.dicom[0].error == info.value.message


async def test_frames_count_must_match() -> None:
    source, _ = _mock(_always(_frames_answer([("application/octet-stream", b"\x00\x00")])))
    with pytest.raises(InvalidResourceError, match="returned 1 frame"):
        await source.retrieve_frames(REF, [1, 2])


async def test_frames_406_names_the_transfer_syntax() -> None:
    source, observer = _mock(_always(httpx.Response(406)))
    with pytest.raises(SourceUnavailableError, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.1 \(HTTP 406\)"):
        await source.retrieve_frames(REF, [1])
    assert observer.dicom[0].status == 406


async def test_frames_of_a_missing_instance_name_the_uids() -> None:
    source, _ = _mock(_always(httpx.Response(404)))
    with pytest.raises(SourceUnavailableError, match=r"instance 1\.2\.3\.4 \(series 1\.2\.3, study 1\.2\) not found"):
        await source.retrieve_frames(REF, [1])


@pytest.mark.parametrize(
    ("frames", "syntax"),
    [([], None), ([0], None), ([1, -2], None), ([True], None), ([1], "1.2.840.10008.1.2.4.50"), ([1], "x")],
)
async def test_bad_frame_requests_are_refused_before_any_request(frames: list[int], syntax: str | None) -> None:
    source, observer = _mock(_always(httpx.Response(500)))
    with pytest.raises(ValueError):
        await source.retrieve_frames(REF, frames, transfer_syntax=syntax)
    assert observer.dicom == []
