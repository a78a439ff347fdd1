"""Imaging degrades, it never ends a run: each way a study can be missing, end to end on the tiny models.

Real: a bundle-folder FHIR source (or the session's FHIR engine), the DICOM folder source or the
session's Orthanc (behind a fault-injecting proxy where it must misbehave), pixel preparation,
the tiny random-weight MedSigLIP and MedGemma, the graph and the SQL trace. Each case asserts
that the run is ``ok``, the exact warning in ``AskResult.warnings`` and the ``warning`` note
(status ``degraded``) in the trace. The patient data and DICOM files are written by the tests;
the Synthea check reads a shared bundle in place through a folder of symlinks.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, generate_uid

from agent.audit.reader import load_run
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.domain.plan import Plan
from agent.domain.refs import InstanceRef
from agent.errors import DicomDecodeError, InternalError
from agent.runner import AgentRuntime, ModelCache, run_ask
from agent.sources.pixels import prepare_instance
from tests.sources.test_dicomweb import make_dx
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import FhirServerHandle, OrthancHandle, stow_dicom
from tests.support.shared_data import SYNTHEA_DIR, synthea_dir_or_skip

PATIENT = "degrade-patient"
QUESTION = "What is the most recent hemoglobin A1c result?"
SYNTHEA = SYNTHEA_DIR  # ../shared/data, read in place
ELEONOR = "Eleonor_Becker_c67244e9-b850-4b4f-9691-5d04c250f6f7.json"
ELEONOR_ID = "11f2a4d0-59e9-48ca-9495-6d0da2498d66"
MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
CXR = next(p for p in MANIFEST["patients"] if p["key"] == "cxr")


# -- data written by the tests ---------------------------------------------------------------------


def imaging_study(
    study_id: str,
    *,
    identifiers: list[dict[str, Any]] | None = None,
    series: list[dict[str, Any]] | None = None,
    started: str = "2024-02-01T10:00:00Z",
) -> dict[str, Any]:
    """Return an R4 ImagingStudy of the test patient (DX), named the way the test needs."""
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "status": "available",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "started": started,
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
    }
    if identifiers is not None:
        resource["identifier"] = identifiers
    if series is not None:
        resource["series"] = series
    return resource


def by_oid(uid: str) -> list[dict[str, Any]]:
    """Return the identifiers Synthea writes for a study UID."""
    return [{"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{uid}"}]


def write_record(folder: Path, studies: list[dict[str, Any]]) -> Path:
    """Write the test patient (one HbA1c result and these studies) as a bundle folder; return it."""
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": PATIENT,
            "name": [{"family": "Degrade", "given": ["Test"]}],
            "gender": "female",
            "birthDate": "1960-01-01",
        },
        {
            "resourceType": "Observation",
            "id": "a1c-1",
            "status": "final",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}],
                "text": "Hemoglobin A1c",
            },
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectiveDateTime": "2024-01-05T09:00:00Z",
            "valueQuantity": {"value": 6.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        },
        *studies,
    ]
    folder.mkdir(parents=True, exist_ok=True)
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    (folder / "patient.json").write_text(json.dumps(bundle))
    return folder


def cxr_pair(folder: Path, *, truncate_pa: bool = False) -> dict[str, Any]:
    """Write a PA + lateral DX study (two series); the PA's pixel data cut short when asked."""
    study_uid, pa_series, lat_series = generate_uid(), generate_uid(), generate_uid()
    pa = make_dx(folder / "pa.dcm", study_uid, pa_series, 1, "PA", patient_id=PATIENT, truncate_pixels=truncate_pa)
    lat = make_dx(folder / "lat.dcm", study_uid, lat_series, 2, "LL", patient_id=PATIENT)
    sop = {
        name: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for name, path in [("pa", pa), ("lat", lat)]
    }
    return {"study_uid": study_uid, "pa_series": pa_series, "lat_series": lat_series, "files": [pa, lat], **sop}


# -- runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> ModelCache:
    """Keep the tiny models loaded across this module's runs (they are keyed by the model settings)."""
    return ModelCache()


