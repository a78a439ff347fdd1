"""OIDC bearer tokens: verify a JWT against the identity provider's published keys (JWKS).

Where it sits: :mod:`agent.service.auth` hands it the value of ``Authorization: Bearer <JWT>``
when ``service.oidc.issuer`` is set; it returns who the caller is and which medagent roles the
token grants, or says exactly why the token is refused. It knows nothing of HTTP requests.

What is checked, and why:

- the signature, with asymmetric algorithms only (``none`` and the HMAC family are refused
  outright: an HS256 token "signed" with the provider's *public* key is the classic forgery);
- the key: chosen by ``kid`` from the JWKS, and it must fit the token's algorithm (key type,
  curve, its own ``alg``, ``use`` = sig), so an RSA key is never used for another family;
- ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` (with ``leeway_s`` for clock drift);
- the user claim is a non-empty string; roles come from a (dotted) claim and only known
  medagent roles are kept.

The JWKS is fetched over httpx (from ``jwks_url``, or discovered at
``{issuer}/.well-known/openid-configuration``), cached for ``jwks_cache_s`` and refetched once,
at most every :data:`UNKNOWN_KID_REFETCH_S`, when a token names a key it does not hold (key
rotation). When the provider cannot be reached, cached keys keep working for a grace period
(:data:`STALE_GRACE_S`); without usable keys the caller gets 503, not 401: the token may be fine.
Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)

from agent.config import OidcSettings, Role
from agent.errors import ConfigError, MedagentError
from agent.sources.http_clients import async_client

log = logging.getLogger(__name__)

KNOWN_ROLES: frozenset[str] = frozenset({"clinician", "auditor", "admin", "service"})

#: Asymmetric JWS algorithms, by the JWK key type (and curve) each needs.
_KEY_FOR_ALG: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}

#: Least time between two JWKS refetches caused by an unknown ``kid`` (a flood of forged kids
#: must not turn into a flood of requests to the identity provider).
UNKNOWN_KID_REFETCH_S = 10.0
#: How long keys fetched earlier still verify tokens while the provider cannot be reached.
STALE_GRACE_S = 3600.0
#: After a failed fetch, how long callers are answered 503 at once instead of waiting again.
FAILED_FETCH_BACKOFF_S = 5.0
#: Bound on a JWKS or discovery document (real ones are a few kB).
MAX_DOCUMENT_BYTES = 1_000_000


class TokenRejectedError(MedagentError):
    """The bearer token is not acceptable: malformed, forged, expired, or meant for someone else."""

    code = "invalid_token"
    exit_code = 2
    http_status = 401


class IdentityProviderUnavailableError(MedagentError):
    """The identity provider's signing keys could not be fetched, so no token can be checked now."""

    code = "identity_provider_unavailable"
    exit_code = 4
    http_status = 503


@dataclass(frozen=True)
class VerifiedToken:
    """What a verified token says: the user, the medagent roles it grants, and its claims."""

    user: str
    subject: str
    issuer: str
    roles: list[Role]
    claims: dict[str, Any] = field(repr=False)


def looks_like_jwt(value: str) -> bool:
    """Return whether ``value`` is shaped like a compact JWS (three parts, a JSON header with ``alg``)."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[0]:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


def roles_from_claims(claims: Mapping[str, Any], path: str) -> list[Role]:
    """Return the known medagent roles at the dotted ``path`` (a list, or a space-separated string)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    if isinstance(value, str):
        names = value.split()
    elif isinstance(value, list):
        names = [item for item in value if isinstance(item, str)]
    else:
        return []
    roles: list[Role] = []
    for name in names:
        if name in KNOWN_ROLES and name not in roles:
            roles.append(cast(Role, name))
    return roles


