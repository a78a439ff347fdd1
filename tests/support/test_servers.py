"""The test servers themselves: loopback-only binding, the bind shim, the loaders, clean stops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.plugin_servers import skip_or_fail_missing
from tests.support.servers import (
    FhirServerHandle,
    OrthancHandle,
    ServerToolMissingError,
    build_bind_shim,
    is_loopback,
    listening_addresses,
    load_fhir_bundles,
    start_fhir_server,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net and uses LD_PRELOAD")


def test_listening_addresses_sees_a_socket_this_test_opens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listening_addresses(port) == ["127.0.0.1"]
    assert listening_addresses(port) == []


def test_bind_shim_rewrites_wildcard_binds_to_loopback() -> None:
    try:
        shim = build_bind_shim()
    except ServerToolMissingError as exc:
        skip_or_fail_missing("bind shim", exc)
    probe = (
        "import socket\n"
        "s = socket.socket(); s.bind(('0.0.0.0', 0)); print(s.getsockname()[0])\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[0])\n"
        "try:\n"
        "    s6 = socket.socket(socket.AF_INET6); s6.bind(('::', 0)); print(s6.getsockname()[0])\n"
        "except OSError:\n"
        "    print('no-ipv6')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "LD_PRELOAD": str(shim)},
        capture_output=True,
        text=True,
        check=True,
    )
    wildcard4, specific4, wildcard6 = result.stdout.split()
    assert wildcard4 == "127.0.0.1"
    assert specific4 == "127.0.0.1"
    assert wildcard6 in ("::1", "no-ipv6")


def test_orthanc_listens_on_loopback_only(orthanc: OrthancHandle) -> None:
    addresses = listening_addresses(orthanc.port)
    assert addresses, "Orthanc's port is not in /proc/net/tcp"
    assert all(is_loopback(a) for a in addresses), addresses


def test_orthanc_requires_authentication(orthanc: OrthancHandle) -> None:
    assert httpx.get(f"{orthanc.rest_url}/system").status_code == 401
    assert httpx.get(f"{orthanc.rest_url}/system", auth=orthanc.auth).status_code == 200


def test_orthanc_holds_the_fixture_instances(orthanc: OrthancHandle) -> None:
    expected = len(list((Path(__file__).resolve().parents[2] / "fixtures" / "dicom").rglob("*.dcm")))
    stats = httpx.get(f"{orthanc.rest_url}/statistics", auth=orthanc.auth).json()
    assert stats["CountInstances"] >= expected


def test_fhir_server_listens_on_loopback_only(fhir_server: FhirServerHandle) -> None:
    addresses = listening_addresses(fhir_server.port)
    assert addresses
    assert all(is_loopback(a) for a in addresses), addresses


def test_fhir_server_answers_fhir_json(fhir_server: FhirServerHandle) -> None:
    response = httpx.get(f"{fhir_server.base_url}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["resourceType"] == "CapabilityStatement"

    missing = httpx.get(f"{fhir_server.base_url}/Patient/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/fhir+json")
    assert missing.json()["resourceType"] == "OperationOutcome"


def test_fhir_server_accepts_update_as_create_and_keeps_history(fhir_server: FhirServerHandle) -> None:
    pid = str(uuid.uuid4())
    url = f"{fhir_server.base_url}/Patient/{pid}"
    first = httpx.put(url, json={"resourceType": "Patient", "id": pid, "gender": "female"})
    # Medplum's in-memory repository creates on PUT but answers 200, not 201.
    assert first.status_code in (200, 201)
    assert httpx.put(url, json={"resourceType": "Patient", "id": pid, "gender": "other"}).status_code == 200
    history = [httpx.get(f"{url}/_history").json() for _ in range(2)]
    for bundle in history:
        assert bundle["type"] == "history"
        assert [e["resource"]["gender"] for e in bundle["entry"]] == ["other", "female"]


def test_fhir_server_shared_search_parameters_match_each_type_by_its_own_path(fhir_server: FhirServerHandle) -> None:
    # The wrapper narrows multi-type parameters (``patient``, ``date``...) to each type's own branch,
    # a speed fix only: what matches must be what FHIR R4 defines.
    base, pid, tag = fhir_server.base_url, str(uuid.uuid4()), uuid.uuid4().hex
    created = [
        ("Patient", {"resourceType": "Patient", "id": pid}),
        ("Group", {"resourceType": "Group", "id": pid, "type": "person", "actual": True}),
        (
            "Observation",
            {
                "resourceType": "Observation",
                "id": f"o-{tag}",
                "status": "final",
                "code": {"text": tag},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": "2021-03-04",
            },
        ),
        # same id, but the subject is a Group: ``patient=`` must not match it
        (
            "Observation",
            {
                "resourceType": "Observation",
                "id": f"g-{tag}",
                "status": "final",
                "code": {"text": tag},
                "subject": {"reference": f"Group/{pid}"},
                "effectiveDateTime": "2019-01-01",
            },
        ),
        (
            "AllergyIntolerance",
            {"resourceType": "AllergyIntolerance", "id": f"a-{tag}", "patient": {"reference": f"Patient/{pid}"}},
        ),
    ]
    try:
        for rtype, body in created:
            assert httpx.put(f"{base}/{rtype}/{body['id']}", json=body).status_code in (200, 201)

        def ids(query: str) -> set[str]:
            bundle = httpx.get(f"{base}/{query}").json()
            return {e["resource"]["id"] for e in bundle.get("entry", [])}

        assert ids(f"Observation?patient={pid}") == {f"o-{tag}"}
        assert ids(f"Observation?patient=Patient/{pid}") == {f"o-{tag}"}
        assert ids(f"Observation?subject={pid}") == {f"o-{tag}", f"g-{tag}"}
        assert ids(f"AllergyIntolerance?patient={pid}") == {f"a-{tag}"}
        assert ids(f"Observation?code:text={tag}&date=ge2020-01-01") == {f"o-{tag}"}
        assert ids(f"Observation?code:text={tag}&date=lt2020-01-01") == {f"g-{tag}"}
    finally:
        for rtype, body in reversed(created):
            httpx.delete(f"{base}/{rtype}/{body['id']}")


def test_load_fhir_bundles_splits_large_transactions(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    # 60 updates: above the engine's 50-update transaction limit, and linked by urn:uuid references.
    patient_id = str(uuid.uuid4())
    entries = [
        {
            "fullUrl": f"urn:uuid:{patient_id}",
            "resource": {"resourceType": "Patient", "id": patient_id},
            "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
        }
    ]
    for _ in range(59):
        oid = str(uuid.uuid4())
        entries.append(
            {
                "fullUrl": f"urn:uuid:{oid}",
                "resource": {
                    "resourceType": "Observation",
                    "id": oid,
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": f"urn:uuid:{patient_id}"},
                },
                "request": {"method": "PUT", "url": f"Observation/{oid}"},
            }
        )
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))

    assert load_fhir_bundles(fhir_server.base_url, [path]) == 60
    found = httpx.get(
        f"{fhir_server.base_url}/Observation", params={"subject": f"Patient/{patient_id}", "_count": "100"}
    ).json()
    assert found["total"] == 59


def test_load_fhir_bundles_keeps_the_ids_of_posted_entries(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    # Synthea's form: every entry is `POST Type` with `fullUrl: urn:uuid:<id>`; one resource here
    # carries no id of its own, so the fullUrl's uuid is its id (as the bundle folder source reads it).
    patient_id = str(uuid.uuid4())
    entries = [
        {
            "fullUrl": f"urn:uuid:{patient_id}",
            "resource": {"resourceType": "Patient", "id": patient_id},
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    ids = []
    for n in range(70):  # above the 50-update limit: chunked, linked only by urn:uuid references
        oid = str(uuid.uuid4())
        ids.append(oid)
        resource = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "subject": {"reference": f"urn:uuid:{patient_id}"},
        }
        if n:
            resource["id"] = oid
        entries.append(
            {"fullUrl": f"urn:uuid:{oid}", "resource": resource, "request": {"method": "POST", "url": "Observation"}}
        )
    path = tmp_path / "synthea-like.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))

    assert load_fhir_bundles(fhir_server.base_url, [path]) == 71
    assert httpx.get(f"{fhir_server.base_url}/Patient/{patient_id}").status_code == 200
    found = httpx.get(
        f"{fhir_server.base_url}/Observation", params={"subject": f"Patient/{patient_id}", "_count": "100"}
    ).json()
    assert {e["resource"]["id"] for e in found["entry"]} == set(ids)
    # Loading the same bundle again updates in place instead of adding copies.
    assert load_fhir_bundles(fhir_server.base_url, [path]) == 71
    again = httpx.get(f"{fhir_server.base_url}/Observation", params={"subject": f"Patient/{patient_id}"}).json()
    assert again["total"] == 70


def test_load_fhir_bundles_resolves_conditional_creates(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    base = fhir_server.base_url
    npi_system = "http://hl7.org/fhir/sid/us-npi"
    existing_org, org_value, new_value, other_value = str(uuid.uuid4()), *(uuid.uuid4().hex for _ in range(3))
    org = {
        "resourceType": "Organization",
        "id": existing_org,
        "identifier": [{"system": npi_system, "value": org_value}],
    }
    assert httpx.put(f"{base}/Organization/{existing_org}", json=org).status_code in (200, 201)

    bundle_org, practitioner_id, nameless_id, encounter_id = (str(uuid.uuid4()) for _ in range(4))
    entries = [
        {  # matches the Organization already on the server: reused, not created again
            "fullUrl": f"urn:uuid:{bundle_org}",
            "resource": {**org, "id": bundle_org},
            "request": {"method": "POST", "url": "Organization", "ifNoneExist": f"identifier={npi_system}|{org_value}"},
        },
        {  # new: stored under its own id
            "fullUrl": f"urn:uuid:{practitioner_id}",
            "resource": {
                "resourceType": "Practitioner",
                "id": practitioner_id,
                "identifier": [{"system": npi_system, "value": new_value}],
            },
            "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": f"identifier={npi_system}|{new_value}"},
        },
        {  # same criteria again in one bundle: the first one's resource
            "fullUrl": f"urn:uuid:{nameless_id}",
            "resource": {"resourceType": "Practitioner", "identifier": [{"system": npi_system, "value": new_value}]},
            "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": f"identifier={npi_system}|{new_value}"},
        },
        {  # no id anywhere: the server names it
            "resource": {"resourceType": "Practitioner", "identifier": [{"system": npi_system, "value": other_value}]},
            "request": {
                "method": "POST",
                "url": "Practitioner",
                "ifNoneExist": f"identifier={npi_system}|{other_value}",
            },
        },
        {
            "fullUrl": f"urn:uuid:{encounter_id}",
            "resource": {
                "resourceType": "Encounter",
                "id": encounter_id,
                "status": "finished",
                "class": {"code": "AMB"},
                "serviceProvider": {"reference": f"urn:uuid:{bundle_org}"},
                "participant": [
                    {"individual": {"reference": f"urn:uuid:{practitioner_id}"}},
                    {"individual": {"reference": f"urn:uuid:{nameless_id}"}},
                ],
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
    ]
    path = tmp_path / "conditional.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))

    assert load_fhir_bundles(base, [path]) == 5
    encounter = httpx.get(f"{base}/Encounter/{encounter_id}").json()
    assert encounter["serviceProvider"]["reference"] == f"Organization/{existing_org}"
    assert [p["individual"]["reference"] for p in encounter["participant"]] == [f"Practitioner/{practitioner_id}"] * 2
    assert httpx.get(f"{base}/Organization/{bundle_org}").status_code == 404
    practitioners = httpx.get(f"{base}/Practitioner", params={"identifier": f"{npi_system}|{new_value}"}).json()
    assert [e["resource"]["id"] for e in practitioners["entry"]] == [practitioner_id]
    named = httpx.get(f"{base}/Practitioner", params={"identifier": f"{npi_system}|{other_value}"}).json()
    assert named["total"] == 1


def test_fhir_server_stop_ends_exactly_its_process(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    # A second server of our own (the session one must keep running); fhir_server proves node is here.
    handle = start_fhir_server(tmp_path)
    try:
        assert handle.startup_s < 30
        assert httpx.get(f"{handle.base_url}/metadata").status_code == 200
    finally:
        handle.stop()
    assert handle.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{handle.base_url}/metadata")
