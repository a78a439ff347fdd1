"""History fetching over real HTTP (live FHIR engine, fault proxy), the bundle folder and a stub $everything server.

Also the attachment readers of :mod:`agent.history.fhir_values` (inline HTML, markers, Binary
fetched through the source), since fetching an attachment's text is part of reading the history.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agent.domain.events import ListObserver
from agent.errors import SourceUnavailableError
from agent.graph.state import HISTORY_TYPES
from agent.history.fhir_values import attachment_text, fetch_attachment_text, html_to_text
from agent.sources.capabilities import ServerCapabilities, discover, parse_capability_statement
from agent.sources.fhir_bundle_dir import BundleDirFhirSource
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.history_fetch import fetch_history, references_that_matter
from agent.sources.protocols import FhirSource
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import REPO_ROOT, FhirServerHandle

T = TypeVar("T")

FIXTURES_FHIR = REPO_ROOT / "fixtures" / "fhir"
CXR_PATIENT = next(
    p["patient_id"]
    for p in json.loads((REPO_ROOT / "fixtures" / "manifest.json").read_text())["patients"]
    if p["key"] == "cxr"
)


def _keys(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


async def _graph_searches(fhir: FhirSource, patient_id: str) -> set[str]:
    """Return what the graph's eight parallel ``Type?patient=<id>`` searches find today."""
    results = await asyncio.gather(*(fhir.search(t, {"patient": patient_id}) for t in HISTORY_TYPES))
    return {key for found in results for key in _keys(found)}


class InFlightCounter:
    """Wrap a FhirSource and record the most calls in flight at once (each held a moment)."""

    def __init__(self, inner: FhirSource) -> None:
        self.inner = inner
        self.in_flight = 0
        self.peak = 0
        self.calls = 0

    async def _track(self, make: Callable[[], Awaitable[T]]) -> T:
        self.in_flight += 1
        self.calls += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            # Holding each call open lets every permitted call start before any finishes.
            await asyncio.sleep(0.02)
            return await make()
        finally:
            self.in_flight -= 1

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return await self._track(lambda: self.inner.read(resource_type, resource_id))

    async def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return await self._track(lambda: self.inner.search(resource_type, params))

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        return await self._track(lambda: self.inner.get(path, params))

    async def get_all_pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return await self._track(lambda: self.inner.get_all_pages(path, params))

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- per-type strategy on the live engine and the folder -----------------------------------------


async def test_per_type_matches_the_graphs_searches_on_the_live_server(fhir_server: FhirServerHandle) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        expected = await _graph_searches(source, CXR_PATIENT)
        caps = await discover(source)
        fetched = await fetch_history(source, CXR_PATIENT, types=HISTORY_TYPES, capabilities=caps)
    assert fetched.strategy == "per-type" and fetched.fallback is None
    assert fetched.missing == {} and fetched.unresolved == []
    assert expected and _keys(fetched.resources) == expected
    assert len(fetched.resources) == len(expected)  # no duplicates
    # The fixtures' references (encounters) all point at resources already fetched: no extra requests.
    assert fetched.requests == len(HISTORY_TYPES)


async def test_per_type_on_the_bundle_folder_matches_the_live_server(fhir_server: FhirServerHandle) -> None:
    folder = BundleDirFhirSource(FIXTURES_FHIR, observer=ListObserver())
    from_folder = await fetch_history(folder, CXR_PATIENT, types=HISTORY_TYPES, capabilities=await discover(folder))
    async with HttpFhirSource(fhir_server.base_url, observer=ListObserver()) as source:
        over_http = await fetch_history(source, CXR_PATIENT, types=HISTORY_TYPES, capabilities=await discover(source))
    assert from_folder.strategy == "per-type" and from_folder.missing == {}
    assert _keys(from_folder.resources) == _keys(over_http.resources)


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_per_type_respects_the_concurrency_bound(fhir_server: FhirServerHandle, concurrency: int) -> None:
    async with HttpFhirSource(fhir_server.base_url, observer=ListObserver()) as source:
        counted = InFlightCounter(source)
        fetched = await fetch_history(
            counted, CXR_PATIENT, types=HISTORY_TYPES, capabilities=ServerCapabilities(), concurrency=concurrency
        )
    assert counted.calls == len(HISTORY_TYPES) == fetched.requests
    assert counted.peak == concurrency


