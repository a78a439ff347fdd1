"""SMART on FHIR Backend Services: an ``httpx.Auth`` that fetches and renews OAuth access tokens.

Where it sits: the FHIR client (:class:`agent.sources.fhir_http.HttpFhirSource`) sends every
request through an ``httpx.AsyncClient``; when the FHIR server is a hospital EHR (Epic, Cerner,
cloud FHIR services) that client's ``auth`` is a :class:`SmartBackendAuth`. It follows the SMART
App Launch "Backend Services" profile (client credentials grant, ``private_key_jwt`` client
authentication):

1. discover the token endpoint from ``{fhir_base}/.well-known/smart-configuration`` (once);
2. sign a short-lived JWT client assertion (RS384 or ES384) with the client's private key;
3. POST it to the token endpoint and cache the access token until shortly before it expires;
4. send ``Authorization: Bearer <token>``; on a 401, refresh once and retry the request once.

The matching public key is registered with the EHR as a JWK Set (:func:`public_jwks`). Error
messages name the server, the client id and the OAuth ``error`` / ``error_description``; they
never contain the assertion, the key or a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.config import FhirSettings
from agent.errors import ConfigError, SourceUnavailableError
from agent.sources.http_clients import async_client

logger = logging.getLogger(__name__)

Algorithm = Literal["RS384", "ES384"]
SUPPORTED_ALGORITHMS: tuple[Algorithm, ...] = ("RS384", "ES384")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPES = "system/*.rs"
#: SMART Backend Services caps an assertion's lifetime at five minutes.
MAX_ASSERTION_LIFETIME_S = 300
#: Used when a token answer has no ``expires_in``: SMART recommends tokens of about five minutes,
#: and assuming longer would keep sending a token the server already dropped.
DEFAULT_EXPIRES_IN_S = 300.0
_ES384_COORDINATE_BYTES = 48
_MAX_DESCRIPTION_CHARS = 200

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    """Return ``data`` as unpadded base64url text (the JOSE encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64url(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


def load_private_key(private_key_pem: bytes, algorithm: str) -> PrivateKey:
    """Load a PEM private key and check that it can sign with ``algorithm``.

    Args:
        private_key_pem: an unencrypted PKCS#8 or traditional PEM private key.
        algorithm: ``"RS384"`` (RSA, at least 2048 bits) or ``"ES384"`` (EC on P-384).

    Raises:
        ConfigError: the algorithm is not supported, the PEM cannot be read, or the key's type
            does not fit the algorithm.
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(f"SMART signing algorithm {algorithm!r} is not supported; use RS384 or ES384")
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The exception text can quote parts of the file; only its kind is safe to repeat.
        kind = type(exc).__name__
        raise ConfigError(f"the SMART private key could not be read as an unencrypted PEM key ({kind})") from exc
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"SMART algorithm RS384 needs an RSA private key, not {_key_kind(key)}")
        if key.key_size < 2048:
            raise ConfigError(f"SMART algorithm RS384 needs an RSA key of at least 2048 bits, not {key.key_size}")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"SMART algorithm ES384 needs an EC private key on P-384, not {_key_kind(key)}")
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on {key.curve.name}"
    return f"a {type(key).__name__.lstrip('_')}"


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """Return the required members of the public key's JWK (RFC 7517/7518), without ``kid``."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "RSA", "n": _int_b64url(numbers.n), "e": _int_b64url(numbers.e)}
    point = key.public_key().public_numbers()
    # RFC 7518 section 6.2.1.2: coordinates are full-length, left-padded, for the curve.
    return {
        "kty": "EC",
        "crv": "P-384",
        "x": _int_b64url(point.x, _ES384_COORDINATE_BYTES),
        "y": _int_b64url(point.y, _ES384_COORDINATE_BYTES),
    }


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of a public RSA or EC JWK, base64url encoded."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_jwks(private_key_pem: bytes, algorithm: str = "RS384", key_id: str | None = None) -> dict[str, Any]:
    """Return the JWK Set a client registers with the EHR for this private key.

    Args:
        private_key_pem: the client's PEM private key (only its public half is exported).
        algorithm: ``"RS384"`` or ``"ES384"``.
        key_id: the ``kid``; defaults to the RFC 7638 thumbprint, as :class:`SmartBackendAuth` does.

    Raises:
        ConfigError: the key cannot be read or does not fit the algorithm.
    """
    jwk: dict[str, Any] = public_jwk(load_private_key(private_key_pem, algorithm))
    jwk.update({"kid": key_id or jwk_thumbprint(jwk), "alg": algorithm, "use": "sig", "key_ops": ["verify"]})
    return {"keys": [jwk]}


def sign_jws(key: PrivateKey, algorithm: str, signing_input: bytes) -> bytes:
    """Return the JWS signature of ``signing_input``: PKCS#1 v1.5 for RS384, raw r||s for ES384."""
    if algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
    if algorithm == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey):
        # cryptography returns DER; JOSE (RFC 7518 section 3.4) wants the two 48-byte integers.
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        return r.to_bytes(_ES384_COORDINATE_BYTES, "big") + s.to_bytes(_ES384_COORDINATE_BYTES, "big")
    raise ConfigError(f"SMART algorithm {algorithm} cannot sign with {_key_kind(key)}")


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float
    expires_at: float


class SmartBackendAuth(httpx.Auth):
    """Authenticate ``httpx.AsyncClient`` requests with SMART Backend Services access tokens.

    Use it as the client's ``auth``: ``httpx.AsyncClient(auth=SmartBackendAuth(...))``. Tokens are
    fetched on first use, shared by concurrent requests (one refresh at a time), renewed when less
    than ``renew_before_s`` of their lifetime remains, and refreshed once when the FHIR server
    answers 401 (the request is then retried once; a second 401 goes back to the caller).

    Args:
        fhir_base_url: the FHIR base; discovery reads ``{fhir_base_url}/.well-known/smart-configuration``.
        client_id: the client id the EHR assigned at registration (``iss`` and ``sub`` of the assertion).
        private_key_pem: the client's PEM private key (RSA >= 2048 bits for RS384, P-384 for ES384).
        algorithm: ``"RS384"`` or ``"ES384"``.
        key_id: the ``kid`` sent in the assertion header; defaults to the key's RFC 7638 thumbprint.
        scopes: the space-separated scopes requested, e.g. ``"system/*.rs"``.
        token_url: the token endpoint; when set, discovery is skipped.
        renew_before_s: renew a token when less than this many seconds of it remain (capped at half
            its lifetime, so a short-lived token is not renewed on every request).
        clock: returns the current Unix time in seconds (tests pass a controllable one).
        timeout_s: timeout of discovery and token requests.

    Raises:
        ConfigError: the key cannot be read or does not fit the algorithm, or an argument is invalid.
    """

    # The request is replayed after a 401, so its body must be in memory.
    requires_request_body = True

    def __init__(
        self,
        fhir_base_url: str,
        client_id: str,
        private_key_pem: bytes,
        *,
        algorithm: Algorithm = "RS384",
        key_id: str | None = None,
        scopes: str = DEFAULT_SCOPES,
        token_url: str | None = None,
        renew_before_s: float = 60,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 30,
    ) -> None:
        if not client_id:
            raise ConfigError("SMART backend auth needs a client id")
        if renew_before_s < 0:
            raise ConfigError("SMART renew_before_s must not be negative")
        self._key = load_private_key(private_key_pem, algorithm)
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.client_id = client_id
        self.algorithm: Algorithm = algorithm
        self.key_id = key_id or jwk_thumbprint(public_jwk(self._key))
        self.scopes = scopes
        self._token_url = token_url
        self._renew_before_s = renew_before_s
        self._clock = clock
        self._timeout_s = timeout_s
        self._token: _Token | None = None
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_files(
        cls,
        fhir_base_url: str,
        client_id: str,
        private_key_path: str | Path,
        **kwargs: Any,
    ) -> SmartBackendAuth:
        """Build the auth with the private key read from a PEM file; other arguments as the constructor.

        Raises:
            ConfigError: the file cannot be read, or the key is unusable.
        """
        path = Path(private_key_path)
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"the SMART private key file {path} cannot be read: {exc.strerror or exc}") from exc
        return cls(fhir_base_url, client_id, pem, **kwargs)

    # -- httpx.Auth --------------------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Refuse synchronous use: token refresh is asynchronous and guarded by an asyncio lock."""
        raise RuntimeError("SmartBackendAuth works with httpx.AsyncClient only")
        yield request  # pragma: no cover - makes this a generator, as httpx expects

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send the request with a bearer token; on a 401, refresh the token once and resend.

        Raises:
            SourceUnavailableError: discovery or the token endpoint failed (unreachable, non-2xx,
                no access token).
            ConfigError: the server does not offer ``private_key_jwt`` or the algorithm.
        """
        token = await self.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        # The server dropped the token (revoked, restarted, clock skew): one fresh token, one retry.
        token = await self.access_token(stale=token)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    # -- tokens ------------------------------------------------------------------------------------

    async def access_token(self, *, stale: str | None = None) -> str:
        """Return a usable access token, fetching a new one when none is cached or it is due for renewal.

        Args:
            stale: a token the server refused; when it is still the cached one, a new one is fetched.
                When another request already replaced it, the replacement is returned without a
                second fetch.

        A renewal that fails while the cached token has not yet expired keeps that token (with a
        warning) and is tried again on the next request; a first fetch or a refresh after a 401
        that fails raises.

        Raises:
            SourceUnavailableError: discovery or the token request failed.
            ConfigError: the server does not support this client's authentication.
        """
        if self._lock is None:
            # Created lazily so the lock belongs to the loop that first uses it.
            self._lock = asyncio.Lock()
        async with self._lock:
            token = self._token
            usable = token is not None and token.value != stale
            if token is not None and usable and self._clock() < token.renew_at:
                return token.value
            try:
                self._token = await self._fetch_token()
            except SourceUnavailableError as exc:
                # Renewing early exists to ride out exactly this: while the old token has not
                # expired, keep using it and try again on the next request.
                if token is not None and usable and self._clock() < token.expires_at:
                    logger.warning("SMART token renewal failed, using the current token until it expires: %s", exc)
                    return token.value
                self._token = None
                raise
            return self._token.value

    async def token_endpoint(self) -> str:
        """Return the token endpoint: the configured one, or the one discovered (and cached).

        Raises:
            SourceUnavailableError: the SMART configuration cannot be fetched or has no token endpoint.
            ConfigError: the server lists its client authentication methods or signing algorithms
                and ``private_key_jwt`` or this client's algorithm is not among them.
        """
        if self._token_url is None:
            self._token_url = await self._discover()
        return self._token_url

    def client_assertion(
        self,
        audience: str,
        *,
        jti: str | None = None,
        issued_at: float | None = None,
        lifetime_s: float = MAX_ASSERTION_LIFETIME_S,
    ) -> str:
        """Return a signed JWT client assertion for the token endpoint ``audience``.

        Args:
            audience: the token endpoint URL (the ``aud`` claim).
            jti: the unique token id; a fresh UUID4 by default (tests pass a fixed one to replay).
            issued_at: the ``iat`` in Unix seconds; the clock by default.
            lifetime_s: seconds from ``iat`` to ``exp``; SMART allows at most 300.
        """
        now = int(self._clock() if issued_at is None else issued_at)
        header = {"alg": self.algorithm, "kid": self.key_id, "typ": "JWT"}
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + int(lifetime_s),
            "jti": jti or str(uuid.uuid4()),
        }
        signing_input = f"{_b64json(header)}.{_b64json(claims)}".encode("ascii")
        signature = sign_jws(self._key, self.algorithm, signing_input)
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    async def _fetch_token(self) -> _Token:
        token_url = await self.token_endpoint()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scopes,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(token_url),
        }
        started = self._clock()
        response = await self._send("POST", token_url, "SMART token endpoint", data=form)
        if not response.is_success:
            raise SourceUnavailableError(self._refusal(token_url, response), details=_oauth_details(response))
        data = _json_object(response)
        access_token = data.get("access_token") if data is not None else None
        if data is None or not isinstance(access_token, str) or not access_token:
            raise SourceUnavailableError(
                f"SMART token endpoint {token_url} answered HTTP {response.status_code} without an access token "
                f"for client {self.client_id!r}",
                details={"status": response.status_code},
            )
        token_type = data.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise SourceUnavailableError(
                f"SMART token endpoint {token_url} issued a {str(token_type)[:40]!r} token, not a bearer token",
                details={"status": response.status_code},
            )
        expires_in = data.get("expires_in", DEFAULT_EXPIRES_IN_S)
        if isinstance(expires_in, str):
            # Some servers send the number as a string; anything unreadable falls back to the default.
            try:
                expires_in = float(expires_in)
            except ValueError:
                expires_in = DEFAULT_EXPIRES_IN_S
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN_S
        # Counted from when the request was sent, so the time on the wire is not counted as valid.
        margin = min(self._renew_before_s, expires_in / 2)
        return _Token(access_token, started + expires_in - margin, started + expires_in)

    async def _discover(self) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        response = await self._send("GET", url, "SMART configuration")
        if not response.is_success:
            raise SourceUnavailableError(
                f"SMART configuration {url} answered HTTP {response.status_code}; set the token URL to skip discovery",
                details={"status": response.status_code},
            )
        data = _json_object(response)
        endpoint = data.get("token_endpoint") if data is not None else None
        if data is None or not isinstance(endpoint, str) or not endpoint:
            raise SourceUnavailableError(f"SMART configuration {url} has no token_endpoint")
        methods = data.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            raise ConfigError(
                f"the FHIR server {self.fhir_base_url} does not accept private_key_jwt client authentication "
                f"(it lists {', '.join(map(str, methods[:10])) or 'none'}); SMART backend services need it"
            )
        algorithms = data.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algorithms, list) and self.algorithm not in algorithms:
            raise ConfigError(
                f"the FHIR server {self.fhir_base_url} does not accept {self.algorithm} client assertions "
                f"(it lists {', '.join(map(str, algorithms[:10])) or 'none'})"
            )
        return endpoint

    async def _send(self, method: str, url: str, what: str, *, data: dict[str, str] | None = None) -> httpx.Response:
        """Send one discovery or token request on a short-lived client of its own.

        A separate client keeps token requests out of the FHIR client's auth flow (no recursion)
        and its own timeout; they are rare (once per token lifetime), so no pool is kept.
        """
        try:
            async with async_client(timeout=httpx.Timeout(self._timeout_s)) as client:
                return await client.request(method, url, data=data, headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise SourceUnavailableError(f"{what} {url} timed out after {self._timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            # The text of a transport error names the host and the OS error, never the request body.
            reason = str(exc) or type(exc).__name__
            raise SourceUnavailableError(f"{what} {url} could not be reached: {reason}") from exc

    def _refusal(self, token_url: str, response: httpx.Response) -> str:
        details = _oauth_details(response)
        message = (
            f"SMART token endpoint {token_url} refused client {self.client_id!r} (HTTP {response.status_code}"
            + (f", {details['oauth_error']}" if "oauth_error" in details else "")
            + ")"
        )
        if "oauth_error_description" in details:
            message += f": {details['oauth_error_description']}"
        return message


def _b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _oauth_details(response: httpx.Response) -> dict[str, Any]:
    """Return the status and the RFC 6749 ``error`` / ``error_description`` of an answer, shortened."""
    details: dict[str, Any] = {"status": response.status_code}
    data = _json_object(response)
    if data is None:
        return details
    for field, key in (("error", "oauth_error"), ("error_description", "oauth_error_description")):
        value = data.get(field)
        if isinstance(value, str) and value:
            details[key] = value[:_MAX_DESCRIPTION_CHARS]
    return details


def smart_auth_from_settings(settings: FhirSettings) -> SmartBackendAuth | None:
    """Return the SMART Backend Services auth the ``fhir`` settings describe, or None when not configured.

    The key is read and checked here, so a bad key fails when the client is built.
    """
    if not (settings.base_url and settings.smart_client_id and settings.smart_private_key_file):
        return None
    return SmartBackendAuth.from_files(
        settings.base_url,
        settings.smart_client_id,
        settings.smart_private_key_file,
        algorithm=settings.smart_algorithm,
        key_id=settings.smart_key_id,
        scopes=settings.smart_scopes,
        token_url=settings.smart_token_url,
        renew_before_s=settings.smart_renew_before_s,
        timeout_s=settings.timeout_s,
    )
