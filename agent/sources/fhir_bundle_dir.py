"""FHIR from a folder of JSON files: the embedded, no-set-up :class:`~agent.sources.protocols.FhirSource`.

Where it sits: :func:`agent.sources.factory.make_fhir_source` builds this source when no FHIR
server URL is configured; the graph's history step then reads ``fixtures/fhir`` (or any folder of
exported bundles) exactly as it would read a server. Each read or search is reported to the run's
observer as a :class:`~agent.domain.events.FhirRequestEvent` with ``backend="bundle-dir"`` and
the same path form the HTTP source records, so traces look alike whichever source ran.

The folder is indexed once, on first use: every ``*.json`` below it (recursively, sorted by
path) may hold a Bundle of any type or a single resource. Transaction/batch entries with
``DELETE`` are skipped; ``urn:uuid:`` references are rewritten to ``Type/id`` within their bundle.
When one ``Type/id`` appears more than once, the copy with the latest ``meta.lastUpdated`` wins
(on a tie, the one read last).

Search is deliberately small. Supported parameters: ``_id``; ``patient`` and ``subject``
(``Patient/<id>`` or a bare id, matched against the resource's ``subject`` and ``patient``
references; comma-separated values are ORed); on Patient also ``identifier``
(``system|value``, ``|value`` or ``value``), ``birthdate`` (exact date), and ``name`` /
``family`` / ``given`` (case-insensitive prefix, as FHIR string search). ``_count``, ``_sort``,
``_include``, ``_revinclude``, ``_elements``, ``_summary``, ``_total`` and ``_format`` are accepted
and ignored: all matches come back in file order, with nothing included. Any other parameter is
refused with the error a strict FHIR server would give (HTTP 400), because ignoring a filter
would silently return resources the caller did not ask for.

``get`` answers ``metadata`` with a synthetic CapabilityStatement that declares search only (so
capability discovery chooses per-type searches) and ``Patient/<id>/$everything`` with every
resource that references the patient, as one searchset page.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from agent.domain.events import AccessObserver, FhirRequestEvent
from agent.errors import InvalidResourceError, PatientNotFoundError, SourceUnavailableError

_IGNORED_PARAMS = frozenset(
    {"_count", "_sort", "_include", "_revinclude", "_elements", "_summary", "_total", "_format"}
)
_PATIENT_ONLY_PARAMS = frozenset({"identifier", "birthdate", "name", "family", "given"})
_SUPPORTED_PARAMS = frozenset({"_id", "patient", "subject"}) | _PATIENT_ONLY_PARAMS
# One segment of a relative path for generic GETs, as the HTTP source accepts.
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9\-._$]{1,64}$")

Resource = dict[str, Any]


def _walk_references(node: Any, rewrite: Callable[[str], str]) -> None:
    """Apply ``rewrite`` in place to every ``reference`` string under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = rewrite(value)
            else:
                _walk_references(value, rewrite)
    elif isinstance(node, list):
        for item in node:
            _walk_references(item, rewrite)


def _reference_targets(resource: Resource) -> list[str]:
    """Return the ``subject`` and ``patient`` references of a resource."""
    refs: list[str] = []
    for field in ("subject", "patient"):
        value = resource.get(field)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            refs.append(value["reference"])
    return refs


def _matches_reference(refs: list[str], wanted: str, *, patient_only: bool) -> bool:
    for value in wanted.split(","):
        value = value.strip()
        if not value:
            continue
        if "/" in value:
            if value in refs:
                return True
            continue
        for ref in refs:
            ref_type, _, ref_id = ref.rpartition("/")
            if ref_id == value and (ref_type == "Patient" or not patient_only):
                return True
    return False


def _matches_identifier(resource: Resource, wanted: str) -> bool:
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    for token in wanted.split(","):
        if "|" in token:
            system, _, value = token.partition("|")
            for ident in identifiers:
                # "|value" means "no system"; "system|" means any value in that system.
                system_ok = (ident.get("system") or "") == system
                value_ok = not value or ident.get("value") == value
                if system_ok and value_ok:
                    return True
        elif any(ident.get("value") == token for ident in identifiers):
            return True
    return False