async def test_a_type_failing_beyond_retries_lands_in_missing(fhir_server: FhirServerHandle) -> None:
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^Condition\?", [Fault.status_code(503)])
        observer = ListObserver()
        async with HttpFhirSource(proxy.base_url, observer=observer, max_retries=0) as source:
            fetched = await fetch_history(source, CXR_PATIENT, types=HISTORY_TYPES, capabilities=ServerCapabilities())
        assert "503" in proxy.actions()
    assert fetched.missing == {"Condition": "source_unavailable"}
    assert isinstance(fetched.errors["Condition"], SourceUnavailableError)
    types = {r["resourceType"] for r in fetched.resources}
    assert "Condition" not in types
    assert {"Observation", "MedicationRequest", "Encounter", "ImagingStudy"} <= types
    assert any(e.path.startswith("Condition?") and e.status == 503 for e in observer.fhir)


# -- reference following on the live engine ----------------------------------------------------------


def _linked_bundle() -> tuple[dict[str, Any], dict[str, str]]:
    """Return a transaction (PUT entries, fresh uuids) whose references need following, and its ids."""
    ids = {
        name: str(uuid.uuid4())
        for name in ("patient", "med", "medreq", "prac", "report", "result", "panel", "member", "leaf", "missing_med")
    }
    patient_ref = {"reference": f"Patient/{ids['patient']}"}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": ids["patient"], "name": [{"family": "Linkwell", "given": ["Rita"]}]},
        {"resourceType": "Medication", "id": ids["med"], "code": {"text": "Furosemide 40 mg tablet"}},
        {
            "resourceType": "Practitioner",
            "id": ids["prac"],
            "name": [{"family": "Okafor", "prefix": ["Dr"]}],
            "telecom": [{"system": "phone", "value": "555-0100"}],
        },
        {
            "resourceType": "MedicationRequest",
            "id": ids["medreq"],
            "status": "active",
            "intent": "order",
            "subject": patient_ref,
            "medicationReference": {"reference": f"Medication/{ids['med']}"},
            "requester": {"reference": f"Practitioner/{ids['prac']}"},
        },
        {
            "resourceType": "MedicationRequest",
            "id": str(uuid.uuid4()),
            "status": "active",
            "intent": "order",
            "subject": patient_ref,
            "medicationReference": {"reference": f"Medication/{ids['missing_med']}"},
        },
        # Result and members carry no subject, so only following the references finds them.
        {"resourceType": "Observation", "id": ids["result"], "status": "final", "code": {"text": "BNP"}},
        {
            "resourceType": "DiagnosticReport",
            "id": ids["report"],
            "status": "final",
            "code": {"text": "Cardiac panel"},
            "subject": patient_ref,
            "result": [{"reference": f"Observation/{ids['result']}"}],
            "performer": [{"reference": f"Practitioner/{ids['prac']}"}],
        },
        {
            "resourceType": "Observation",
            "id": ids["panel"],
            "status": "final",
            "code": {"text": "Lipid panel"},
            "subject": patient_ref,
            "hasMember": [{"reference": f"Observation/{ids['member']}"}],
        },
        {
            "resourceType": "Observation",
            "id": ids["member"],
            "status": "final",
            "code": {"text": "Cholesterol sub-panel"},
            "hasMember": [{"reference": f"Observation/{ids['leaf']}"}, {"reference": f"Observation/{ids['panel']}"}],
        },
        {"resourceType": "Observation", "id": ids["leaf"], "status": "final", "code": {"text": "LDL"}},
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }
    return bundle, ids