@pytest.fixture
def runtime_for(tmp_path: Path, test_models_dir: Path, models: ModelCache) -> Iterator[Any]:
    """Return a factory of runtimes on the tiny test models, a bundle folder and the given DICOM settings."""
    made: list[AgentRuntime] = []

    def make(fhir: dict[str, Any], dicom: dict[str, Any]) -> AgentRuntime:
        settings = get_settings(
            fhir=fhir,
            dicom=dicom,
            db={"url": f"sqlite:///{tmp_path / f'trace-{len(made)}.db'}"},
            models={"use_test_models": True, "test_models_dir": test_models_dir, "max_new_tokens": 4},
        )
        made.append(AgentRuntime(settings=settings, models=models))
        return made[-1]

    yield make
    for runtime in made:
        runtime.engine.dispose()


def assert_degraded(runtime: AgentRuntime, result: Any, warning: str, reason: str) -> Any:
    """Assert the run answered, with ``warning`` in its result and as a ``degraded`` note in its trace."""
    assert result.status == "ok" and result.answer is not None
    assert warning in result.warnings, result.warnings
    trace = load_run(runtime.engine, result.run_id)
    assert trace.run.status == "ok"
    notes = [e for e in trace.events if e.name == "warning" and e.meta["message"] == warning]
    assert len(notes) == 1, [e.meta for e in trace.events if e.name == "warning"]
    assert notes[0].status == "degraded" and notes[0].meta["reason"] == reason
    return trace


def model_call(trace: Any) -> Any:
    """Return the answering model call of a trace."""
    return next(e for e in trace.events if e.name == "medgemma.generate")


def prepared(trace: Any, role: str = "current") -> list[str]:
    """Return the SOP Instance UIDs whose pixels were prepared for a study, in order."""
    return [
        e.meta["sop_instance_uid"] for e in trace.events if e.name == "pixel_preparation" and e.meta["study"] == role
    ]


# -- studies found the ways real servers name them ------------------------------------------------


async def test_a_study_named_only_by_series_uid_is_located_and_read(tmp_path: Path, runtime_for: Any) -> None:
    pair = cxr_pair(tmp_path / "dicom")
    study = imaging_study("img-1", identifiers=[{"value": "ACC-1"}], series=[{"uid": pair["lat_series"]}])
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "dicom"})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert result.status == "ok" and result.warnings == []
    trace = load_run(runtime.engine, result.run_id)
    located = next(e for e in trace.events if e.name == "study_located")
    assert located.meta == {
        "study": "ImagingStudy/img-1",
        "role": "current",
        "study_uid": pair["study_uid"],
        "via": f"series {pair['lat_series']}",
    }
    assert prepared(trace) == [pair["pa"], pair["lat"]]
    assert model_call(trace).meta["image_refs"] == [pair["pa"]]  # frontal first


# -- each degrade path -----------------------------------------------------------------------------


async def test_a_study_with_no_uid_at_all_cannot_be_located(tmp_path: Path, runtime_for: Any) -> None:
    study = imaging_study("img-1", identifiers=[{"system": "http://hospital.example/acc", "value": "ACC-1"}])
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    trace = assert_degraded(
        runtime,
        result,
        "ImagingStudy/img-1: cannot be located: no DICOM study UID in its identifiers and no series or instance UIDs",
        "study_not_located",
    )
    assert "ImagingStudy/img-1" in result.sources  # the study itself was read; only its images are missing
    assert not any(e.kind == "dicom_retrieval" for e in trace.events)


async def test_a_study_uid_the_source_does_not_hold_is_not_found(tmp_path: Path, runtime_for: Any) -> None:
    cxr_pair(tmp_path / "dicom")
    missing = generate_uid()
    study = imaging_study("img-1", identifiers=by_oid(missing))
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "dicom"})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    trace = assert_degraded(
        runtime, result, f"ImagingStudy/img-1: not found in the imaging source (study {missing})", "study_not_found"
    )
    assert model_call(trace).meta["images"] == 0
    assert "image_findings" not in [e.name for e in trace.events]