def _name_parts(resource: Resource, field: str) -> list[str]:
    parts: list[str] = []
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        if field in ("family", "name") and isinstance(name.get("family"), str):
            parts.append(name["family"])
        if field in ("given", "name"):
            parts.extend(g for g in name.get("given") or [] if isinstance(g, str))
        if field == "name" and isinstance(name.get("text"), str):
            parts.append(name["text"])
    return parts


def _matches_string(values: list[str], wanted: str) -> bool:
    prefixes = [w.strip().casefold() for w in wanted.split(",") if w.strip()]
    return any(v.casefold().startswith(p) for v in values for p in prefixes)


def _all_references(resource: Resource) -> set[str]:
    """Return every ``reference`` string anywhere in a resource."""
    found: set[str] = set()

    def keep(reference: str) -> str:
        found.add(reference)
        return reference

    _walk_references(resource, keep)
    return found


def _searchset(resources: list[Resource]) -> dict[str, Any]:
    """Wrap resources in a one-page searchset Bundle, every entry a match."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in resources
        ],
    }


def _capability_statement(index: dict[str, dict[str, Resource]]) -> dict[str, Any]:
    """Return a CapabilityStatement saying what this source does: read and search, nothing more."""
    resources = []
    for resource_type in sorted(index):
        names = sorted(_SUPPORTED_PARAMS if resource_type == "Patient" else _SUPPORTED_PARAMS - _PATIENT_ONLY_PARAMS)
        resources.append(
            {
                "type": resource_type,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [{"name": name, "type": "token" if name == "_id" else "string"} for name in names],
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "software": {"name": "medagent bundle folder source"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{"mode": "server", "resource": resources}],
    }


def _last_updated(resource: Resource) -> str:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else ""


class BundleDirFhirSource:
    """Serve FHIR reads and searches from a folder of bundle and resource JSON files.

    Args:
        root: the folder to index (recursively).
        observer: receives one event per read or search.
    """

    backend = "bundle-dir"

    def __init__(self, root: Path, *, observer: AccessObserver) -> None:
        self.root = Path(root)
        self._observer = observer
        self._index: dict[str, dict[str, Resource]] | None = None

    async def aclose(self) -> None:
        """Release nothing: the index is plain memory."""

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Return one resource by type and id.

        Raises:
            PatientNotFoundError: no Patient with that id in the folder.
            SourceUnavailableError: the folder is missing, or no resource of another type has that id.
            InvalidResourceError: a file in the folder is not valid JSON or not FHIR.
        """
        started = time.perf_counter()
        path = f"{resource_type}/{resource_id}"
        index = self._load(path, started)
        resource = index.get(resource_type, {}).get(resource_id)
        if resource is None:
            if resource_type == "Patient":
                error = f"patient {resource_id} not found in {self.root}"
                self._emit(path, 404, [], started, error)
                raise PatientNotFoundError(error)
            error = f"{resource_type}/{resource_id} not found in {self.root}"
            self._emit(path, 404, [], started, error)
            raise SourceUnavailableError(error, details={"status": 404})
        self._emit(path, 200, [path], started, None)
        return json.loads(json.dumps(resource))

    async def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return the resources of a type that match every supported parameter.

        Raises:
            SourceUnavailableError: the folder is missing, or a parameter is not supported here.
            InvalidResourceError: a file in the folder is not valid JSON or not FHIR.
        """
        started = time.perf_counter()
        path = f"{resource_type}?{urlencode(params)}" if params else resource_type
        index = self._load(path, started)
        unsupported = sorted(k for k in params if k not in _SUPPORTED_PARAMS and k not in _IGNORED_PARAMS) + sorted(
            k for k in params if k in _PATIENT_ONLY_PARAMS and resource_type != "Patient"
        )
        if unsupported:
            error = (
                f"the bundle folder source does not support search parameter(s) {', '.join(unsupported)} "
                f"on {resource_type} (supported: _id, patient, subject; on Patient also identifier, "
                "birthdate, name, family, given)"
            )
            self._emit(path, 400, [], started, error)
            raise SourceUnavailableError(error, details={"status": 400})

        matches = [r for r in index.get(resource_type, {}).values() if self._matches(r, params)]
        ids = [f"{resource_type}/{r['id']}" for r in matches]
        self._emit(path, 200, ids, started, None)
        return json.loads(json.dumps(matches))

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """Answer the generic GETs a server would: ``metadata``, ``Patient/<id>/$everything``, reads, searches.

        ``metadata`` is a synthetic CapabilityStatement that declares search only (the types in
        the folder with the parameters :meth:`search` supports; no operations, no ``_include``),
        so capability discovery picks per-type searches here. ``$everything`` returns the Patient
        and every resource with a reference to it, as one searchset page; it honours ``_type``
        (comma-separated) and ``_since`` (``meta.lastUpdated`` at or after it) and ignores ``_count``.

        Raises:
            ValueError: the path is not a plain relative FHIR path.
            SourceUnavailableError: the folder is missing, the path is not one of the above, an
                unsupported parameter, or (for a read) no such resource.
            PatientNotFoundError: a read of a missing Patient.
            InvalidResourceError: a file in the folder is not valid JSON or not FHIR.
        """
        segments = path.split("/")
        if not path or not all(_PATH_SEGMENT.match(s) and s not in (".", "..") for s in segments):
            raise ValueError(f"not a relative FHIR path: {path!r}")
        if path == "metadata":
            started = time.perf_counter()
            index = self._load(path, started)
            self._emit(path, 200, [], started, None)
            return _capability_statement(index)
        if len(segments) == 3 and segments[0] == "Patient" and segments[2] == "$everything":
            return self._everything(segments[1], params)
        if len(segments) == 2 and not segments[1].startswith("$") and not params:
            return await self.read(segments[0], segments[1])
        if len(segments) == 1 and not segments[0].startswith("$"):
            matches = await self.search(segments[0], params)
            return _searchset(matches)
        started = time.perf_counter()
        error = f"the bundle folder source does not serve GET {path}"
        self._emit(path, 404, [], started, error)
        raise SourceUnavailableError(error, details={"status": 404})

    async def get_all_pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return :meth:`get`'s answer as the only page (the folder never pages).

        Raises:
            SourceUnavailableError: as :meth:`get`.
            InvalidResourceError: as :meth:`get`, or the answer is not a Bundle.
        """
        page = await self.get(path, params)
        if page.get("resourceType") != "Bundle":
            raise InvalidResourceError(f"GET {path} on the bundle folder {self.root} is not a Bundle")
        return [page]

    def _everything(self, patient_id: str, params: dict[str, str]) -> dict[str, Any]:
        started = time.perf_counter()
        path = f"Patient/{patient_id}/$everything"
        if params:
            path += f"?{urlencode(params)}"
        index = self._load(path, started)
        unsupported = sorted(k for k in params if k not in ("_type", "_since", "_count"))
        if unsupported:
            error = f"the bundle folder source does not support {', '.join(unsupported)} on $everything"
            self._emit(path, 400, [], started, error)
            raise SourceUnavailableError(error, details={"status": 400})
        patient = index.get("Patient", {}).get(patient_id)
        if patient is None:
            error = f"patient {patient_id} not found in {self.root}"
            self._emit(path, 404, [], started, error)
            raise SourceUnavailableError(error, details={"status": 404})
        wanted = {t.strip() for t in params.get("_type", "").split(",") if t.strip()}
        since = params.get("_since", "")
        target = f"Patient/{patient_id}"
        found: list[Resource] = []
        for by_id in index.values():
            for resource in by_id.values():
                if resource is not patient and target not in _all_references(resource):
                    continue
                if wanted and resource["resourceType"] not in wanted:
                    continue
                # ISO instants in one zone compare as strings; undated resources are kept.
                if since and _last_updated(resource) and _last_updated(resource) < since:
                    continue
                found.append(resource)
        ids = [f"{r['resourceType']}/{r['id']}" for r in found]
        self._emit(path, 200, ids, started, None)
        return _searchset(json.loads(json.dumps(found)))

    # -- matching --------------------------------------------------------------------------------

    @staticmethod
    def _matches(resource: Resource, params: dict[str, str]) -> bool:
        for key, wanted in params.items():
            if key in _IGNORED_PARAMS:
                continue
            if key == "_id":
                if resource.get("id") not in {v.strip() for v in wanted.split(",")}:
                    return False
            elif key in ("patient", "subject"):
                refs = _reference_targets(resource)
                if not _matches_reference(refs, wanted, patient_only=key == "patient"):
                    return False
            elif key == "identifier":
                if not _matches_identifier(resource, wanted):
                    return False
            elif key == "birthdate":
                if resource.get("birthDate") not in {v.strip() for v in wanted.split(",")}:
                    return False
            elif not _matches_string(_name_parts(resource, key), wanted):
                return False
        return True

    # -- indexing --------------------------------------------------------------------------------

    def _emit(self, path: str, status: int | None, ids: list[str], started: float, error: str | None) -> None:
        self._observer.fhir_request(
            FhirRequestEvent(
                backend=self.backend,
                method="GET",
                path=path,
                status=status,
                resource_ids=ids,
                duration_ms=(time.perf_counter() - started) * 1000.0,
                error=error,
            )
        )

    def _load(self, path: str, started: float) -> dict[str, dict[str, Resource]]:
        """Return the index, building it on first use; failures are emitted and raised."""
        if self._index is not None:
            return self._index
        try:
            self._index = self._build_index()
        except (SourceUnavailableError, InvalidResourceError) as exc:
            self._emit(path, None, [], started, exc.message)
            raise
        return self._index

    def _build_index(self) -> dict[str, dict[str, Resource]]:
        if not self.root.is_dir():
            raise SourceUnavailableError(f"FHIR bundle folder {self.root} does not exist")
        index: dict[str, dict[str, Resource]] = {}
        for file in sorted(self.root.rglob("*.json")):
            for resource in self._resources_in(file):
                by_id = index.setdefault(resource["resourceType"], {})
                current = by_id.get(resource["id"])
                if current is None or _last_updated(resource) >= _last_updated(current):
                    by_id[resource["id"]] = resource
        return index

    def _resources_in(self, file: Path) -> Iterator[Resource]:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidResourceError(f"FHIR file {file} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise InvalidResourceError(f"FHIR file {file} does not hold a FHIR resource (no resourceType)")
        if data["resourceType"] != "Bundle":
            if not isinstance(data.get("id"), str):
                raise InvalidResourceError(f"FHIR file {file} holds a {data['resourceType']} without an id")
            yield data
            return

        entries = [e for e in data.get("entry") or [] if isinstance(e, dict)]
        kept: list[Resource] = []
        placeholders: dict[str, str] = {}
        for position, entry in enumerate(entries):
            resource = entry.get("resource")
            raw_request = entry.get("request")
            request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
            if str(request.get("method", "")).upper() == "DELETE" or not isinstance(resource, dict):
                continue
            rtype = resource.get("resourceType")
            if not isinstance(rtype, str):
                raise InvalidResourceError(f"FHIR file {file}: entry {position} has no resourceType")
            rid = resource.get("id")
            full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
            if not isinstance(rid, str):
                # Transaction entries may carry the id only in the request URL or the fullUrl.
                url = str(request.get("url", ""))
                if url.startswith(f"{rtype}/") and "?" not in url:
                    rid = url.split("/", 1)[1]
                elif full_url and full_url.startswith("urn:uuid:"):
                    rid = full_url.removeprefix("urn:uuid:")
                else:
                    raise InvalidResourceError(f"FHIR file {file}: entry {position} ({rtype}) has no id")
                resource = {**resource, "id": rid}
            if full_url:
                placeholders[full_url] = f"{rtype}/{rid}"
            kept.append(resource)

        if placeholders:

            def rewrite(reference: str) -> str:
                return placeholders.get(reference, reference)

            for resource in kept:
                _walk_references(resource, rewrite)
        yield from kept