async def test_references_are_followed_in_batched_id_searches(fhir_server: FhirServerHandle) -> None:
    bundle, ids = _linked_bundle()
    async with httpx.AsyncClient() as client:
        loaded = await client.post(fhir_server.base_url, json=bundle, headers={"Content-Type": "application/fhir+json"})
    assert loaded.status_code == 200, loaded.text
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        fetched = await fetch_history(
            source,
            ids["patient"],
            types=("MedicationRequest", "DiagnosticReport", "Observation"),
            capabilities=ServerCapabilities(),
        )
    keys = _keys(fetched.resources)
    assert {
        f"Medication/{ids['med']}",
        f"Practitioner/{ids['prac']}",
        f"Observation/{ids['result']}",
        f"Observation/{ids['member']}",
        f"Observation/{ids['leaf']}",  # second hop: a member of a member
    } <= keys
    assert fetched.unresolved == [f"Medication/{ids['missing_med']}"]
    practitioner = next(r for r in fetched.resources if r["resourceType"] == "Practitioner")
    assert practitioner == {
        "resourceType": "Practitioner",
        "id": ids["prac"],
        "name": [{"family": "Okafor", "prefix": ["Dr"]}],
    }
    id_searches = [e.path for e in observer.fhir if "_id=" in e.path]
    # One request per type and hop: both Medications in one search, requester and performer once.
    assert sorted(p.split("?")[0] for p in id_searches) == ["Medication", "Observation", "Observation", "Practitioner"]
    medication_query = parse_qs(urlsplit(next(p for p in id_searches if p.startswith("Medication"))).query)
    assert set(medication_query["_id"][0].split(",")) == {ids["med"], ids["missing_med"]}
    assert fetched.requests == 3 + len(id_searches)


def test_references_that_matter_reads_each_kind() -> None:
    procedure_style = {"resourceType": "Procedure", "performer": [{"actor": {"reference": "Practitioner/p1"}}]}
    assert list(references_that_matter(procedure_style)) == [("Practitioner", "Practitioner/p1")]
    study = {
        "resourceType": "ImagingStudy",
        "endpoint": [{"reference": "Endpoint/e1"}],
        "series": [{"endpoint": [{"reference": "Endpoint/e2"}]}],
        "encounter": {"reference": "Encounter/x"},
    }
    assert sorted(references_that_matter(study)) == [
        ("Encounter", "Encounter/x"),
        ("Endpoint", "Endpoint/e1"),
        ("Endpoint", "Endpoint/e2"),
    ]
    # An organisation as requester is not a Practitioner to resolve.
    request = {"resourceType": "MedicationRequest", "requester": {"reference": "Organization/o1"}}
    assert list(references_that_matter(request)) == []
    document = {"resourceType": "DocumentReference", "context": {"encounter": [{"reference": "Encounter/e9"}]}}
    assert list(references_that_matter(document)) == [("Encounter", "Encounter/e9")]


# -- $everything against a stub server ------------------------------------------------------------


EVERYTHING_STATEMENT = {
    "resourceType": "CapabilityStatement",
    "fhirVersion": "4.0.1",
    "rest": [
        {
            "mode": "server",
            "resource": [
                {
                    "type": "Patient",
                    "operation": [
                        {
                            "name": "everything",
                            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                        }
                    ],
                }
            ],
        }
    ],
}
STUB_BASE = "https://fhir.example.org/r4"


def _entry(resource: dict[str, Any], mode: str = "match") -> dict[str, Any]:
    return {
        "fullUrl": f"{STUB_BASE}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


def _stub(everything_status: int = 200) -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    page1 = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": f"{STUB_BASE}/Patient/p1/$everything?page=2"}],
        "entry": [
            _entry({"resourceType": "Patient", "id": "p1"}),
            _entry({"resourceType": "Condition", "id": "c1", "meta": {"versionId": "1"}, "code": {"text": "old"}}),
            _entry(
                {
                    "resourceType": "MedicationRequest",
                    "id": "mr1",
                    "medicationReference": {"reference": "Medication/m1"},
                    "requester": {"reference": "Practitioner/dr1"},
                }
            ),
        ],
    }
    page2 = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            _entry({"resourceType": "Condition", "id": "c1", "meta": {"versionId": "2"}, "code": {"text": "new"}}),
            _entry({"resourceType": "Medication", "id": "m1", "code": {"text": "Metoprolol"}}),
            _entry({"resourceType": "OperationOutcome", "id": "oo", "issue": []}, mode="outcome"),
        ],
    }
    practitioners = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            _entry({"resourceType": "Practitioner", "id": "dr1", "name": [{"text": "Dr Who"}], "gender": "other"})
        ],
    }
    searchset = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [_entry({"resourceType": "Condition", "id": "c9"})],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path.removeprefix("/r4/")
        if path == "metadata":
            body: Any = EVERYTHING_STATEMENT
        elif path == "Patient/p1/$everything":
            if everything_status != 200:
                return httpx.Response(everything_status, json={"resourceType": "OperationOutcome", "issue": []})
            body = page2 if request.url.params.get("page") == "2" else page1
        elif path == "Practitioner":
            body = practitioners
        elif path in ("Condition", "MedicationRequest"):
            body = searchset if path == "Condition" else {"resourceType": "Bundle", "type": "searchset"}
        else:
            return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


