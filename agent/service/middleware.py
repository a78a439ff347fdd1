"""Cross-cutting HTTP behaviour: caller identification, per-caller rate limits, CORS, security headers, access log.

Where it sits: between the ASGI server and the routes, for every request. All of it is pure ASGI
(no ``BaseHTTPMiddleware``), so streamed answers (SSE) pass through chunk by chunk and a client
that goes away cancels the route as it would without middleware. Outermost first:

1. :class:`AccessLogMiddleware`: one PHI-free line per request on ``agent.service.access``
   (method, route *template*, status, duration, caller name; never the concrete path, which
   holds patient ids, nor query strings or bodies);
2. :class:`SecurityHeadersMiddleware`: nosniff, no framing, no referrer, a Content-Security-
   Policy, ``Cache-Control: no-store`` on clinical endpoints, HSTS over https;
3. Starlette's ``CORSMiddleware``, only for the configured ``cors_origins``;
4. :class:`CallerMiddleware`: identifies the caller once (API key or OIDC token, see
   :mod:`agent.service.auth`) and applies the rate limit per caller.

Why the rate limit sits in a middleware that authenticates, rather than in the route's
dependency: every request, also to routes without auth, must count against someone, and the
key must be an identity a caller cannot forge. So the middleware verifies the credential
(the outcome, principal or error, is kept in the ASGI scope for the route's ``authenticate``
dependency: one verification per request) and counts the request against the API key's name,
the OIDC issuer+subject, or, for requests without valid credentials, the client address. A
caller who exhausts their budget therefore never slows another one, and forged or wrong
credentials only ever spend the sender's own address's budget (which also bounds guessing).
The limiter is a token bucket per caller, in process: bursts up to ``rate_limit_per_minute``,
refilled at that many per minute; with several worker processes each keeps its own count.
A development process that runs open (no keys, no OIDC) has one user and no limit.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.config import Settings
from agent.errors import MedagentError
from agent.service.auth import IDENTITY_SCOPE_KEY, Authenticator, Principal
from agent.service.deps import PROBLEM_JSON
from agent.service.schemas import Problem

access_log = logging.getLogger("agent.service.access")

#: Paths never limited nor identified: probes must keep working while a caller is throttled.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
#: Path prefixes served without data and without limit (the UI's static files).
EXEMPT_PREFIXES = ("/ui/static/",)
#: Path prefixes whose answers hold clinical content and must never be stored by a cache.
NO_STORE_PREFIXES = ("/v1/", "/cds-services")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN and start them inline.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HSTS = "max-age=31536000; includeSubDomains"

CORS_ALLOWED_HEADERS = ["Authorization", "X-API-Key", "X-Purpose-Of-Use", "Content-Type", "Accept", "Last-Event-ID"]


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the service's middleware to ``app`` (see the module docstring for the order and why).

    Raises:
        ConfigError: the OIDC settings are incomplete or unsafe.
    """
    authenticator = Authenticator(settings)
    app.state.authenticator = authenticator
    per_minute = settings.service.rate_limit_per_minute
    limiter = RateLimiter(per_minute) if per_minute > 0 and not authenticator.open else None
    app.state.rate_limiter = limiter
    # add_middleware wraps what is there already: the first added runs innermost.
    app.add_middleware(
        CallerMiddleware,
        authenticator=authenticator,
        limiter=limiter,
        notification_secret=_notification_secret(settings),
    )
    if settings.service.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.service.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=CORS_ALLOWED_HEADERS,
            expose_headers=["Retry-After", "Location"],
            # Credentials travel in headers (API key, bearer token), never in cookies.
            allow_credentials=False,
            max_age=600,
        )
    docs = frozenset(path for path in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if path)
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=docs)
    app.add_middleware(AccessLogMiddleware)


#: Where FHIR servers post subscription notifications (authenticated by a shared secret header).
NOTIFICATIONS_PATH = "/fhir/notifications"


def _notification_secret(settings: Settings) -> tuple[str, bytes] | None:
    secret = settings.service.subscription_secret
    if secret is None:
        return None
    return settings.service.subscription_secret_header, secret.get_secret_value().encode()


def _exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


