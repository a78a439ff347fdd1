"""FHIR R4 over HTTP: the production implementation of :class:`~agent.sources.protocols.FhirSource`.

Where it sits: the graph's "fetch history" step (and patient resolution) call ``read`` and
``search`` on whichever FHIR source :func:`agent.sources.factory.make_fhir_source` built; this is
the one used when ``settings.fhir.base_url`` is set (HAPI FHIR, Epic, Cerner, cloud FHIR
services, or the test engine in ``tools/fhir_server``). Every HTTP request, including failed
ones and each page of a search, is reported to the run's observer as a
:class:`~agent.domain.events.FhirRequestEvent`, so the audit trail shows exactly what was read.

Error messages are safe to show a user: they name the server and the resource type, never the
full query string (which may carry identifiers such as an MRN).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from agent.config import FhirSettings
from agent.domain.events import AccessObserver, FhirRequestEvent
from agent.errors import InvalidResourceError, PatientNotFoundError, SourceUnavailableError
from agent.sources.http_auth import client_kwargs, http_auth

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# Resource types are code identifiers; refusing anything else keeps a type name from ever
# rewriting the request path (``../``, ``?``) when it comes from model output or a request.
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_MAX_DIAGNOSTICS_CHARS = 300


def _summarise_outcome(body: bytes) -> str:
    """Return a short, one-line summary of an OperationOutcome body, or "" when there is none."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return ""
    parts: list[str] = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
        parts.append(f"{issue.get('severity', 'error')}: {text or issue.get('code', 'unknown')}")
    summary = "; ".join(parts)
    if len(summary) > _MAX_DIAGNOSTICS_CHARS:
        summary = summary[: _MAX_DIAGNOSTICS_CHARS - 3] + "..."
    return summary


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Return (scheme, host, effective port) used for same-origin checks."""
    port = url.port
    if port is None:
        port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


class _Reply(NamedTuple):
    """A decoded answer: HTTP status, JSON body (None for a 404) and when the request started."""

    status: int
    data: Any
    started: float


class HttpFhirSource:
    """Read and search a FHIR R4 server with an async httpx client.

    Args:
        base_url: the server's FHIR base, e.g. ``https://fhir.example.org/r4``.
        observer: receives one event per HTTP request.
        timeout_s: per-request timeout (connect, read, write and pool).
        username: HTTP basic auth user (with ``password``).
        password: HTTP basic auth password.
        bearer_token: sent as ``Authorization: Bearer ...``; wins over basic auth.
        max_pages: upper bound on pages fetched per search (the first page included).
        client: an existing client to use (tests pass one with a ``MockTransport``); it is not
            closed by :meth:`aclose`. Auth and the Accept header are sent per request, so any
            client works.
    """

    backend = "http"

    def __init__(
        self,
        base_url: str,
        *,
        observer: AccessObserver,
        timeout_s: float = 30,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
        max_pages: int = 50,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url + "/")
        self._observer = observer
        self._timeout_s = timeout_s
        self._max_pages = max_pages
        auth_headers, self._auth = http_auth(username, password, bearer_token)
        self._headers = {"Accept": FHIR_JSON, **auth_headers}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))

    @classmethod
    def from_settings(cls, settings: FhirSettings, observer: AccessObserver) -> HttpFhirSource:
        """Build a source from the ``fhir`` settings group.

        Raises:
            ValueError: when ``settings.base_url`` is not set.
        """
        if not settings.base_url:
            raise ValueError("FhirSettings.base_url is not set")
        return cls(settings.base_url, observer=observer, max_pages=settings.max_pages, **client_kwargs(settings))

    async def __aenter__(self) -> HttpFhirSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client when this source created it."""
        if self._owns_client:
            await self._client.aclose()

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Return one resource by type and id.

        Raises:
            PatientNotFoundError: the server answered 404 for a Patient.
            SourceUnavailableError: unreachable, timed out, 404 for another type, or any other
                non-2xx answer.
            InvalidResourceError: the body is not JSON or not a resource of that type.
        """
        self._check_type(resource_type)
        url = self._base.join(f"{resource_type}/{quote(resource_id, safe='')}")
        reply = await self._get_json(url, what=resource_type)
        if reply.status == 404:
            if resource_type == "Patient":
                error = f"patient {resource_id} not found on {self.base_url}"
                self._emit("GET", url, 404, [], reply.started, error)
                raise PatientNotFoundError(error)
            error = f"{resource_type}/{resource_id} not found on {self.base_url} (HTTP 404)"
            self._emit("GET", url, 404, [], reply.started, error)
            raise SourceUnavailableError(error, details={"status": 404})
        data = reply.data
        if not isinstance(data, dict) or data.get("resourceType") != resource_type:
            found = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
            error = f"FHIR server {self.base_url} returned {found!s} for a {resource_type} read"
            self._emit("GET", url, reply.status, [], reply.started, error)
            raise InvalidResourceError(error)
        self._emit("GET", url, reply.status, [f"{resource_type}/{data.get('id')}"], reply.started, None)
        return data

    async def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return every resource matching a type-level search, following ``next`` links.

        Only entries with ``search.mode == "match"`` are returned (entries without a mode count as
        matches when they have the searched type); ``_include``d resources and outcomes are left
        out. Pages are fetched until there is no ``next`` link or ``max_pages`` pages were read;
        in the latter case the last page's event carries an ``error`` saying the results were
        truncated, and a warning is logged.

        Raises:
            SourceUnavailableError: unreachable, timed out, or a non-2xx answer on any page.
            InvalidResourceError: a page is not JSON or not a Bundle, or a ``next`` link points
                to another origin (it is refused: following it would send credentials and the
                query to a server nobody configured).
        """
        self._check_type(resource_type)
        url: httpx.URL | None = self._base.join(resource_type).copy_merge_params(params)
        results: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        fetched: set[str] = set()
        pages = 0
        while url is not None:
            fetched.add(str(url))
            pages += 1
            truncated = False
            reply = await self._get_json(url, what=resource_type)
            data = reply.data
            if reply.status == 404 or not isinstance(data, dict) or data.get("resourceType") != "Bundle":
                if reply.status == 404:
                    error = f"FHIR server {self.base_url} answered HTTP 404 to a {resource_type} search"
                    self._emit("GET", url, 404, [], reply.started, error)
                    raise SourceUnavailableError(error, details={"status": 404})
                found = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
                error = f"FHIR server {self.base_url} returned {found!s} instead of a Bundle"
                self._emit("GET", url, reply.status, [], reply.started, error)
                raise InvalidResourceError(error)
            page_ids = self._collect_matches(data, resource_type, results, seen)
            next_url = self._next_link(data)
            if next_url is not None and str(next_url) in fetched:
                logger.warning("FHIR server %s sent a next link to a page already read", self.base_url)
                next_url = None
            if next_url is not None and pages >= self._max_pages:
                truncated = True
                logger.warning(
                    "FHIR search on %s stopped after %d pages (max_pages); results are truncated",
                    self.base_url,
                    pages,
                )
            note = (
                f"truncated: stopped after {pages} pages (max_pages) with more results available" if truncated else None
            )
            self._emit("GET", url, reply.status, page_ids, reply.started, note)
            if next_url is not None and not truncated:
                self._check_same_origin(next_url)
                url = next_url
            else:
                url = None
        return results

    # -- helpers ---------------------------------------------------------------------------------

    def _check_type(self, resource_type: str) -> None:
        if not _RESOURCE_TYPE.match(resource_type):
            raise ValueError(f"not a FHIR resource type: {resource_type!r}")

    def _relative_path(self, url: httpx.URL) -> str:
        """Return the url relative to the base (path and query), the form events record."""
        text = str(url)
        base = str(self._base)
        if text.startswith(base):
            return text[len(base) :]
        # Same origin but outside the base path (a server's own paging endpoint).
        return url.raw_path.decode("ascii", errors="replace")

    def _emit(
        self,
        method: str,
        url: httpx.URL,
        status: int | None,
        resource_ids: list[str],
        started: float,
        error: str | None,
    ) -> None:
        self._observer.fhir_request(
            FhirRequestEvent(
                backend=self.backend,
                method=method,
                path=self._relative_path(url),
                status=status,
                resource_ids=resource_ids,
                duration_ms=(time.perf_counter() - started) * 1000.0,
                error=error,
            )
        )

    async def _get_json(self, url: httpx.URL, *, what: str) -> _Reply:
        """GET a URL and decode its JSON body, mapping transport and HTTP errors.

        A 404 comes back to the caller (its meaning depends on the interaction), as does a 2xx
        with decoded JSON; the caller emits the event for those. Every other outcome emits its
        event here and raises.
        """
        started = time.perf_counter()
        try:
            # The timeout is set per request so "timed out after Ns" holds for a caller's client too.
            response = await self._client.get(
                url, headers=self._headers, auth=self._auth or httpx.USE_CLIENT_DEFAULT, timeout=self._timeout_s
            )
        except httpx.TimeoutException as exc:
            error = f"FHIR server {self.base_url} timed out after {self._timeout_s:g}s"
            self._emit("GET", url, None, [], started, error)
            raise SourceUnavailableError(error) from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            error = f"FHIR server {self.base_url} could not be reached: {reason}"
            self._emit("GET", url, None, [], started, error)
            raise SourceUnavailableError(error) from exc

        status = response.status_code
        if status == 404:
            return _Reply(status, None, started)
        if status in (401, 403):
            error = f"FHIR server {self.base_url} refused the request: authentication failed (HTTP {status})"
            self._emit("GET", url, status, [], started, error)
            raise SourceUnavailableError(error, details={"status": status})
        if not 200 <= status < 300:
            summary = _summarise_outcome(response.content)
            error = f"FHIR server {self.base_url} answered HTTP {status} to a {what} request"
            if summary:
                error += f": {summary}"
            self._emit("GET", url, status, [], started, error)
            raise SourceUnavailableError(error, details={"status": status})
        try:
            data = response.json()
        except ValueError as exc:
            error = f"FHIR server {self.base_url} returned a body that is not JSON for a {what} request"
            self._emit("GET", url, status, [], started, error)
            raise InvalidResourceError(error) from exc
        return _Reply(status, data, started)

    @staticmethod
    def _collect_matches(
        bundle: dict[str, Any],
        resource_type: str,
        results: list[dict[str, Any]],
        seen: set[tuple[str, str]],
    ) -> list[str]:
        """Append this page's matching resources to ``results``; return their ``Type/id``."""
        page_ids: list[str] = []
        for entry in bundle.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            resource = entry.get("resource")
            if not isinstance(resource, dict):
                continue
            search = entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else None
            # Entries without a mode (some servers omit it) count when they have the searched type.
            is_match = resource.get("resourceType") == resource_type if mode is None else mode == "match"
            if not is_match:
                continue
            key = (str(resource.get("resourceType")), str(resource.get("id")))
            if key in seen:
                # Servers may repeat a resource across pages when data changes mid-search.
                continue
            seen.add(key)
            results.append(resource)
            page_ids.append(f"{key[0]}/{key[1]}")
        return page_ids

    def _next_link(self, bundle: dict[str, Any]) -> httpx.URL | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                # Relative links resolve against the base, as FHIR defines relative URLs.
                return self._base.join(str(link["url"]))
        return None

    def _check_same_origin(self, url: httpx.URL) -> None:
        if _origin(url) != _origin(self._base):
            scheme, host, port = _origin(url)
            raise InvalidResourceError(
                f"FHIR server {self.base_url} sent a next link to another origin "
                f"({scheme}://{host}:{port}); refusing to follow it"
            )
