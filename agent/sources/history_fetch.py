"""Fetch a patient's history: one $everything stream or bounded per-type searches, then key references.

Where it sits: the graph's "fetch history" step calls :func:`fetch_history` with the record types
the plan chose and the server's :class:`~agent.sources.capabilities.ServerCapabilities`; what it
returns feeds the context builder. Every request goes through the run's
:class:`~agent.sources.protocols.FhirSource`, so each one (page, retry, failure) is in the trace.

Strategy: ``Patient/<id>/$everything`` when the server declares it (with ``_type``, ``_since`` and
``_count`` when it takes them), else one ``Type?patient=<id>`` search per type, at most
``concurrency`` at a time so a large plan does not hammer a hospital server. A type whose request
fails lands in ``missing`` and the rest is still used. Then the references a clinician reads
through (the medication of an order, the encounter, who ordered or performed it, panel members,
report results, imaging endpoints) are resolved with batched ``_id=a,b,c`` searches per type,
for a bounded number of rounds; what cannot be resolved is listed, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from agent.errors import InvalidResourceError, MedagentError, SourceUnavailableError
from agent.sources.capabilities import ServerCapabilities
from agent.sources.protocols import FhirSource

logger = logging.getLogger(__name__)

MEDICATION_INCLUDE = "MedicationRequest:medication"
EVERYTHING_PAGE_SIZE = 100

# A relative literal reference, optionally version-specific (``Type/id/_history/v``).
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_PRACTITIONER_FIELDS = ("requester", "performer", "recorder", "asserter")

T = TypeVar("T")
Resource = dict[str, Any]


@dataclass
class HistoryFetch:
    """What :func:`fetch_history` read.

    Attributes:
        resources: the history and the resources it references, one per ``Type/id`` (the highest
            ``meta.versionId`` when a resource came more than once), in first-seen order.
            Practitioners are reduced to ``resourceType``, ``id`` and ``name``.
        missing: record type -> error code, for types whose request failed after retries.
        errors: record type -> the error itself, so a caller can raise it when every type failed.
        unresolved: ``Type/id`` (or the raw reference) of referenced resources that could not
            be resolved.
        requests: source calls made (each may span pages and retries; the trace has every one).
        strategy: ``"everything"`` or ``"per-type"``.
        fallback: why $everything was declared but not used, when that happened.
    """

    resources: list[Resource] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    errors: dict[str, MedagentError] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    requests: int = 0
    strategy: Literal["everything", "per-type"] = "per-type"
    fallback: str | None = None


class _Collected:
    """Resources by ``Type/id``, first-seen order, keeping the highest version of each."""

    def __init__(self) -> None:
        self.by_key: dict[str, Resource] = {}

    def add(self, resource: Resource) -> None:
        key = _key(resource)
        if key is None:
            return
        current = self.by_key.get(key)
        if current is None or _version_rank(resource) > _version_rank(current):
            # Replacing the value keeps the key's original position.
            self.by_key[key] = resource

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def values(self) -> list[Resource]:
        return list(self.by_key.values())


async def fetch_history(
    fhir: FhirSource,
    patient_id: str,
    *,
    types: tuple[str, ...] | list[str],
    capabilities: ServerCapabilities,
    concurrency: int = 4,
    since: str | None = None,
    max_reference_rounds: int = 3,
    max_references: int = 500,
    id_batch_size: int = 50,
) -> HistoryFetch:
    """Fetch the patient's resources of ``types`` and the resources they reference.

    Args:
        fhir: the run's FHIR source.
        patient_id: the Patient's logical id.
        types: the record types to fetch (e.g. the graph's eight history types).
        capabilities: what :func:`agent.sources.capabilities.discover` found.
        concurrency: most requests in flight at once.
        since: a FHIR instant; only resources changed at or after it are wanted (``_since`` on
            $everything, ``_lastUpdated=ge`` on searches where allowed, and filtered here too).
        max_reference_rounds: how many hops of references to follow (members of members...).
        max_references: most referenced resources requested in all; the rest are unresolved.
        id_batch_size: most ids in one ``_id=`` search.

    Returns:
        The resources, the types that failed, the unresolved references and the request count.
        A failure of every type is not raised here: ``missing`` then names them all, and the
        caller decides (the graph raises when nothing at all could be read).

    Raises:
        ValueError: ``concurrency`` or ``id_batch_size`` is below 1.
    """
    if concurrency < 1 or id_batch_size < 1:
        raise ValueError("concurrency and id_batch_size must be at least 1")
    gate = asyncio.Semaphore(concurrency)
    result = HistoryFetch()
    pool = _Collected()  # everything received, wanted or not (an $everything answer has more)
    wanted = list(dict.fromkeys(types))

    async def call(make: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            result.requests += 1
            return await make()

    primary: list[Resource] | None = None
    if capabilities.everything:
        try:
            primary = await _everything(fhir, patient_id, wanted, capabilities, since, call, pool)
            result.strategy = "everything"
        except (SourceUnavailableError, InvalidResourceError) as exc:
            # Declared but refused (often a permission the token lacks): searches may still work.
            result.fallback = f"$everything failed ({exc.code}); used per-type searches"
            logger.info("FHIR $everything failed (%s); falling back to per-type searches", exc.code)
    if primary is None:
        primary = await _per_type(fhir, patient_id, wanted, capabilities, since, call, pool, result.errors)
        result.missing = {t: error.code for t, error in result.errors.items()}

    collected = _Collected()
    for resource in primary:
        collected.add(resource)
    await _follow_references(
        fhir,
        collected,
        pool,
        call,
        result,
        rounds=max_reference_rounds,
        budget=max_references,
        batch_size=id_batch_size,
    )
    result.resources = [_display_only(r) if r.get("resourceType") == "Practitioner" else r for r in collected.values()]
    return result


# -- strategies ------------------------------------------------------------------------------------


async def _everything(
    fhir: FhirSource,
    patient_id: str,
    types: list[str],
    capabilities: ServerCapabilities,
    since: str | None,
    call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    pool: _Collected,
) -> list[Resource]:
    params: dict[str, str] = {}
    if capabilities.everything_type:
        params["_type"] = ",".join(types)
    if since and capabilities.everything_since:
        params["_since"] = since
    if "_count" in capabilities.everything_params:
        params["_count"] = str(EVERYTHING_PAGE_SIZE)
    path = f"Patient/{quote(patient_id, safe='')}/$everything"
    pages: list[Resource] = await call(lambda: fhir.get_all_pages(path, params))
    received = [r for page in pages for r in _bundle_resources(page)]
    for resource in received:
        pool.add(resource)
    # Without _type the server sends every type; those not asked for still serve as reference targets.
    wanted = set(types)
    return [r for r in received if r.get("resourceType") in wanted and _changed_since(r, since)]


async def _per_type(
    fhir: FhirSource,
    patient_id: str,
    types: list[str],
    capabilities: ServerCapabilities,
    since: str | None,
    call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    pool: _Collected,
    errors: dict[str, MedagentError],
) -> list[Resource]:
    async def one(resource_type: str) -> list[Resource]:
        params = {"patient": patient_id}
        # An undeclared _lastUpdated is only skipped when the server lists its parameters; the
        # filter below keeps the answer right either way.
        if since and capabilities.supports_search_param(resource_type, "_lastUpdated") is not False:
            params["_lastUpdated"] = f"ge{since}"
        if resource_type == "MedicationRequest" and capabilities.supports_include(resource_type, MEDICATION_INCLUDE):
            params["_include"] = MEDICATION_INCLUDE
            # search() keeps matches only; the included Medications are wanted here too.
            pages: list[Resource] = await call(lambda: fhir.get_all_pages(resource_type, params))
            matches: list[Resource] = []
            for page in pages:
                for entry in _entries(page):
                    resource = entry["resource"]
                    pool.add(resource)
                    if _entry_mode(entry) == "match" or (
                        _entry_mode(entry) is None and resource.get("resourceType") == resource_type
                    ):
                        matches.append(resource)
            return matches
        found: list[Resource] = await call(lambda: fhir.search(resource_type, params))
        return found

    outcomes = await asyncio.gather(*(one(t) for t in types), return_exceptions=True)
    primary: list[Resource] = []
    for resource_type, outcome in zip(types, outcomes, strict=True):
        if isinstance(outcome, SourceUnavailableError | InvalidResourceError):
            errors[resource_type] = outcome  # the failed request and its retries are in the trace
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            for resource in outcome:
                pool.add(resource)
            primary.extend(r for r in outcome if _changed_since(r, since))
    return primary


# -- references ------------------------------------------------------------------------------------


def references_that_matter(resource: Resource) -> Iterator[tuple[str, str]]:
    """Yield ``(target type, reference)`` for the references of a resource worth resolving.

    MedicationRequest.medicationReference -> Medication; any ``encounter`` (and
    DocumentReference.context.encounter) -> Encounter; requester / performer / recorder /
    asserter pointing at a Practitioner; Observation.hasMember and DiagnosticReport.result ->
    Observation; ImagingStudy (and series) endpoints -> Endpoint.
    """
    rtype = resource.get("resourceType")
    if rtype == "MedicationRequest":
        yield from _refs(resource.get("medicationReference"), "Medication")
    yield from _refs(resource.get("encounter"), "Encounter")
    context = resource.get("context")
    if isinstance(context, dict):
        yield from _refs(context.get("encounter"), "Encounter")
    for name in _PRACTITIONER_FIELDS:
        for value in _listed(resource.get(name)):
            # Procedure-style performers wrap the reference in ``actor``.
            target = value.get("actor", value) if isinstance(value, dict) else value
            for kind, ref in _refs(target, "Practitioner"):
                if ref.startswith("Practitioner/"):
                    yield kind, ref
    if rtype == "Observation":
        yield from _refs(resource.get("hasMember"), "Observation")
    if rtype == "DiagnosticReport":
        yield from _refs(resource.get("result"), "Observation")
    if rtype == "ImagingStudy":
        yield from _refs(resource.get("endpoint"), "Endpoint")
        for series in _listed(resource.get("series")):
            if isinstance(series, dict):
                yield from _refs(series.get("endpoint"), "Endpoint")


async def _follow_references(
    fhir: FhirSource,
    collected: _Collected,
    pool: _Collected,
    call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    result: HistoryFetch,
    *,
    rounds: int,
    budget: int,
    batch_size: int,
) -> None:
    unresolved: dict[str, None] = {}
    tried: set[str] = set()
    frontier = collected.values()
    for _ in range(rounds):
        before = set(collected.by_key)
        wanted: dict[str, list[str]] = {}
        for resource in frontier:
            for target_type, reference in references_that_matter(resource):
                match = _REFERENCE.match(reference)
                if match is None or match.group(1) != target_type:
                    # Contained ("#x"), absolute or mistyped references are not fetched here.
                    if not reference.startswith("#"):
                        unresolved.setdefault(reference, None)
                    continue
                key = f"{match.group(1)}/{match.group(2)}"
                if key in collected or key in tried:
                    continue
                tried.add(key)
                if key in pool:
                    # Already received (an $everything answer or an _include): no request needed.
                    collected.add(pool.by_key[key])
                    continue
                if budget <= 0:
                    unresolved.setdefault(key, None)
                    continue
                budget -= 1
                wanted.setdefault(target_type, []).append(match.group(2))
        batches = [
            (target_type, ids[start : start + batch_size])
            for target_type, ids in wanted.items()
            for start in range(0, len(ids), batch_size)
        ]
        outcomes = await asyncio.gather(
            *(_resolve_batch(fhir, t, ids, call) for t, ids in batches), return_exceptions=True
        )
        for (target_type, ids), outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, SourceUnavailableError | InvalidResourceError):
                unresolved.update((f"{target_type}/{i}", None) for i in ids)
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            got = {r.get("id") for r in outcome}
            for resource in outcome:
                collected.add(resource)
            unresolved.update((f"{target_type}/{i}", None) for i in ids if i not in got)
        frontier = [r for k, r in collected.by_key.items() if k not in before]
        if not frontier:
            break
    result.unresolved = list(unresolved)


async def _resolve_batch(
    fhir: FhirSource,
    resource_type: str,
    ids: list[str],
    call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
) -> list[Resource]:
    found: list[Resource] = await call(lambda: fhir.search(resource_type, {"_id": ",".join(ids)}))
    return [r for r in found if r.get("resourceType") == resource_type]


# -- small helpers ---------------------------------------------------------------------------------


def _key(resource: Resource) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) else None


def _version_rank(resource: Resource) -> tuple[int, str]:
    """Return a sort key: numeric ``versionId`` first (HAPI counts 1, 2...), then ``lastUpdated``.

    Servers with opaque version ids (Medplum uses UUIDs) are ranked by ``lastUpdated`` alone.
    """
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return (-1, "")
    version = str(meta.get("versionId", ""))
    updated = meta.get("lastUpdated")
    return (int(version) if version.isdigit() else -1, updated if isinstance(updated, str) else "")


def _changed_since(resource: Resource, since: str | None) -> bool:
    if not since:
        return True
    meta = resource.get("meta")
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    # Undated resources are kept: dropping them could hide a change.
    return not isinstance(updated, str) or updated >= since


def _display_only(practitioner: Resource) -> Resource:
    """Keep what a citation needs of a Practitioner: who it is, not their contact details."""
    kept: Resource = {"resourceType": "Practitioner", "id": practitioner.get("id")}
    if "name" in practitioner:
        kept["name"] = practitioner["name"]
    return kept


def _entries(bundle: Resource) -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def _entry_mode(entry: dict[str, Any]) -> str | None:
    search = entry.get("search")
    mode = search.get("mode") if isinstance(search, dict) else None
    return mode if isinstance(mode, str) else None


def _bundle_resources(bundle: Resource) -> list[Resource]:
    """Return a page's resources, leaving out OperationOutcomes (warnings, not history)."""
    return [
        e["resource"]
        for e in _entries(bundle)
        if _entry_mode(e) != "outcome" and e["resource"].get("resourceType") != "OperationOutcome"
    ]


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _refs(value: Any, target_type: str) -> Iterator[tuple[str, str]]:
    for item in _listed(value):
        if isinstance(item, dict) and isinstance(item.get("reference"), str):
            yield target_type, item["reference"]