def _check_fetch_url(url: str, what: str) -> None:
    """Refuse a plain-http key source unless it is on this machine: keys decide who gets in."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    host = parts.hostname or ""
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):  # not an IP address: only "localhost" counts
        loopback = loopback or ip_address(host).is_loopback
    if parts.scheme != "http" or not loopback:
        raise ConfigError(f"oidc {what} must be an https URL (plain http only on loopback): {url}")


def allowed_algorithms(settings: OidcSettings) -> list[str]:
    """Return the configured algorithms, refusing ``none``, HMAC and anything not asymmetric.

    Raises:
        ConfigError: an algorithm that could let a forged token through is configured.
    """
    bad = [alg for alg in settings.algorithms if alg not in _KEY_FOR_ALG]
    if bad:
        raise ConfigError(
            f"oidc.algorithms may hold only asymmetric JWS algorithms ({', '.join(_KEY_FOR_ALG)}), not {bad}"
        )
    if not settings.algorithms:
        raise ConfigError("oidc.algorithms is empty")
    return list(settings.algorithms)


def check_oidc_settings(settings: OidcSettings) -> None:
    """Refuse OIDC settings that are incomplete or unsafe (called when the app is built).

    Raises:
        ConfigError: naming the setting to fix.
    """
    if not settings.issuer:
        return
    if not settings.audience:
        # Without an audience check, any token the provider issues for any other app would work here.
        raise ConfigError("oidc.audience is required when oidc.issuer is set (MEDAGENT_SERVICE__OIDC__AUDIENCE)")
    allowed_algorithms(settings)
    if settings.jwks_url:
        _check_fetch_url(settings.jwks_url, "jwks_url")
    else:
        _check_fetch_url(settings.issuer, "issuer (the JWKS is discovered from it)")


@dataclass
class _KeySet:
    keys: list[dict[str, Any]]
    fetched_at: float


class OidcVerifier:
    """Verify OIDC bearer tokens for one issuer, with a cached JWKS (one per app).

    Args:
        settings: the ``service.oidc`` group (``issuer`` must be set).
        timeout_s: the limit on each request to the identity provider.
        clock: monotonic seconds, for the cache (tests move it).
    """

    def __init__(
        self, settings: OidcSettings, *, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not settings.issuer:
            raise ConfigError("oidc.issuer is not set")
        check_oidc_settings(settings)
        self.settings = settings
        self.issuer: str = settings.issuer
        self.algorithms = allowed_algorithms(settings)
        self._timeout_s = timeout_s
        self._clock = clock
        self._keys: _KeySet | None = None
        self._jwks_uri: str | None = settings.jwks_url
        self._last_forced_fetch = float("-inf")
        self._failed_until = float("-inf")
        self._last_failure = ""
        self._inflight: asyncio.Task[_KeySet] | None = None
        #: How many times the JWKS was fetched (tests and diagnostics).
        self.fetches = 0

    # -- verification ----------------------------------------------------------------------------

    async def verify(self, token: str) -> VerifiedToken:
        """Return what a valid token says about its bearer.

        Raises:
            TokenRejectedError: the token is malformed, forged, expired, or not for this API.
            IdentityProviderUnavailableError: no usable signing keys could be fetched.
        """
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError as exc:
            raise TokenRejectedError("the bearer token is not a well-formed JWT") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise TokenRejectedError(
                f"tokens signed with alg {shown!r} are not accepted (only {', '.join(self.algorithms)})"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejectedError("the token's kid is not a string")
        try:
            # Unverified, and used only to refuse early: a token that is not even for this issuer
            # must not cost a JWKS refetch (its kid is naturally unknown here).
            unverified = jwt.decode(token, options={"verify_signature": False})
        except InvalidTokenError as exc:
            raise TokenRejectedError("the bearer token is not a well-formed JWT") from exc
        if unverified.get("iss") != self.issuer:
            raise TokenRejectedError("the token was issued by another issuer (iss)")
        jwk = await self._key_for(kid)
        key = self._key_for_alg(jwk, alg, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.issuer,
                leeway=self.settings.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud"], "verify_signature": True},
            )
        except ExpiredSignatureError as exc:
            raise TokenRejectedError("the token has expired") from exc
        except InvalidAudienceError as exc:
            raise TokenRejectedError("the token's audience (aud) is not this API") from exc
        except InvalidIssuerError as exc:
            raise TokenRejectedError("the token was issued by another issuer (iss)") from exc
        except InvalidSignatureError as exc:
            raise TokenRejectedError("the token's signature does not verify") from exc
        except ImmatureSignatureError as exc:
            raise TokenRejectedError("the token is not valid yet (nbf or iat is in the future)") from exc
        except InvalidIssuedAtError as exc:
            raise TokenRejectedError("the token's iat is not a time") from exc
        except MissingRequiredClaimError as exc:
            raise TokenRejectedError(f"the token lacks the {exc.claim} claim") from exc
        except PyJWTError as exc:  # any other refusal PyJWT knows of
            raise TokenRejectedError("the bearer token is not valid") from exc
        subject = claims.get("sub")
        user = claims.get(self.settings.user_claim)
        if not isinstance(user, str) or not user.strip() or len(user) > 256:
            raise TokenRejectedError(f"the token lacks the user claim {self.settings.user_claim!r}")
        return VerifiedToken(
            user=user,
            subject=subject if isinstance(subject, str) and subject else user,
            issuer=self.issuer,
            roles=roles_from_claims(claims, self.settings.roles_claim),
            claims=claims,
        )

    def _key_for_alg(self, jwk: dict[str, Any], alg: str, kid: str | None) -> jwt.PyJWK:
        """Return the JWK as a key bound to ``alg``, refusing a key of another family or purpose."""
        kty, crv = _KEY_FOR_ALG[alg]
        shown = f"key {kid!r}" if kid else "the signing key"
        if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
            raise TokenRejectedError(f"{shown} does not fit alg {alg}")
        if jwk.get("alg") not in (None, alg):
            raise TokenRejectedError(f"{shown} is published for alg {jwk.get('alg')}, not {alg}")
        if jwk.get("use") not in (None, "sig"):
            raise TokenRejectedError(f"{shown} is not a signing key")
        try:
            return jwt.PyJWK(jwk, algorithm=alg)
        except (PyJWKError, ValueError, TypeError) as exc:
            raise TokenRejectedError(f"{shown} in the issuer's JWKS cannot be used") from exc

    # -- the key set ----------------------------------------------------------------------------

    async def _key_for(self, kid: str | None) -> dict[str, Any]:
        keys = await self._current_keys()
        found = self._pick(keys, kid)
        if found is not None:
            return found
        now = self._clock()
        if now - self._last_forced_fetch >= UNKNOWN_KID_REFETCH_S:
            # Perhaps the provider rotated its keys since the cache was filled: look once more.
            self._last_forced_fetch = now
            log.info("oidc: token names a key not in the cached JWKS; refetching it")
            keys = await self._fetch_shared()
            found = self._pick(keys, kid)
            if found is not None:
                return found
        if kid is None:
            raise TokenRejectedError("the token has no kid and the issuer's JWKS has several keys")
        shown = kid if len(kid) <= 64 else kid[:64] + "..."
        raise TokenRejectedError(f"the token's signing key {shown!r} is not in the issuer's JWKS (unknown kid)")

    @staticmethod
    def _pick(keys: _KeySet, kid: str | None) -> dict[str, Any] | None:
        if kid is not None:
            return next((jwk for jwk in keys.keys if jwk.get("kid") == kid), None)
        # No kid: acceptable only when the provider publishes exactly one key.
        return keys.keys[0] if len(keys.keys) == 1 else None

    async def _current_keys(self) -> _KeySet:
        now = self._clock()
        cached = self._keys
        if cached is not None and now - cached.fetched_at < self.settings.jwks_cache_s:
            return cached
        if now < self._failed_until:
            if cached is not None and now - cached.fetched_at < self.settings.jwks_cache_s + STALE_GRACE_S:
                return cached
            raise IdentityProviderUnavailableError(self._last_failure)
        try:
            return await self._fetch_shared()
        except IdentityProviderUnavailableError:
            if cached is not None and now - cached.fetched_at < self.settings.jwks_cache_s + STALE_GRACE_S:
                log.warning("oidc: JWKS refresh failed; still verifying with the keys fetched earlier")
                return cached
            raise

    async def _fetch_shared(self) -> _KeySet:
        """Fetch the JWKS, sharing one request among the callers that need it at the same moment."""
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._fetch())
            # Its failure reaches every awaiting caller; this keeps asyncio from also reporting it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._inflight = task
        # shield: one caller going away (client disconnect) must not cancel the others' fetch.
        return await asyncio.shield(task)

    async def _fetch(self) -> _KeySet:
        try:
            async with async_client(timeout=self._timeout_s, follow_redirects=False) as client:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover(client)
                document = await _get_json(client, self._jwks_uri, "JWKS")
        except IdentityProviderUnavailableError as exc:
            self._failed_until = self._clock() + FAILED_FETCH_BACKOFF_S
            self._last_failure = exc.message
            log.warning("oidc: %s", exc.message)
            raise
        keys = _usable_keys(document)
        self.fetches += 1
        key_set = _KeySet(keys=keys, fetched_at=self._clock())
        self._keys = key_set
        self._failed_until = float("-inf")
        return key_set

    async def _discover(self, client: httpx.AsyncClient) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await _get_json(client, url, "OpenID configuration")
        if document.get("issuer") != self.issuer:
            # OpenID Connect Discovery 1.0, section 4.3: the document must name this very issuer.
            raise IdentityProviderUnavailableError("the OpenID configuration names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise IdentityProviderUnavailableError("the OpenID configuration has no jwks_uri")
        try:
            _check_fetch_url(jwks_uri, "jwks_uri")
        except ConfigError as exc:
            raise IdentityProviderUnavailableError(exc.message) from exc
        return jwks_uri


async def _get_json(client: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
    try:
        response = await client.get(url, headers={"Accept": "application/json"})
    except httpx.TimeoutException as exc:
        raise IdentityProviderUnavailableError(f"the identity provider's {what} timed out") from exc
    except httpx.HTTPError as exc:
        raise IdentityProviderUnavailableError(
            f"the identity provider's {what} could not be fetched ({type(exc).__name__})"
        ) from exc
    if response.status_code != 200:
        raise IdentityProviderUnavailableError(
            f"the identity provider's {what} could not be fetched (HTTP {response.status_code})"
        )
    if len(response.content) > MAX_DOCUMENT_BYTES:
        raise IdentityProviderUnavailableError(f"the identity provider's {what} is too large")
    try:
        document = response.json()
    except ValueError as exc:
        raise IdentityProviderUnavailableError(f"the identity provider's {what} is not JSON") from exc
    if not isinstance(document, dict):
        raise IdentityProviderUnavailableError(f"the identity provider's {what} is not a JSON object")
    return document


def _usable_keys(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise IdentityProviderUnavailableError("the identity provider's JWKS has no keys list")
    # Symmetric ("oct") or private material has no place in a published key set: skip it.
    return [jwk for jwk in keys if isinstance(jwk, dict) and jwk.get("kty") in ("RSA", "EC", "OKP") and "d" not in jwk]