async def test_everything_is_used_when_declared_and_paged() -> None:
    client, seen = _stub()
    observer = ListObserver()
    source = HttpFhirSource(STUB_BASE, observer=observer, client=client)
    caps = await discover(source)
    fetched = await fetch_history(
        source, "p1", types=("Condition", "MedicationRequest"), capabilities=caps, since="2026-01-01T00:00:00Z"
    )
    await client.aclose()
    assert fetched.strategy == "everything" and fetched.missing == {}
    first = next(r for r in seen if r.url.path.endswith("$everything"))
    assert dict(first.url.params) == {
        "_type": "Condition,MedicationRequest",
        "_since": "2026-01-01T00:00:00Z",
        "_count": "100",
    }
    assert [r.url.params.get("page") for r in seen if r.url.path.endswith("$everything")] == [None, "2"]
    by_key = {f"{r['resourceType']}/{r['id']}": r for r in fetched.resources}
    # The Patient and the outcome are not history; the Medication came in the stream, unrequested.
    assert list(by_key) == ["Condition/c1", "MedicationRequest/mr1", "Medication/m1", "Practitioner/dr1"]
    assert by_key["Condition/c1"]["meta"]["versionId"] == "2"
    assert by_key["Practitioner/dr1"] == {"resourceType": "Practitioner", "id": "dr1", "name": [{"text": "Dr Who"}]}
    # $everything (one call, two pages) plus one batched Practitioner search.
    assert fetched.requests == 2 and fetched.unresolved == []
    assert [e.path.split("?")[0] for e in observer.fhir] == [
        "metadata",
        "Patient/p1/$everything",
        "Patient/p1/$everything",
        "Practitioner",
    ]


async def test_everything_refused_falls_back_to_per_type_searches() -> None:
    client, _ = _stub(everything_status=403)
    source = HttpFhirSource(STUB_BASE, observer=ListObserver(), client=client)
    caps = parse_capability_statement(EVERYTHING_STATEMENT)
    fetched = await fetch_history(source, "p1", types=("Condition", "MedicationRequest"), capabilities=caps)
    await client.aclose()
    assert fetched.strategy == "per-type"
    assert fetched.fallback is not None and "source_unavailable" in fetched.fallback
    assert _keys(fetched.resources) == {"Condition/c9"}


async def test_bundle_folder_everything_returns_the_patients_resources() -> None:
    folder = BundleDirFhirSource(FIXTURES_FHIR, observer=ListObserver())
    pages = await folder.get_all_pages(f"Patient/{CXR_PATIENT}/$everything", {"_type": "Condition,Encounter"})
    assert len(pages) == 1 and pages[0]["type"] == "searchset"
    types = {e["resource"]["resourceType"] for e in pages[0]["entry"]}
    assert types == {"Condition", "Encounter"}
    everything = await folder.get(f"Patient/{CXR_PATIENT}/$everything", {})
    searched = await _graph_searches(folder, CXR_PATIENT)
    assert searched | {f"Patient/{CXR_PATIENT}"} == {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything["entry"]
    }


# -- attachments -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HTML_NOTE = (
    b"<html><head><title>t</title><style>p {color: red}</style><script>alert('x')</script></head>"
    b"<body><h1>Discharge</h1><p>BNP &gt; 400 &amp; rising</p><p>Plan:&nbsp;diuresis</p></body></html>"
)


def test_html_attachment_becomes_readable_text() -> None:
    text = attachment_text({"contentType": "text/html; charset=utf-8", "data": _b64(HTML_NOTE)}, 500)
    assert text == "Discharge BNP > 400 & rising Plan: diuresis"
    assert html_to_text("<p>a</p><p>b</p><br/>c &amp;amp; d") == "a b c & d"


def test_other_content_types_get_a_not_extracted_marker() -> None:
    pdf = {"contentType": "application/pdf", "data": _b64(b"%PDF" + b"0" * 125_000)}
    assert attachment_text(pdf, 500) == "[not extracted: application/pdf, 123 KB]"
    assert (
        attachment_text({"contentType": "image/png", "data": _b64(b"x" * 10)}, 500)
        == "[not extracted: image/png, 10 B]"
    )


