"""FHIR R4 over HTTP: the production implementation of :class:`~agent.sources.protocols.FhirSource`.

Where it sits: the graph's "fetch history" step (and patient resolution) call ``read`` and
``search`` on whichever FHIR source :func:`agent.sources.factory.make_fhir_source` built; this is
the one used when ``settings.fhir.base_url`` is set (HAPI FHIR, Epic, Cerner, cloud FHIR
services, or the test engine in ``tools/fhir_server``). Every HTTP request, including failed
ones and each page of a search, is reported to the run's observer as a
:class:`~agent.domain.events.FhirRequestEvent`, so the audit trail shows exactly what was read.

Besides ``read`` and ``search``, ``get`` (one GET of ``metadata``, an operation or a Binary) and
``get_all_pages`` (an operation such as ``Patient/<id>/$everything``, following ``next`` links)
serve capability discovery and the $everything strategy of :mod:`agent.sources.history_fetch`.

Transient failures (connection errors, timeouts, HTTP 429, 500, 502, 503 and 504) are retried
with exponential backoff and jitter, honouring ``Retry-After``; each attempt is its own event, so
the trace shows every retry and why it happened.

Error messages are safe to show a user: they name the server, the resource type and the request
path with query values blanked, never the full query string (which may carry identifiers such as
an MRN).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import httpx

from agent.config import FhirSettings
from agent.domain.events import AccessObserver, FhirRequestEvent
from agent.errors import InvalidResourceError, PatientNotFoundError, SourceUnavailableError
from agent.sources.http_auth import client_kwargs, http_auth
from agent.sources.http_clients import async_client, loads_json

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# Resource types are code identifiers; refusing anything else keeps a type name from ever
# rewriting the request path (``../``, ``?``) when it comes from model output or a request.
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_MAX_DIAGNOSTICS_CHARS = 300
# One segment of a relative path for generic GETs (``metadata``, ``Patient/<id>/$everything``,
# ``Binary/<id>``): nothing that could change the path's meaning or smuggle in a query.
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9\-._$]{1,64}$")

# Answers that say "try again later": rate limiting and the 5xx codes proxies and busy servers
# send. 501/505 mean "never", so they are not retried; neither is any other 4xx.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

Sleep = Callable[[float], Awaitable[object]]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Return the wait a ``Retry-After`` header asks for, in seconds, or None when absent or unreadable.

    Both forms of RFC 9110 are read: delta-seconds (``"120"``) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past means "now" (0 s).

    Args:
        value: the header value.
        now: the current time (tests pass one); defaults to the clock.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # A negative or non-finite delta is malformed; ignoring it falls back to our own backoff.
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


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


def _safe_path(relative: str) -> str:
    """Return a relative request path with every query value blanked, for user-facing messages."""
    parts = urlsplit(relative)
    if not parts.query:
        return parts.path
    names = [pair.split("=", 1)[0] for pair in parts.query.split("&") if pair]
    return parts.path + "?" + "&".join(f"{name}=..." for name in names)


def _describe(path: str) -> str:
    """Return how messages name a generic GET: ``"metadata"``, ``"Patient $everything"``, ``"Binary"``."""
    segments = path.split("/")
    operation = next((s for s in segments if s.startswith("$")), None)
    return f"{segments[0]} {operation}" if operation and not segments[0].startswith("$") else segments[0]


def _resource_ids(data: dict[str, Any]) -> list[str]:
    """Return the ``Type/id`` a body carries: a Bundle's entries, or the resource itself."""
    if data.get("resourceType") != "Bundle":
        return [f"{data['resourceType']}/{data['id']}"] if isinstance(data.get("id"), str) else []
    ids: list[str] = []
    for entry in data.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            ids.append(f"{resource.get('resourceType')}/{resource['id']}")
    return ids


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


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
        max_retries: retries after the first attempt for transient failures (connection errors,
            timeouts, HTTP 429/500/502/503/504); 0 makes one attempt only. The constructor
            defaults to 0 so a bare source behaves exactly as one request per call;
            :meth:`from_settings` takes the settings' ``max_retries`` (3 by default).
        backoff_base_s: the first retry's nominal wait; it doubles on each further retry.
        backoff_max_s: upper bound on one computed backoff wait.
        retry_after_max_s: the longest ``Retry-After`` honoured; a server asking for more makes
            the request fail at once with a message saying so.
        sleep: the coroutine that waits between attempts (tests pass one that records delays).
        rng: source of jitter (tests pass a seeded one).
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
        auth: httpx.Auth | None = None,
        max_retries: int = 0,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 5.0,
        retry_after_max_s: float = 30.0,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if backoff_base_s < 0 or backoff_max_s < 0 or retry_after_max_s < 0:
            raise ValueError("backoff and Retry-After limits must not be negative")
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._retry_after_max_s = retry_after_max_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url + "/")
        self._observer = observer
        self._timeout_s = timeout_s
        self._max_pages = max_pages
        auth_headers, self._auth = http_auth(username, password, bearer_token)
        if auth is not None:
            # e.g. SMART Backend Services: one way to authenticate, never two
            if auth_headers or self._auth is not None:
                raise ValueError("pass either auth or username/password/bearer_token, not both")
            self._auth = auth
        self._headers = {"Accept": FHIR_JSON, **auth_headers}
        self._owns_client = client is None
        self._client = client or async_client(timeout=httpx.Timeout(timeout_s))

    @classmethod
    def from_settings(cls, settings: FhirSettings, observer: AccessObserver) -> HttpFhirSource:
        """Build a source from the ``fhir`` settings group.

        Raises:
            ValueError: when ``settings.base_url`` is not set.
        """
        if not settings.base_url:
            raise ValueError("FhirSettings.base_url is not set")
        from agent.sources.smart_auth import smart_auth_from_settings

        auth = smart_auth_from_settings(settings)
        return cls(
            settings.base_url,
            observer=observer,
            auth=auth,
            max_pages=settings.max_pages,
            max_retries=settings.max_retries,
            backoff_base_s=settings.backoff_base_s,
            backoff_max_s=settings.backoff_max_s,
            retry_after_max_s=settings.retry_after_max_s,
            **client_kwargs(settings),
        )

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

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """Return the JSON body of one GET on a path relative to the FHIR base.

        For interactions that are neither a read nor a type search: ``metadata``, an operation
        such as ``Patient/<id>/$everything`` (one page; see :meth:`get_all_pages`), or a
        ``Binary/<id>``. Retried and recorded like every other request.

        Args:
            path: relative to the base, e.g. ``"metadata"``; segments of letters, digits, ``-``,
                ``.``, ``_`` and ``$`` only (no query, no ``..``, no absolute URL).
            params: query parameters.

        Raises:
            ValueError: the path is not a plain relative FHIR path.
            SourceUnavailableError: unreachable, timed out, 404 or any other non-2xx answer.
            InvalidResourceError: the body is not JSON or not a FHIR resource.
        """
        url = self._relative_url(path).copy_merge_params(params)
        what = _describe(path)
        reply = await self._get_json(url, what=what)
        if reply.status == 404:
            error = f"FHIR server {self.base_url} answered HTTP 404 to a {what} request"
            self._emit("GET", url, 404, [], reply.started, error)
            raise SourceUnavailableError(error, details={"status": 404})
        self._emit("GET", url, reply.status, _resource_ids(reply.data), reply.started, None)
        return dict(reply.data)

    async def get_all_pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return every page (a Bundle each) of a paged answer, following ``next`` links.

        Meant for operations such as ``Patient/<id>/$everything`` whose entries mix types and
        search modes, so the pages come back whole for the caller to sort. Paging is bounded by
        ``max_pages`` and refuses cycles and other origins exactly as :meth:`search` does.

        Raises:
            ValueError: the path is not a plain relative FHIR path.
            SourceUnavailableError: unreachable, timed out, 404 or a non-2xx answer on any page.
            InvalidResourceError: a page is not a Bundle, or a ``next`` link points to another origin.
        """
        url: httpx.URL | None = self._relative_url(path).copy_merge_params(params)
        what = _describe(path)
        pages: list[dict[str, Any]] = []
        fetched: set[str] = set()
        while url is not None:
            fetched.add(str(url))
            reply = await self._get_json(url, what=what)
            data = reply.data
            if reply.status == 404:
                error = f"FHIR server {self.base_url} answered HTTP 404 to a {what} request"
                self._emit("GET", url, 404, [], reply.started, error)
                raise SourceUnavailableError(error, details={"status": 404})
            if data.get("resourceType") != "Bundle":
                error = f"FHIR server {self.base_url} returned {data.get('resourceType')!s} instead of a Bundle"
                self._emit("GET", url, reply.status, [], reply.started, error)
                raise InvalidResourceError(error)
            pages.append(data)
            next_url = self._next_link(data)
            if next_url is not None and str(next_url) in fetched:
                logger.warning("FHIR server %s sent a next link to a page already read", self.base_url)
                next_url = None
            note = None
            if next_url is not None and len(pages) >= self._max_pages:
                note = f"truncated: stopped after {len(pages)} pages (max_pages) with more results available"
                logger.warning("FHIR %s on %s stopped after %d pages (max_pages)", what, self.base_url, len(pages))
                next_url = None
            self._emit("GET", url, reply.status, _resource_ids(data), reply.started, note)
            if next_url is not None:
                self._check_same_origin(next_url)
            url = next_url
        return pages

    # -- helpers ---------------------------------------------------------------------------------

    def _check_type(self, resource_type: str) -> None:
        if not _RESOURCE_TYPE.match(resource_type):
            raise ValueError(f"not a FHIR resource type: {resource_type!r}")

    def _relative_url(self, path: str) -> httpx.URL:
        """Return base + ``path`` after checking it cannot leave the base (no ``..``, query or scheme)."""
        segments = path.split("/")
        if not path or not all(_PATH_SEGMENT.match(s) and s not in (".", "..") for s in segments):
            raise ValueError(f"not a relative FHIR path: {path!r}")
        return self._base.join(path)

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

    def _backoff_s(self, attempt: int) -> float:
        """Return the wait before retry number ``attempt`` (1-based): doubling, capped, jittered.

        The jitter keeps each wait between half and all of the nominal value, so clients that
        failed together do not retry together, while the wait still grows with each attempt.
        """
        nominal = min(self._backoff_max_s, self._backoff_base_s * 2 ** (attempt - 1))
        return nominal * (0.5 + 0.5 * self._rng.random())

    async def _get_json(self, url: httpx.URL, *, what: str) -> _Reply:
        """GET a URL and decode its JSON body, retrying transient failures and mapping errors.

        A 404 comes back to the caller (its meaning depends on the interaction), as does a 2xx
        with a decoded FHIR resource; the caller emits the event for those. Every other attempt
        emits its own event here: a retried one with ``"attempt n/N: ..., retrying in s"`` as
        its error, the last one with the message of the exception raised.

        Raises:
            SourceUnavailableError: authentication refused, a non-retryable HTTP error, a
                ``Retry-After`` beyond ``retry_after_max_s``, or a transient failure on every
                attempt. The message names the server, the path (query values blanked), the
                cause and the number of attempts; ``details`` carry ``status`` (when a response
                came) and ``attempts`` (when more than one was made).
            InvalidResourceError: a 2xx body that is not JSON or not a FHIR resource (not
                retried: the server would answer the same again).
        """
        total = self._max_retries + 1
        where = _safe_path(self._relative_path(url))
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            status: int | None = None
            retry_after: float | None = None
            try:
                # The timeout is set per request so "timed out after Ns" holds for a caller's client too.
                response = await self._client.get(
                    url, headers=self._headers, auth=self._auth or httpx.USE_CLIENT_DEFAULT, timeout=self._timeout_s
                )
            except httpx.TimeoutException as exc:
                cause: BaseException | None = exc
                reason = f"timed out after {self._timeout_s:g}s"
                short = "timed out"
            except httpx.TransportError as exc:
                cause = exc
                reason = f"could not be reached: {str(exc) or type(exc).__name__}"
                short = f"connection failed ({type(exc).__name__})"
            else:
                cause = None
                status = response.status_code
                if status == 404:
                    return _Reply(status, None, started)
                if 200 <= status < 300:
                    return _Reply(status, self._decode(response, url, what, started), started)
                if status in (401, 403):
                    error = f"FHIR server {self.base_url} refused the request: authentication failed (HTTP {status})"
                    self._emit("GET", url, status, [], started, error)
                    raise SourceUnavailableError(error, details={"status": status})
                summary = _summarise_outcome(response.content)
                reason = f"answered HTTP {status} to a {what} request"
                if summary:
                    reason += f": {summary}"
                short = f"HTTP {status}"
                if status in RETRYABLE_STATUSES:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                else:
                    # Other 4xx (and 501/505) will not change on a retry.
                    total = attempt

            details: dict[str, Any] = {} if status is None else {"status": status}
            if attempt > 1:
                details["attempts"] = attempt
            if retry_after is not None and retry_after > self._retry_after_max_s and attempt < total:
                error = (
                    f"FHIR server {self.base_url} {reason} and asked to retry after {retry_after:g} s "
                    f"(Retry-After), more than the {self._retry_after_max_s:g} s limit; gave up on GET {where} "
                    f"after {_plural(attempt, 'attempt')}"
                )
                self._emit("GET", url, status, [], started, error)
                raise SourceUnavailableError(error, details={**details, "retry_after_s": retry_after}) from cause
            if attempt >= total:
                error = f"FHIR server {self.base_url} {reason} (GET {where}, {_plural(attempt, 'attempt')})"
                self._emit("GET", url, status, [], started, error)
                raise SourceUnavailableError(error, details=details) from cause
            delay = retry_after if retry_after is not None else self._backoff_s(attempt)
            note = f"attempt {attempt}/{total}: {short}, retrying in {delay:.3g} s"
            if retry_after is not None:
                note += " (Retry-After)"
            self._emit("GET", url, status, [], started, note)
            logger.info("FHIR server %s: %s", self.base_url, note)
            await self._sleep(delay)

    def _decode(self, response: httpx.Response, url: httpx.URL, what: str, started: float) -> Any:
        """Return a 2xx body as a FHIR resource dict, or emit the event and raise InvalidResourceError."""
        try:
            data = loads_json(response.content)
        except ValueError as exc:
            error = f"FHIR server {self.base_url} returned a body that is not JSON for a {what} request"
            self._emit("GET", url, response.status_code, [], started, error)
            raise InvalidResourceError(error) from exc
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            error = f"FHIR server {self.base_url} returned JSON that is not a FHIR resource for a {what} request"
            self._emit("GET", url, response.status_code, [], started, error)
            raise InvalidResourceError(error)
        return data

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
