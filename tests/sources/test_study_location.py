"""dicom_source_for_study: an ImagingStudy's own DICOMweb Endpoint, and who gets the credentials.

The HTTP boundary is real: a recording DICOMweb stand-in on 127.0.0.1 shows what a source sends,
the live FHIR engine serves Endpoint resources, and the live Orthanc serves the study itself.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import DicomSettings
from agent.domain.events import ListObserver
from agent.errors import SourceUnavailableError
from agent.sources.dicom_dir import DicomDirSource
from agent.sources.dicomweb import DicomWebSource
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.study_location import (
    ENDPOINT_CONNECTION_TYPE_SYSTEM,
    dicom_source_for_study,
    open_dicom_source_for_study,
    origin,
    wado_rs_address,
)
from tests.sources.test_dicomweb import RecordingDicomWeb
from tests.support.fault_proxy import FaultProxy
from tests.support.servers import REPO_ROOT, FhirServerHandle, OrthancHandle

MANIFEST = REPO_ROOT / "fixtures" / "manifest.json"
BASIC = "Basic " + base64.b64encode(b"pacs-user:pacs-pass").decode()


def endpoint(
    address: str, *, id_: str = "ep1", status: str | None = "active", code: str = "dicom-wado-rs"
) -> dict[str, Any]:
    """Return an R4 Endpoint resource for a DICOMweb root."""
    resource: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": id_,
        "connectionType": {"system": ENDPOINT_CONNECTION_TYPE_SYSTEM, "code": code},
        "payloadType": [{"text": "DICOM"}],
        "address": address,
    }
    if status is not None:
        resource["status"] = status
    return resource


def imaging_study(*endpoints: dict[str, Any], references: list[str] | None = None) -> dict[str, Any]:
    """Return an ImagingStudy with the given contained Endpoints, referenced from the study level."""
    refs = references if references is not None else [f"#{e['id']}" for e in endpoints]
    return {
        "resourceType": "ImagingStudy",
        "id": "is1",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
        "contained": list(endpoints),
        "endpoint": [{"reference": r} for r in refs],
    }


def settings(url: str | None = "https://pacs.example.org/dicom-web", **extra: Any) -> DicomSettings:
    return DicomSettings(
        dicomweb_url=url,
        username="pacs-user",
        password="pacs-pass",
        timeout_s=5,
        **extra,
    )


@pytest.fixture
def default(tmp_path: Path) -> DicomDirSource:
    return DicomDirSource(tmp_path / "empty", ListObserver())


# -- Endpoint parsing ----------------------------------------------------------------------------


def test_wado_rs_address_accepts_r4_and_r5_forms() -> None:
    r4 = endpoint("https://pacs.example.org/dicom-web/")
    assert wado_rs_address(r4) == "https://pacs.example.org/dicom-web"
    r5 = {**r4, "connectionType": [{"coding": [{"system": ENDPOINT_CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"}]}]}
    assert wado_rs_address(r5) == "https://pacs.example.org/dicom-web"
    assert wado_rs_address(endpoint("https://pacs.example.org/dicom-web", status=None)) is not None


@pytest.mark.parametrize(
    "resource",
    [
        endpoint("https://pacs.example.org/dicom-web", status="off"),
        endpoint("https://pacs.example.org/dicom-web", code="hl7-fhir-rest"),
        {
            **endpoint("https://pacs.example.org/dicom-web"),
            "connectionType": {"system": "urn:other", "code": "dicom-wado-rs"},
        },
        endpoint("https://user:pw@pacs.example.org/dicom-web"),
        endpoint("ftp://pacs.example.org/dicom-web"),
        endpoint("https://pacs.example.org/dicom-web?token=x"),
        endpoint("/relative/dicom-web"),
        {**endpoint("https://pacs.example.org/dicom-web"), "resourceType": "Device"},
        {**endpoint("https://pacs.example.org/dicom-web"), "address": None},
    ],
)
def test_unusable_endpoints_give_no_address(resource: dict[str, Any]) -> None:
    assert wado_rs_address(resource) is None


def test_origin_makes_default_ports_explicit() -> None:
    assert origin("HTTPS://PACS.example.org/dicom-web") == ("https", "pacs.example.org", 443)
    assert origin("http://127.0.0.1:8042/x") == ("http", "127.0.0.1", 8042)
    assert origin("http://127.0.0.1:99999/x") is None
    assert origin("http://a:b@host/x") is None


# -- which source, which credentials (recording server over real HTTP) ---------------------------


async def test_no_endpoint_keeps_the_default(default: DicomDirSource) -> None:
    study = imaging_study()
    assert await dicom_source_for_study(study, default, settings(), ListObserver()) is default


async def test_endpoint_on_another_origin_gets_no_credentials(default: DicomDirSource) -> None:
    observer = ListObserver()
    with RecordingDicomWeb() as server:
        address = server.origin + "/dicom-web"
        # neither the password nor the token may leave, even for an origin allowed by settings
        configured = settings(bearer_token="pacs-token", endpoint_allowed_origins=[server.origin])
        async with open_dicom_source_for_study(
            imaging_study(endpoint(address)), default, configured, observer
        ) as source:
            assert isinstance(source, DicomWebSource) and source.base_url == address
            refs = await source.list_instances("1.2.3")
        assert [r.sop_instance_uid for r in refs] == ["1.2.3.4.5"]
        assert server.authorizations == [None]
    assert observer.dicom[0].backend == "dicomweb"


async def test_endpoint_on_an_origin_not_allowed_is_ignored(default: DicomDirSource) -> None:
    # The address comes from the patient record: a record must not pick the hosts the agent contacts.
    with RecordingDicomWeb() as server:
        study = imaging_study(endpoint(server.origin + "/dicom-web"))
        assert await dicom_source_for_study(study, default, settings(), ListObserver()) is default
        assert server.requests == []


async def test_endpoint_on_the_configured_origin_gets_the_credentials(default: DicomDirSource) -> None:
    with RecordingDicomWeb() as server:
        address = server.origin + "/dicom-web"
        configured = settings(server.origin + "/configured-root")
        source = await dicom_source_for_study(imaging_study(endpoint(address)), default, configured, ListObserver())
        try:
            assert isinstance(source, DicomWebSource) and source.base_url == address
            await source.list_instances("1.2.3")
        finally:
            await source.aclose()
        assert server.authorizations == [BASIC]


async def test_same_host_on_another_port_is_another_origin(default: DicomDirSource) -> None:
    with RecordingDicomWeb() as server, RecordingDicomWeb() as other:
        configured = settings(other.origin + "/dicom-web", endpoint_allowed_origins=[server.origin])
        async with open_dicom_source_for_study(
            imaging_study(endpoint(server.origin + "/dicom-web")), default, configured, ListObserver()
        ) as source:
            await source.list_instances("1.2.3")
        assert server.authorizations == [None]
        assert other.requests == []


async def test_endpoint_at_the_default_address_is_the_default() -> None:
    observer = ListObserver()
    async with DicomWebSource("https://pacs.example.org/dicom-web", observer=observer) as configured:
        study = imaging_study(endpoint("HTTPS://pacs.example.org:443/dicom-web/"))
        assert await dicom_source_for_study(study, configured, settings(), observer) is configured


async def test_unusable_endpoints_are_skipped_for_the_next_one(default: DicomDirSource) -> None:
    with RecordingDicomWeb() as server:
        good = endpoint(server.origin + "/dicom-web", id_="good")
        study = imaging_study(
            endpoint("https://old.example.org/dicom-web", id_="off", status="off"),
            endpoint("https://fhir.example.org/fhir", id_="rest", code="hl7-fhir-rest"),
            good,
            references=["#missing", "#off", "#rest", "#good"],
        )
        allowed = settings(endpoint_allowed_origins=[server.origin, "https://old.example.org"])
        async with open_dicom_source_for_study(study, default, allowed, ListObserver()) as source:
            assert isinstance(source, DicomWebSource) and source.base_url == server.origin + "/dicom-web"


async def test_series_endpoint_counts_when_the_study_has_none(default: DicomDirSource) -> None:
    study = imaging_study(endpoint("https://series.example.org/dicom-web", id_="s"), references=[])
    study["series"] = [{"uid": "1.2.3.4", "endpoint": [{"reference": "#s"}]}]
    allowed = settings(endpoint_allowed_origins=["https://series.example.org"])
    async with open_dicom_source_for_study(study, default, allowed, ListObserver()) as source:
        assert isinstance(source, DicomWebSource) and source.base_url == "https://series.example.org/dicom-web"


async def test_a_new_source_is_closed_after_use_and_the_default_is_not() -> None:
    observer = ListObserver()
    async with DicomWebSource("https://pacs.example.org/dicom-web", observer=observer) as configured:
        study = imaging_study(endpoint("https://elsewhere.example.org/dicom-web"))
        allowed = settings(endpoint_allowed_origins=["https://elsewhere.example.org:443"])
        async with open_dicom_source_for_study(study, configured, allowed, observer) as source:
            assert source is not configured
        assert isinstance(source, DicomWebSource)
        assert source._client.is_closed  # its connections are released
        async with open_dicom_source_for_study(imaging_study(), configured, settings(), observer) as same:
            assert same is configured
        assert not configured._client.is_closed


async def test_references_without_a_fhir_source_or_elsewhere_are_not_followed(default: DicomDirSource) -> None:
    study = imaging_study(references=["Endpoint/ep1", "https://other-fhir.example.org/fhir/Endpoint/ep1", "Device/d1"])
    assert await dicom_source_for_study(study, default, settings(), ListObserver()) is default


# -- Endpoint/<id> resolved on the live FHIR engine ----------------------------------------------


def _put_endpoint(fhir_server: FhirServerHandle, resource: dict[str, Any]) -> None:
    response = httpx.put(
        f"{fhir_server.base_url}/Endpoint/{resource['id']}",
        content=json.dumps(resource),
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text


async def test_endpoint_reference_is_read_from_the_fhir_server(
    fhir_server: FhirServerHandle, default: DicomDirSource
) -> None:
    endpoint_id = str(uuid.uuid4())
    _put_endpoint(fhir_server, endpoint("https://archive.example.org/dicom-web", id_=endpoint_id))
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as fhir:
        for reference in (f"Endpoint/{endpoint_id}", f"{fhir_server.base_url}/Endpoint/{endpoint_id}"):
            study = imaging_study(references=[reference])
            allowed = settings(endpoint_allowed_origins=["https://archive.example.org"])
            async with open_dicom_source_for_study(study, default, allowed, observer, fhir=fhir) as source:
                assert isinstance(source, DicomWebSource)
                assert source.base_url == "https://archive.example.org/dicom-web"


async def test_unreadable_endpoint_falls_back_to_the_default_and_is_traced(
    fhir_server: FhirServerHandle, default: DicomDirSource
) -> None:
    observer = ListObserver()
    missing = str(uuid.uuid4())
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as fhir:
        study = imaging_study(references=[f"Endpoint/{missing}"])
        assert await dicom_source_for_study(study, default, settings(), observer, fhir=fhir) is default
    [read] = observer.fhir
    assert read.error is not None and missing in read.path


# -- the study itself on the live Orthanc --------------------------------------------------------


def _current_cxr() -> dict[str, Any]:
    if not MANIFEST.is_file():
        pytest.skip("fixtures/manifest.json is not generated yet")
    patient = next(p for p in json.loads(MANIFEST.read_text())["patients"] if p["key"] == "cxr")
    study: dict[str, Any] = patient["studies"][1]
    return study


async def test_study_found_through_its_endpoint_on_orthanc(orthanc: OrthancHandle, default: DicomDirSource) -> None:
    study = _current_cxr()
    observer = ListObserver()
    # The configured root differs from the Endpoint's, on the same origin: the credentials go along.
    configured = DicomSettings(
        dicomweb_url=orthanc.rest_url + "/configured-root", username=orthanc.username, password=orthanc.password
    )
    resource = imaging_study(endpoint(orthanc.dicomweb_url))
    async with open_dicom_source_for_study(resource, default, configured, observer) as source:
        refs = await source.list_instances(study["study_uid"])
        [found] = await source.search_studies(study_uid=study["study_uid"])
    assert {r.sop_instance_uid for r in refs} == {i["sop_instance_uid"] for i in study["instances"]}
    assert found.description == study["description"]
    assert [e.status for e in observer.dicom] == [200, 200]


async def test_orthanc_behind_another_origin_gets_no_credentials(
    orthanc: OrthancHandle, default: DicomDirSource
) -> None:
    study = _current_cxr()
    observer = ListObserver()
    with FaultProxy(orthanc.rest_url) as proxy:
        configured = DicomSettings(
            dicomweb_url=orthanc.dicomweb_url,
            username=orthanc.username,
            password=orthanc.password,
            endpoint_allowed_origins=[proxy.base_url],
        )
        resource = imaging_study(endpoint(proxy.base_url + "/dicom-web"))
        async with open_dicom_source_for_study(resource, default, configured, observer) as source:
            with pytest.raises(SourceUnavailableError, match="authentication failed"):
                await source.list_instances(study["study_uid"])
        assert [r.upstream_status for r in proxy.records] == [401]
