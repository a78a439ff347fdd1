"""Capability discovery (``GET metadata``) on the live FHIR engine, the bundle folder, and stub servers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from agent.domain.events import ListObserver
from agent.sources.capabilities import (
    EVERYTHING_CANONICAL,
    discover,
    parse_capability_statement,
    search_only,
)
from agent.sources.fhir_bundle_dir import BundleDirFhirSource
from agent.sources.fhir_http import HttpFhirSource
from tests.support.servers import REPO_ROOT, FhirServerHandle

BASE = "https://fhir.example.org/r4"


def _hapi_like_statement(definition: str = "OperationDefinition/Patient-i-everything") -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "fhirVersion": "4.0.1",
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "Patient",
                        "searchParam": [{"name": "identifier"}, {"name": "name"}],
                        "operation": [{"name": "everything", "definition": definition}],
                    },
                    {
                        "type": "MedicationRequest",
                        "searchParam": [{"name": "patient"}, {"name": "_lastUpdated"}],
                        "searchInclude": ["MedicationRequest:medication", "MedicationRequest:requester"],
                    },
                    # Encounter/$everything must not be mistaken for the Patient operation.
                    {"type": "Encounter", "operation": [{"name": "everything"}]},
                ],
            }
        ],
    }


def _stub_source(routes: dict[str, tuple[int, Any]], observer: ListObserver | None = None) -> HttpFhirSource:
    """Return a source over a MockTransport answering ``routes`` (relative path -> status, body)."""

    def handler(request: httpx.Request) -> httpx.Response:
        relative = request.url.path.removeprefix("/r4/")
        status, body = routes.get(relative, (404, {"resourceType": "OperationOutcome", "issue": []}))
        return httpx.Response(status, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpFhirSource(BASE, observer=observer or ListObserver(), client=client)


async def test_live_server_minimal_statement_means_search_only(fhir_server: FhirServerHandle) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        caps = await discover(source)
    assert caps.declared and caps.fhir_version == "4.0.1"
    assert not caps.everything and not caps.everything_params
    assert not caps.supports_include("MedicationRequest", "MedicationRequest:medication")
    assert caps.resource_types == frozenset()
    # Unknown is not "unsupported": no declared parameters means the caller may still try.
    assert caps.supports_search_param("Observation", "_lastUpdated") is None
    assert [(e.path, e.status) for e in observer.fhir] == [("metadata", 200)]


async def test_bundle_folder_declares_search_only() -> None:
    observer = ListObserver()
    source = BundleDirFhirSource(REPO_ROOT / "fixtures" / "fhir", observer=observer)
    caps = await discover(source)
    assert caps.declared and not caps.everything
    assert {"Patient", "Observation", "MedicationRequest", "ImagingStudy"} <= caps.resource_types
    assert caps.supports_search_param("Observation", "patient") is True
    assert caps.supports_search_param("Observation", "_lastUpdated") is False
    assert caps.supports_search_param("Patient", "identifier") is True
    assert [(e.backend, e.path, e.status) for e in observer.fhir] == [("bundle-dir", "metadata", 200)]


async def test_everything_parameters_read_from_the_servers_operation_definition() -> None:
    definition = {
        "resourceType": "OperationDefinition",
        "id": "Patient-i-everything",
        "parameter": [
            {"name": "_since", "use": "in"},
            {"name": "_count", "use": "in"},
            {"name": "return", "use": "out"},
        ],
    }
    observer = ListObserver()
    source = _stub_source(
        {
            "metadata": (200, _hapi_like_statement()),
            "OperationDefinition/Patient-i-everything": (200, definition),
        },
        observer,
    )
    caps = await discover(source)
    assert caps.everything and caps.everything_since and not caps.everything_type
    assert caps.everything_params == frozenset({"_since", "_count"})
    assert caps.supports_include("MedicationRequest", "MedicationRequest:medication")
    assert not caps.supports_include("Observation", "MedicationRequest:medication")
    assert [e.path for e in observer.fhir] == ["metadata", "OperationDefinition/Patient-i-everything"]


async def test_unreadable_operation_definition_falls_back_to_the_specs_parameters() -> None:
    source = _stub_source({"metadata": (200, _hapi_like_statement())})
    caps = await discover(source)
    assert caps.everything and caps.everything_since and caps.everything_type


def test_canonical_definition_and_system_level_operation_count_as_everything() -> None:
    caps = parse_capability_statement(_hapi_like_statement(definition=EVERYTHING_CANONICAL))
    assert caps.everything and caps.everything_type
    system_level = {
        "resourceType": "CapabilityStatement",
        "fhirVersion": "4.0.1",
        "rest": [{"mode": "server", "operation": [{"name": "patient-everything"}]}],
    }
    assert parse_capability_statement(system_level).everything
    encounter_only = {
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "resource": [{"type": "Encounter", "operation": [{"name": "everything"}]}]}],
    }
    assert not parse_capability_statement(encounter_only).everything


def test_dstu2_everything_takes_no_since_or_type() -> None:
    statement = _hapi_like_statement(definition=EVERYTHING_CANONICAL)
    statement["fhirVersion"] = "1.0.2"
    caps = parse_capability_statement(statement)
    assert caps.everything and not caps.everything_since and not caps.everything_type


@pytest.mark.parametrize(
    ("status", "body", "note"),
    [
        (200, {"resourceType": "Bundle", "type": "searchset"}, "not a CapabilityStatement"),
        (404, {"resourceType": "OperationOutcome", "issue": []}, "source_unavailable"),
        (501, {"resourceType": "OperationOutcome", "issue": []}, "source_unavailable"),
        (200, ["not", "a", "resource"], "invalid_resource"),
    ],
)
async def test_non_capability_answers_give_conservative_defaults(status: int, body: Any, note: str) -> None:
    caps = await discover(_stub_source({"metadata": (status, body)}))
    assert not caps.everything and not caps.includes and not caps.declared
    assert caps.note is not None and note in caps.note
    assert caps == search_only().__class__(note=caps.note)


@pytest.mark.parametrize("path", ["", "../admin", "Patient/../x", "https://evil.example/x", "Patient?x=1", "/metadata"])
async def test_get_refuses_paths_that_could_leave_the_base(path: str) -> None:
    source = _stub_source({})
    with pytest.raises(ValueError, match="not a relative FHIR path"):
        await source.get(path, {})
    folder = BundleDirFhirSource(REPO_ROOT / "fixtures" / "fhir", observer=ListObserver())
    with pytest.raises(ValueError, match="not a relative FHIR path"):
        await folder.get(path, {})