# -- rate limit ------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per caller: ``per_minute`` requests at once, refilled at ``per_minute`` a minute.

    Args:
        per_minute: the budget of each caller.
        clock: monotonic seconds (tests move it).
        max_callers: above this many tracked callers, idle (full) buckets are forgotten.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_callers: int = 50_000):
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.per_minute = per_minute
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """Take one request from ``caller``'s budget; return 0, or the seconds until one is free."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                if len(self._buckets) > self._max_callers:
                    self._forget_idle(now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self._rate

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled completely behaves exactly like a new one: dropping it loses nothing.
        full = [
            k for k, (tokens, last) in self._buckets.items() if tokens + (now - last) * self._rate >= self._capacity
        ]
        for key in full:
            del self._buckets[key]


class CallerMiddleware:
    """Identify the caller of each request once, and refuse it with 429 when their budget is spent.

    Args:
        app: the wrapped ASGI app.
        authenticator: verifies the request's credentials.
        limiter: the per-caller limit, or None for no limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        limiter: RateLimiter | None,
        notification_secret: tuple[str, bytes] | None = None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.limiter = limiter
        self.notification_secret = notification_secret

    def _is_trusted_notification(self, scope: Scope) -> bool:
        """Return whether this is a notification carrying the configured secret.

        Those are not rate limited: the EHR's event rate sets their volume, a refused notification is
        a lost or delayed event, and each costs one insert (duplicates are dropped). Without the
        secret they count against the sender's address like any unauthenticated request.
        """
        path = scope["path"]
        if self.notification_secret is None or not (
            path == NOTIFICATIONS_PATH or path.startswith(NOTIFICATIONS_PATH + "/")
        ):
            return False
        header, secret = self.notification_secret
        presented = Headers(scope=scope).get(header)
        return presented is not None and hmac.compare_digest(presented.encode(), secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        identity: Principal | MedagentError
        try:
            identity = await self.authenticator.identify(Headers(scope=scope))
        except MedagentError as exc:
            # Kept for the route: only routes that need a caller turn it into 401/503.
            identity = exc
        scope[IDENTITY_SCOPE_KEY] = identity
        if self.limiter is not None and not self._is_trusted_notification(scope):
            caller = identity.caller_id if isinstance(identity, Principal) else f"addr:{_client_host(scope)}"
            wait = self.limiter.acquire(caller)
            if wait > 0:
                await _too_many_requests(self.limiter.per_minute, wait)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _too_many_requests(per_minute: int, wait_s: float) -> JSONResponse:
    retry_after = max(1, math.ceil(wait_s))
    problem = Problem(
        title="too many requests",
        status=429,
        detail=f"this caller's limit of {per_minute} requests per minute is used up; retry in {retry_after} s",
        code="rate_limited",
        extra={"retry_after_s": retry_after},
    )
    return JSONResponse(
        problem.model_dump(), status_code=429, media_type=PROBLEM_JSON, headers={"Retry-After": str(retry_after)}
    )


# -- security headers ------------------------------------------------------------------------------


class SecurityHeadersMiddleware:
    """Add the security headers to every response (a route's own CSP or Cache-Control is kept).

    Args:
        app: the wrapped ASGI app.
        docs_paths: the OpenAPI UI pages, which get a CSP that lets them load from their CDN.
    """

    def __init__(self, app: ASGIApp, *, docs_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CONTENT_SECURITY_POLICY if path in self.docs_paths else CONTENT_SECURITY_POLICY
        no_store = path.startswith(NO_STORE_PREFIXES)
        # Only a request that really came over TLS (scheme set by the server, or by its
        # --proxy-headers from a trusted proxy) may pin HTTPS; a header alone proves nothing.
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                headers.setdefault("Content-Security-Policy", csp)
                if no_store:
                    headers["Cache-Control"] = "no-store"
                if https:
                    headers["Strict-Transport-Security"] = HSTS
                if message["status"] == 401:
                    headers.setdefault("WWW-Authenticate", 'Bearer realm="medagent"')
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- access log ------------------------------------------------------------------------------------


class AccessLogMiddleware:
    """Log one PHI-free line per request: method, route template, status, duration, caller."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            # A failure before any response becomes the server's 500; a cancellation (the client
            # went away) is not an Exception and is logged as 499 below.
            if status is None:
                status = 500
            raise
        finally:
            self._log(scope, status, (time.perf_counter() - started) * 1000.0)

    @staticmethod
    def _log(scope: Scope, status: int | None, duration_ms: float) -> None:
        route = route_template(scope)
        caller = _caller_name(scope.get(IDENTITY_SCOPE_KEY))
        # No response at all: the client went away first (nginx's 499).
        shown_status = status if status is not None else 499
        access_log.info(
            "%s %s %d %.1fms caller=%s",
            scope["method"],
            route,
            shown_status,
            duration_ms,
            caller,
            extra={
                "http_method": scope["method"],
                "http_route": route,
                "http_status": shown_status,
                "duration_ms": round(duration_ms, 1),
                "caller": caller,
            },
        )


def _caller_name(identity: Any) -> str:
    if isinstance(identity, Principal):
        return identity.caller_id
    if isinstance(identity, MedagentError):
        return "unauthenticated"
    return "-"


def route_template(scope: Scope) -> str:
    """Return the route template a request matched (``/v1/runs/{run_id}``), never its concrete path.

    A request turned away before routing (rate limit, CORS preflight) is matched here against
    the app's routes; one that matches none is ``(unmatched)``.
    """
    route = scope.get("route")
    if route is None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        partial = None
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    if route is None:
        return "(unmatched)"
    if isinstance(route, Mount):
        return route.path_format.rstrip("/") + "/{path}"
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template) if template else "(unmatched)"