async def test_listed_series_the_source_does_not_hold_are_not_found(tmp_path: Path, runtime_for: Any) -> None:
    cxr_pair(tmp_path / "dicom")
    series = generate_uid()
    study = imaging_study("img-1", series=[{"uid": series, "instance": [{"uid": generate_uid()}]}])
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "dicom"})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert_degraded(
        runtime, result, f"ImagingStudy/img-1: not found in the imaging source (series {series})", "study_not_found"
    )


async def test_an_empty_dicom_folder_is_not_found(tmp_path: Path, runtime_for: Any) -> None:
    uid = generate_uid()
    study = imaging_study("img-1", identifiers=by_oid(uid))
    (tmp_path / "empty").mkdir()
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "empty"})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert_degraded(
        runtime, result, f"ImagingStudy/img-1: not found in the imaging source (study {uid})", "study_not_found"
    )


async def test_a_missing_dicom_folder_is_an_unavailable_source(tmp_path: Path, runtime_for: Any) -> None:
    study = imaging_study("img-1", identifiers=by_oid("1.2.3"))
    gone = tmp_path / "no-such-folder"
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": gone})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert_degraded(
        runtime,
        result,
        f"ImagingStudy/img-1: imaging source unavailable (source_unavailable): "
        f"DICOM folder {gone} does not exist or is not a folder",
        "imaging_unavailable",
    )


async def test_a_source_with_a_study_but_no_instances_is_empty(
    tmp_path: Path, runtime_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class EmptySource:
        async def list_instances(self, study_uid: str) -> list[InstanceRef]:
            return []

        async def aclose(self) -> None:
            return None

    monkeypatch.setattr("agent.runner.make_dicom_source", lambda settings, observer: EmptySource())
    study = imaging_study("img-1", identifiers=[{"system": "urn:dicom:uid", "value": "1.2.3"}])
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert_degraded(
        runtime, result, "ImagingStudy/img-1: no instances in the imaging source (study 1.2.3)", "study_empty"
    )


async def test_a_study_none_of_whose_images_decode(tmp_path: Path, runtime_for: Any) -> None:
    pair = cxr_pair(tmp_path / "dicom")
    expected: list[str] = []
    for path in pair["files"]:
        ds = pydicom.dcmread(path)
        # claim JPEG 2000 (no decoder installed here), encapsulated as the syntax requires
        ds.file_meta.TransferSyntaxUID = JPEG2000
        ds.PixelData = encapsulate([ds.PixelData])
        ds.save_as(path, enforce_file_format=True)
        ref = InstanceRef(
            study_uid=pair["study_uid"], series_uid=str(ds.SeriesInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID)
        )
        with pytest.raises(DicomDecodeError) as caught:
            prepare_instance(pydicom.dcmread(path), ref)
        expected.append(caught.value.message)
    study = imaging_study("img-1", identifiers=by_oid(pair["study_uid"]))
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "dicom"})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    # the PA is chosen first, so its error is the one the study's warning quotes
    trace = assert_degraded(
        runtime,
        result,
        f"ImagingStudy/img-1: no image could be decoded (dicom_undecodable): {expected[0]}",
        "study_undecodable",
    )
    assert "JPEG 2000" in expected[0] or JPEG2000 in expected[0]
    assert [w for w in result.warnings if w.startswith("image skipped: ")] == [f"image skipped: {m}" for m in expected]
    skipped = [e for e in trace.events if e.name == "instance_skipped"]
    assert [e.status for e in skipped] == ["failed", "failed"]
    assert model_call(trace).meta["images"] == 0


async def test_a_dropped_main_view_says_what_the_answer_rests_on(tmp_path: Path, runtime_for: Any) -> None:
    pair = cxr_pair(tmp_path / "dicom", truncate_pa=True)
    study = imaging_study("img-1", identifiers=by_oid(pair["study_uid"]))
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path / "dicom"})
    result = await run_ask(runtime, patient_id=PATIENT, question="Is the chest X-ray normal?")
    trace = assert_degraded(
        runtime,
        result,
        f"ImagingStudy/img-1: main view dropped: the PA image (instance {pair['pa']}) could not be read; "
        "the answer rests on the LL view only",
        "main_view_dropped",
    )
    assert any(w.startswith("image skipped: ") and pair["pa"] in w for w in result.warnings)
    assert prepared(trace) == [pair["lat"]]
    assert model_call(trace).meta["image_refs"] == [pair["lat"]]  # the lateral alone reached the model
    note = next(e for e in trace.events if e.name == "warning" and e.meta["reason"] == "main_view_dropped")
    assert note.meta["dropped_instance"] == pair["pa"] and note.meta["kept_views"] == ["LL"]


