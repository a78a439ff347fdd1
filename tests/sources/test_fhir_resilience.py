"""HttpFhirSource resilience over real HTTP: a fault proxy in front of the live FHIR engine.

Also unit tests of :mod:`agent.sources.fhir_validation` over the fixture bundles. Waits between
attempts go to a recording ``sleep`` so the suite takes seconds while the requested backoff is
still checked.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.domain.events import ListObserver
from agent.errors import InvalidResourceError, SourceUnavailableError
from agent.sources.fhir_http import HttpFhirSource, parse_retry_after
from agent.sources.fhir_validation import flag_invalid, validate_resource
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import REPO_ROOT, FhirServerHandle

FHIR_FIXTURES = sorted((REPO_ROOT / "fixtures" / "fhir").glob("*.json"))


def _bundle_resources(path: Path) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in json.loads(path.read_text())["entry"]]


def _first(resource_type: str) -> dict[str, Any]:
    for path in FHIR_FIXTURES:
        for resource in _bundle_resources(path):
            if resource["resourceType"] == resource_type:
                return resource
    raise AssertionError(f"no {resource_type} in fixtures/fhir")


class RecordingSleep:
    """A ``sleep`` that records the requested delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def proxy(fhir_server: FhirServerHandle) -> Iterator[FaultProxy]:
    with FaultProxy(fhir_server.base_url) as running:
        yield running


@pytest.fixture
def patient_id() -> str:
    return str(_first("Patient")["id"])


def _source(
    proxy: FaultProxy, *, max_retries: int = 3, **kwargs: Any
) -> tuple[HttpFhirSource, ListObserver, RecordingSleep]:
    observer = ListObserver()
    sleep = RecordingSleep()
    kwargs.setdefault("rng", random.Random(1234))
    source = HttpFhirSource(proxy.base_url, observer=observer, max_retries=max_retries, sleep=sleep, **kwargs)
    return source, observer, sleep


# -- retries through the proxy ------------------------------------------------------------------


async def test_429_with_delta_seconds_then_success(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.status_code(429, retry_after="2")])
    source, observer, sleep = _source(proxy)
    async with source:
        patient = await source.read("Patient", patient_id)
    assert patient["id"] == patient_id
    assert sleep.delays == [2.0]
    assert proxy.actions() == ["429", "forward"]
    assert [e.status for e in observer.fhir] == [429, 200]
    assert observer.fhir[0].error == "attempt 1/4: HTTP 429, retrying in 2 s (Retry-After)"
    assert observer.fhir[1].error is None and observer.fhir[1].resource_ids == [f"Patient/{patient_id}"]


async def test_429_with_http_date_then_success(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.retry_after_date(429, datetime.now(UTC) + timedelta(seconds=3))])
    source, observer, sleep = _source(proxy)
    async with source:
        await source.read("Patient", patient_id)
    [delay] = sleep.delays
    # HTTP-dates have whole seconds, so the wait is 2..3 s after a fast round trip.
    assert 1.0 <= delay <= 3.0
    assert proxy.actions() == ["429", "forward"]
    assert observer.fhir[0].error is not None and "(Retry-After)" in observer.fhir[0].error