def test_plain_text_attachment_is_unchanged() -> None:
    plain = {"contentType": "text/plain", "data": _b64(b"Stable.\n\n  Follow up   in 2 weeks.")}
    assert attachment_text(plain, 500) == "Stable. Follow up in 2 weeks."
    assert attachment_text(plain, 7) == "Stable.…"
    assert attachment_text({"url": "Binary/x"}, 500) is None
    assert attachment_text({"contentType": "text/plain", "data": "not base64!"}, 500) is None


async def test_url_attachment_is_fetched_as_binary_from_the_live_server(fhir_server: FhirServerHandle) -> None:
    binary_id = str(uuid.uuid4())
    binary = {"resourceType": "Binary", "id": binary_id, "contentType": "text/html", "data": _b64(HTML_NOTE)}
    async with httpx.AsyncClient() as client:
        put = await client.put(
            f"{fhir_server.base_url}/Binary/{binary_id}", json=binary, headers={"Content-Type": "application/fhir+json"}
        )
    assert put.status_code in (200, 201), put.text
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        relative = await fetch_attachment_text(
            source, {"contentType": "text/html", "url": f"Binary/{binary_id}"}, 100_000
        )
        absolute = await fetch_attachment_text(
            source, {"contentType": "text/html", "url": f"{fhir_server.base_url}/Binary/{binary_id}"}, 100_000
        )
        too_big = await fetch_attachment_text(source, {"url": f"Binary/{binary_id}"}, 10)
        elsewhere = await fetch_attachment_text(
            source, {"contentType": "application/pdf", "url": "https://other.example.org/Binary/1"}, 100_000
        )
        declared_big = await fetch_attachment_text(
            source, {"contentType": "application/pdf", "url": f"Binary/{binary_id}", "size": 5_000_000}, 100_000
        )
        absent = await fetch_attachment_text(
            source, {"contentType": "text/plain", "url": f"Binary/{uuid.uuid4()}"}, 1000
        )
    assert relative == absolute == "Discharge BNP > 400 & rising Plan: diuresis"
    assert too_big is not None and too_big.startswith("[not extracted: text/html") and "limit" in too_big
    assert elsewhere == "[not fetched: application/pdf at another host]"
    assert declared_big is not None and declared_big.startswith("[not fetched: application/pdf, 4.8 MB")
    assert absent is not None and absent.startswith("[not fetched: text/plain") and "source_unavailable" in absent
    # Other hosts and over-size declarations are refused before any request.
    assert [e.path for e in observer.fhir].count(f"Binary/{binary_id}") == 3
    assert not any("other.example.org" in e.path for e in observer.fhir)


async def test_since_filters_per_type_searches_on_the_live_server(fhir_server: FhirServerHandle) -> None:
    observer = ListObserver()
    async with HttpFhirSource(fhir_server.base_url, observer=observer) as source:
        fetched = await fetch_history(
            source, CXR_PATIENT, types=("Condition",), capabilities=ServerCapabilities(), since="2100-01-01T00:00:00Z"
        )
    assert fetched.resources == [] and fetched.missing == {}
    assert parse_qs(urlsplit(observer.fhir[0].path).query)["_lastUpdated"] == ["ge2100-01-01T00:00:00Z"]


async def test_declared_medication_include_brings_medications_without_extra_requests() -> None:
    statement = {
        "resourceType": "CapabilityStatement",
        "rest": [{"resource": [{"type": "MedicationRequest", "searchInclude": ["MedicationRequest:medication"]}]}],
    }
    order = {"resourceType": "MedicationRequest", "id": "mr1", "medicationReference": {"reference": "Medication/m1"}}
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [_entry(order), _entry({"resourceType": "Medication", "id": "m1"}, mode="include")],
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=page)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        source = HttpFhirSource(STUB_BASE, observer=ListObserver(), client=client)
        caps = parse_capability_statement(statement)
        fetched = await fetch_history(source, "p1", types=("MedicationRequest",), capabilities=caps)
    assert [dict(r.url.params) for r in seen] == [{"patient": "p1", "_include": "MedicationRequest:medication"}]
    assert _keys(fetched.resources) == {"MedicationRequest/mr1", "Medication/m1"}
    assert fetched.requests == 1 and fetched.unresolved == []