async def test_a_failing_prior_study_leaves_the_current_one(tmp_path: Path, runtime_for: Any) -> None:
    pair = cxr_pair(tmp_path / "dicom")
    gone = generate_uid()
    current = imaging_study("img-now", identifiers=by_oid(pair["study_uid"]), started="2024-02-01T10:00:00Z")
    prior = imaging_study("img-before", identifiers=by_oid(gone), started="2023-02-01T10:00:00Z")
    runtime = runtime_for(
        {"bundle_dir": write_record(tmp_path / "fhir", [current, prior])}, {"dicom_dir": tmp_path / "dicom"}
    )
    plan = Plan(resource_types=["Observation", "ImagingStudy"], needs_images=True, prior_study=True)
    result = await run_ask(runtime, patient_id=PATIENT, question="Compare with the prior film.", plan=plan)
    trace = assert_degraded(
        runtime,
        result,
        f"ImagingStudy/img-before (prior study): not found in the imaging source (study {gone})",
        "study_not_found",
    )
    assert prepared(trace) == [pair["pa"], pair["lat"]]
    assert model_call(trace).meta["image_refs"] == [pair["pa"]]  # frontal first
    note = next(e for e in trace.events if e.name == "warning")
    assert note.meta["role"] == "prior" and note.meta["study"] == "ImagingStudy/img-before"


# -- a DICOMweb server that is down, slow or refusing (the session's Orthanc behind a proxy) -------


@pytest.fixture(scope="module")
def stored_pair(orthanc: OrthancHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store one CXR pair of the test patient in the session's Orthanc."""
    pair = cxr_pair(tmp_path_factory.mktemp("degrade-dicomweb"))
    assert stow_dicom(orthanc.dicomweb_url, orthanc.auth, pair["files"]) == 2
    return pair


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_dicomweb_server_is_an_unavailable_source(tmp_path: Path, runtime_for: Any) -> None:
    study = imaging_study("img-1", identifiers=by_oid("1.2.3"))
    url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicomweb_url": url})
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    [warning] = [w for w in result.warnings if w.startswith("ImagingStudy/img-1: ")]
    prefix = (
        "ImagingStudy/img-1: imaging source unavailable (source_unavailable): "
        f"DICOMweb server {url} could not be reached: "
    )
    assert warning.startswith(prefix)
    assert_degraded(runtime, result, warning, "imaging_unavailable")


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        (Fault.delay(3.0), "DICOMweb server {url} timed out after 0.5s"),
        (Fault.status_code(503), "DICOMweb server {url} answered HTTP 503 to a search request"),
        (Fault.status_code(401), "DICOMweb server {url} refused the request: authentication failed (HTTP 401)"),
    ],
    ids=["timeout", "error", "refused"],
)
async def test_a_failing_dicomweb_server_is_an_unavailable_source(
    tmp_path: Path, runtime_for: Any, orthanc: OrthancHandle, stored_pair: dict[str, Any], fault: Fault, problem: str
) -> None:
    study = imaging_study("img-1", identifiers=by_oid(stored_pair["study_uid"]))
    with FaultProxy(orthanc.dicomweb_url) as proxy:
        proxy.add_rule(r"instances", [fault])
        url = proxy.base_url.rstrip("/")
        dicom = {"dicomweb_url": url, "username": orthanc.username, "password": orthanc.password, "timeout_s": 0.5}
        runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, dicom)
        result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    warning = f"ImagingStudy/img-1: imaging source unavailable (source_unavailable): {problem.format(url=url)}"
    trace = assert_degraded(runtime, result, warning, "imaging_unavailable")
    failed = [e for e in trace.events if e.kind == "dicom_retrieval"]
    assert failed and failed[-1].meta["error"]