async def test_503_twice_then_success_backs_off_with_jitter(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Condition\?", [Fault.status_code(503), Fault.status_code(503)])
    source, observer, sleep = _source(proxy, backoff_base_s=0.2)
    async with source:
        conditions = await source.search("Condition", {"patient": patient_id})
    assert conditions and all(c["resourceType"] == "Condition" for c in conditions)
    assert proxy.actions() == ["503", "503", "forward"]
    assert [e.status for e in observer.fhir] == [503, 503, 200]
    first, second = sleep.delays
    # Nominal 0.2 then 0.4 s, each scaled by a jitter factor in [0.5, 1].
    assert 0.1 <= first <= 0.2 and 0.2 <= second <= 0.4
    assert second > first
    assert first not in (0.1, 0.2) and second not in (0.2, 0.4)
    assert observer.fhir[0].error == f"attempt 1/4: HTTP 503, retrying in {first:.3g} s"
    assert observer.fhir[1].error == f"attempt 2/4: HTTP 503, retrying in {second:.3g} s"


async def test_500_beyond_retries_is_source_unavailable_with_attempts(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Observation\?", [Fault.status_code(500)] * 5)
    source, observer, sleep = _source(proxy, backoff_base_s=0.5, backoff_max_s=1.5)
    async with source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.search("Observation", {"patient": patient_id, "_count": "5"})
    message = info.value.message
    assert proxy.base_url in message
    assert "HTTP 500" in message and "4 attempts" in message
    # The path is named, its query values are not.
    assert "GET Observation?patient=...&_count=..." in message and patient_id not in message
    assert info.value.details == {"status": 500, "attempts": 4}
    assert proxy.actions() == ["500"] * 4
    assert len(observer.fhir) == 4
    assert [e.error.split(":")[0] for e in observer.fhir[:3] if e.error] == [f"attempt {n}/4" for n in (1, 2, 3)]
    assert observer.fhir[-1].error == message
    # Nominal 0.5, 1.0, then 2.0 capped at 1.5; jitter keeps each in [nominal/2, nominal].
    for delay, nominal in zip(sleep.delays, [0.5, 1.0, 1.5], strict=True):
        assert nominal / 2 <= delay <= nominal


async def test_timeout_then_success(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.delay(2.0)])
    source, observer, sleep = _source(proxy, timeout_s=0.3)
    started = time.perf_counter()
    async with source:
        patient = await source.read("Patient", patient_id)
    assert time.perf_counter() - started < 2.0
    assert patient["id"] == patient_id
    assert [e.status for e in observer.fhir] == [None, 200]
    assert observer.fhir[0].error is not None and observer.fhir[0].error.startswith("attempt 1/4: timed out")
    assert len(sleep.delays) == 1


async def test_connection_closed_then_success(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.close()])
    source, observer, _ = _source(proxy)
    async with source:
        patient = await source.read("Patient", patient_id)
    assert patient["id"] == patient_id
    assert proxy.actions() == ["close", "forward"]
    assert observer.fhir[0].status is None
    assert observer.fhir[0].error is not None and "connection failed" in observer.fhir[0].error


async def test_invalid_json_is_invalid_resource_without_retry(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Condition\?", [Fault.invalid_json()])
    source, observer, sleep = _source(proxy)
    async with source:
        with pytest.raises(InvalidResourceError, match="not JSON"):
            await source.search("Condition", {"patient": patient_id})
    assert proxy.actions() == ["invalid-json"]
    assert sleep.delays == []
    [event] = observer.fhir
    assert event.status == 200 and event.error is not None


async def test_operation_outcome_400_is_summarised_and_not_retried(proxy: FaultProxy, patient_id: str) -> None:
    diagnostics = "Unknown search parameter 'colour' " + "x" * 500
    proxy.add_rule(r"^Condition\?", [Fault.outcome(400, code="invalid", diagnostics=diagnostics)])
    source, observer, sleep = _source(proxy)
    async with source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.search("Condition", {"patient": patient_id})
    message = info.value.message
    assert "HTTP 400" in message and "error: Unknown search parameter 'colour'" in message
    assert "x" * 400 not in message  # the server's text is truncated
    assert "1 attempt)" in message
    assert info.value.details == {"status": 400}
    assert sleep.delays == [] and proxy.actions() == ["outcome-400"]
    assert [e.error for e in observer.fhir] == [message]


async def test_retry_after_above_the_cap_fails_clearly(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.status_code(503, retry_after="120")])
    source, observer, sleep = _source(proxy, retry_after_max_s=30)
    async with source:
        with pytest.raises(SourceUnavailableError) as info:
            await source.read("Patient", patient_id)
    message = info.value.message
    assert "retry after 120 s" in message and "more than the 30 s limit" in message
    assert "after 1 attempt" in message
    assert info.value.details == {"status": 503, "retry_after_s": 120.0}
    assert sleep.delays == [] and proxy.actions() == ["503"]
    assert [e.error for e in observer.fhir] == [message]


async def test_paging_through_the_proxy_retries_a_later_page(proxy: FaultProxy, patient_id: str) -> None:
    # Only the second page fails: retries happen per request, not per search.
    proxy.add_rule(r"_offset=2", [Fault.status_code(502)])
    source, observer, sleep = _source(proxy)
    async with source:
        observations = await source.search("Observation", {"patient": patient_id, "_count": "2"})
    assert observations
    assert "502" in proxy.actions() and len(sleep.delays) == 1
    assert [e.status for e in observer.fhir][1:3] == [502, 200]
    assert all(e.path.startswith("Observation?") for e in observer.fhir)