async def test_the_same_dicomweb_study_is_read_when_the_server_answers(
    tmp_path: Path, runtime_for: Any, orthanc: OrthancHandle, stored_pair: dict[str, Any]
) -> None:
    # the control for the failing cases above: same study, same settings, no fault
    study = imaging_study("img-1", series=[{"instance": [{"uid": stored_pair["lat"]}]}])
    dicom = {"dicomweb_url": orthanc.dicomweb_url, "username": orthanc.username, "password": orthanc.password}
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, dicom)
    result = await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    assert result.status == "ok" and result.warnings == []
    trace = load_run(runtime.engine, result.run_id)
    assert prepared(trace) == [stored_pair["pa"], stored_pair["lat"]]


# -- the ImagingStudy search itself fails ---------------------------------------------------------------


async def test_a_failing_imaging_study_search_leaves_the_rest_of_the_record(
    fhir_server: FhirServerHandle, runtime_for: Any
) -> None:
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^ImagingStudy\?", [Fault.status_code(503), Fault.status_code(503)])
        fhir = {"base_url": proxy.base_url, "max_retries": 1, "backoff_base_s": 0.01}
        runtime = runtime_for(fhir, {"dicom_dir": DEFAULT_FIXTURES / "dicom"})
        result = await run_ask(runtime, patient_id=CXR["patient_id"], question="Summarise the heart failure.")
    trace = assert_degraded(
        runtime,
        result,
        "ImagingStudy could not be fetched (source_unavailable): the answer does not reflect it",
        "type_failed",
    )
    assert any(source.startswith("Condition/") for source in result.sources)
    context = next(e for e in trace.events if e.name == "context")
    assert context.meta["missing"] == {"ImagingStudy": "source_unavailable"}


# -- what is not the source's fault still fails ------------------------------------------------------


async def test_a_programming_error_in_the_imaging_half_still_fails_the_run(
    tmp_path: Path, runtime_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenSource:
        async def list_instances(self, study_uid: str) -> list[InstanceRef]:
            raise RuntimeError("a bug, not an unreadable study")

        async def aclose(self) -> None:
            return None

    monkeypatch.setattr("agent.runner.make_dicom_source", lambda settings, observer: BrokenSource())
    study = imaging_study("img-1", identifiers=by_oid("1.2.3"))
    runtime = runtime_for({"bundle_dir": write_record(tmp_path / "fhir", [study])}, {"dicom_dir": tmp_path})
    with pytest.raises(InternalError) as caught:
        await run_ask(runtime, patient_id=PATIENT, question=QUESTION)
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    assert trace.run.status == "failed"
    assert trace.events[-1].meta["failing_step"] == "fetch_images"


# -- a real record nobody here wrote ----------------------------------------------------------------


async def test_a_synthea_patient_gets_an_a1c_answer_despite_unlocatable_imaging(
    tmp_path: Path, runtime_for: Any
) -> None:
    synthea_dir_or_skip()
    folder = tmp_path / "synthea"
    folder.mkdir()
    (folder / ELEONOR).symlink_to(SYNTHEA / ELEONOR)  # read in place, never copied
    runtime = runtime_for({"bundle_dir": folder}, {"dicom_dir": DEFAULT_FIXTURES / "dicom"})
    result = await run_ask(runtime, patient_id=ELEONOR_ID, question=QUESTION)
    studies = [
        e["resource"]
        for e in json.loads((SYNTHEA / ELEONOR).read_text())["entry"]
        if e["resource"]["resourceType"] == "ImagingStudy"
    ]
    newest = max(studies, key=lambda s: s["started"])
    uid = newest["identifier"][0]["value"].removeprefix("urn:oid:")  # Synthea: urn:ietf:rfc:3986 + urn:oid:
    assert_degraded(
        runtime,
        result,
        f"ImagingStudy/{newest['id']}: not found in the imaging source (study {uid})",
        "study_not_found",
    )
    assert f"ImagingStudy/{newest['id']}" in result.sources