async def test_corrupted_resource_reaches_validation_flags(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Condition\?", [Fault.corrupt()])
    source, _, _ = _source(proxy)
    async with source:
        conditions = await source.search("Condition", {"patient": patient_id})
    kept, flags = flag_invalid(conditions)
    assert kept is conditions
    key = f"Condition/{conditions[0]['id']}"
    assert list(flags) == [key]
    assert flags[key][0].startswith("meta:")


async def test_no_retries_makes_one_attempt(proxy: FaultProxy, patient_id: str) -> None:
    proxy.add_rule(r"^Patient/", [Fault.status_code(503)])
    source, observer, sleep = _source(proxy, max_retries=0)
    async with source:
        with pytest.raises(SourceUnavailableError, match=r"HTTP 503 .*1 attempt\)"):
            await source.read("Patient", patient_id)
    assert sleep.delays == [] and len(observer.fhir) == 1


# -- Retry-After parsing and the backoff schedule without a network -------------------------------


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:05 GMT", now=now) == 5.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None


async def test_unparseable_retry_after_falls_back_to_backoff() -> None:
    answers = iter([httpx.Response(503, headers={"Retry-After": "later"}), httpx.Response(200, json=_first("Patient"))])
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: next(answers)))
    sleep = RecordingSleep()
    source = HttpFhirSource(
        "https://fhir.example.org/r4", observer=ListObserver(), client=client, max_retries=2, sleep=sleep
    )
    await source.read("Patient", str(_first("Patient")["id"]))
    await client.aclose()
    [delay] = sleep.delays
    assert 0.1 <= delay <= 0.2


async def test_not_a_fhir_resource_is_invalid() -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=[1, 2])))
    source = HttpFhirSource("https://fhir.example.org/r4", observer=ListObserver(), client=client, max_retries=3)
    with pytest.raises(InvalidResourceError, match="not a FHIR resource"):
        await source.search("Condition", {})
    await client.aclose()


# -- fhir_validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FHIR_FIXTURES, ids=lambda p: p.name)
def test_fixture_resources_are_valid(path: Path) -> None:
    resources = _bundle_resources(path)
    assert resources
    for resource in resources:
        assert validate_resource(resource) == [], f"{resource['resourceType']}/{resource['id']}"
    kept, flags = flag_invalid(resources)
    assert kept is resources and flags == {}


def test_wrong_type_in_a_field_is_a_readable_problem() -> None:
    patient = json.loads(json.dumps(_first("Patient")))
    patient["birthDate"] = "last tuesday"
    patient["name"] = [{"family": "Doe", "given": "John"}]
    before = json.dumps(patient, sort_keys=True)
    problems = validate_resource(patient)
    assert any(p.startswith("birthDate: ") for p in problems)
    assert any(p.startswith("name[0].given: ") and "list" in p for p in problems)
    assert not any("last tuesday" in p for p in problems)  # values (possible PHI) stay out
    assert json.dumps(patient, sort_keys=True) == before  # validation does not alter the resource


def test_unknown_and_missing_resource_types() -> None:
    assert validate_resource({"resourceType": "Spaceship", "id": "s1"}) == [
        "unknown resourceType 'Spaceship' (not a FHIR R4 resource)"
    ]
    # A data type is not a resource.
    assert validate_resource({"resourceType": "HumanName"})[0].startswith("unknown resourceType")
    assert validate_resource({"id": "x"}) == ["resourceType is missing"]


def test_flag_invalid_keys_by_type_and_id_and_keeps_everything() -> None:
    good = _first("Condition")
    bad = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}, "valueQuantity": 5}
    nameless = {"resourceType": "Nope"}
    resources = [good, bad, nameless]
    kept, flags = flag_invalid(resources)
    assert kept is resources and kept == [good, bad, nameless]
    assert set(flags) == {"Observation/o1", "Nope/#2"}
    assert flags["Observation/o1"][0].startswith("valueQuantity: ")


def test_validation_is_fast_enough_for_thousands() -> None:
    resources = [r for path in FHIR_FIXTURES for r in _bundle_resources(path)]
    batch = (resources * (2000 // len(resources) + 1))[:2000]
    started = time.perf_counter()
    _, flags = flag_invalid(batch)
    elapsed = time.perf_counter() - started
    assert flags == {}
    # About 0.3 ms each on the 2-core dev machine; the bound leaves room for a slow CI runner.
    assert elapsed < 10.0
