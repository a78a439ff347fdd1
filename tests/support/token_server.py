"""A real SMART Backend Services authorisation server and protected FHIR gateway, for tests.

Where it sits: tests of :mod:`agent.sources.smart_auth` start it on 127.0.0.1 in front of the
session's live FHIR engine (``fhir_server``). It plays the EHR's part:

- ``GET /.well-known/smart-configuration`` names the token endpoint;
- ``POST /auth/token`` runs the client credentials grant and checks the ``private_key_jwt``
  client assertion for real: the signature against the client's registered JWK Set (RS384 or
  ES384), ``iss == sub == client_id``, ``aud`` equal to its own token URL, ``exp`` in the future
  and at most 300 s away (and after ``iat`` by at most 300 s), a ``jti`` never seen before, and
  the exact ``grant_type`` and ``client_assertion_type``; it answers RFC 6749 errors otherwise;
- every other path is forwarded to the FHIR engine, but only with ``Authorization: Bearer`` and
  a token it issued that has not expired; anything else gets 401.

Example::

    with TokenServer(fhir_server.base_url) as server:
        server.register("client-1", public_jwks(pem, "RS384"))
        ...  # HttpFhirSource(server.base_url, client=httpx.AsyncClient(auth=SmartBackendAuth(...)))
        assert server.issued == 1
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.support.http_handlers import LoopbackServer, send

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300


class OAuthError(Exception):
    """A refused token request: the RFC 6749 ``error`` code, its description and HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass
class GatewayRecord:
    """One request to the protected FHIR gateway: its path and the status sent back."""

    method: str
    path: str
    status: int


def _b64url_decode(text: str) -> bytes:
    if not text or any(c in text for c in "=+/"):
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_int(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


def _verify_signature(jwk: dict[str, Any], alg: str, signing_input: bytes, signature: bytes) -> None:
    """Raise OAuthError unless ``signature`` is a valid ``alg`` signature by the JWK's key."""
    try:
        if alg == "RS384" and jwk.get("kty") == "RSA":
            rsa_key = rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
            rsa_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA384())
            return
        if alg == "ES384" and jwk.get("kty") == "EC" and jwk.get("crv") == "P-384":
            if len(signature) != 96:
                raise OAuthError("invalid_client", "an ES384 signature is 96 bytes (r||s)", 401)
            ec_key = ec.EllipticCurvePublicNumbers(
                _b64url_int(jwk["x"]), _b64url_int(jwk["y"]), ec.SECP384R1()
            ).public_key()
            der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
            ec_key.verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
            return
    except InvalidSignature as exc:
        raise OAuthError("invalid_client", "the client assertion signature does not verify", 401) from exc
    except (KeyError, ValueError) as exc:
        raise OAuthError("invalid_client", "the registered key cannot be used", 401) from exc
    raise OAuthError("invalid_client", f"the registered key does not fit alg {alg}", 401)


class TokenServer(LoopbackServer):
    """A threaded SMART authorisation server and bearer-protected proxy on 127.0.0.1.

    Args:
        upstream: the FHIR engine's base URL (plain ``http``, no path prefix).
        expires_in: lifetime in seconds of each access token issued (short for renewal tests).
        clock: the server's notion of now, in Unix seconds (tests share one with the client).
        max_skew_s: how far past ``now + 300`` an assertion's ``exp`` may be (client clocks drift).
        timeout_s: how long to wait on the upstream for one forwarded request.
    """

    thread_name = "token-server"

    def __init__(
        self,
        upstream: str,
        *,
        expires_in: int = 300,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = 5.0,
        timeout_s: float = 10.0,
    ) -> None:
        parts = urlsplit(upstream.rstrip("/"))
        if parts.scheme != "http" or not parts.hostname or parts.path:
            raise ValueError(f"TokenServer forwards to a plain http root only, not {upstream!r}")
        super().__init__(parts.hostname, parts.port or 80, timeout_s)
        self.expires_in = expires_in
        self._clock = clock
        self._max_skew_s = max_skew_s
        self._lock = threading.Lock()
        self._clients: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, float] = {}
        self._seen_jti: set[str] = set()
        #: Answered to ``/.well-known/smart-configuration`` after ``token_endpoint`` (tests change it).
        self.smart_configuration_extra: dict[str, Any] = {
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.rs", "system/*.read"],
            "capabilities": ["client-confidential-asymmetric"],
        }
        #: When set, the gateway answers 401 to every request (a server that never takes a token).
        self.refuse_all_tokens = False
        self.issued = 0
        self.discoveries = 0
        self.rejections: list[OAuthError] = []
        self.gateway: list[GatewayRecord] = []
        self.base_url = ""
        self.token_url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start listening on a free 127.0.0.1 port and serving in a daemon thread."""
        super().start()
        self.base_url = self.origin
        self.token_url = f"{self.base_url}/auth/token"
        return self

    # -- registration and state ------------------------------------------------------------------

    def register(self, client_id: str, jwks: dict[str, Any]) -> None:
        """Register a client with the JWK Set of its public keys."""
        with self._lock:
            self._clients[client_id] = jwks

    def revoke_all(self) -> None:
        """Forget every issued token, so the next gateway request with one gets 401."""
        with self._lock:
            self._tokens.clear()

    def errors(self) -> list[str]:
        """Return the ``error`` code of each refused token request, in order."""
        with self._lock:
            return [r.error for r in self.rejections]

    # -- the token endpoint ----------------------------------------------------------------------

    def issue(self, content_type: str, body: bytes) -> dict[str, Any]:
        """Run one client credentials grant; return the token answer or raise OAuthError."""
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "the token request must be form-encoded")
        try:
            form = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise OAuthError("invalid_request", "the form cannot be parsed") from exc
        if any(len(values) != 1 for values in form.values()):
            raise OAuthError("invalid_request", "a parameter is repeated")
        fields = {name: values[0] for name, values in form.items()}
        if fields.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        if fields.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise OAuthError("invalid_request", "client_assertion_type must be jwt-bearer")
        scope = fields.get("scope", "")
        if not scope:
            raise OAuthError("invalid_scope", "a scope is required")
        self._check_assertion(fields.get("client_assertion", ""))
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._clock() + self.expires_in
            self.issued += 1
        return {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in, "scope": scope}

    def _check_assertion(self, assertion: str) -> str:
        """Return the client id of a valid assertion, or raise OAuthError (invalid_client, 401)."""

        def refuse(description: str) -> OAuthError:
            return OAuthError("invalid_client", description, 401)

        parts = assertion.split(".")
        if len(parts) != 3:
            raise refuse("the client assertion is not a compact JWS")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error) as exc:
            raise refuse("the client assertion cannot be decoded") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise refuse("the client assertion header and claims must be JSON objects")
        alg = header.get("alg")
        if alg not in ("RS384", "ES384"):
            raise refuse(f"alg {alg!r} is not accepted")
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id:
            raise refuse("iss and sub must both be the client id")
        with self._lock:
            jwks = self._clients.get(client_id)
        if jwks is None:
            raise refuse("unknown client")
        keys = [k for k in jwks.get("keys", []) if header.get("kid") is None or k.get("kid") == header.get("kid")]
        if not keys:
            raise refuse("no registered key has this kid")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        _verify_signature(keys[0], str(alg), signing_input, signature)
        audience = claims.get("aud")
        if audience != self.token_url and not (isinstance(audience, list) and self.token_url in audience):
            raise refuse("aud is not this token endpoint")
        now = self._clock()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise refuse("exp is missing")
        if exp <= now:
            raise refuse("the client assertion has expired")
        if exp > now + MAX_ASSERTION_LIFETIME_S + self._max_skew_s:
            raise refuse("exp is more than 300 s away")
        if iat is not None and (not isinstance(iat, int | float) or exp - iat > MAX_ASSERTION_LIFETIME_S):
            raise refuse("the client assertion lives longer than 300 s")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise refuse("jti is missing")
        with self._lock:
            if jti in self._seen_jti:
                raise refuse("jti was already used (replay)")
            self._seen_jti.add(jti)
        return client_id

    # -- the protected gateway -------------------------------------------------------------------

    def token_valid(self, authorization: str | None) -> bool:
        """Return whether an ``Authorization`` header carries an issued, unexpired bearer token."""
        if self.refuse_all_tokens or not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        with self._lock:
            expires = self._tokens.get(token.strip())
        return expires is not None and self._clock() < expires

    def forward_without_token(
        self, handler: BaseHTTPRequestHandler, body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Forward a request to the FHIR engine without its credentials; return its answer."""
        # The engine trusts the gateway: the bearer token stops here, as at a real EHR edge.
        return self.forward(handler, body, drop=frozenset({"authorization"}))

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Serve one request: discovery, the token endpoint, or the protected gateway."""
        path = urlsplit(handler.path).path
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.command == "GET" and path == "/.well-known/smart-configuration":
            with self._lock:
                self.discoveries += 1
            config = {"token_endpoint": self.token_url, **self.smart_configuration_extra}
            _send_json(handler, 200, config)
        elif path == "/auth/token":
            if handler.command != "POST":
                _send_json(handler, 405, {"error": "invalid_request", "error_description": "POST only"})
                return
            try:
                answer = self.issue(handler.headers.get("Content-Type", ""), body)
            except OAuthError as exc:
                with self._lock:
                    self.rejections.append(exc)
                _send_json(handler, exc.status, {"error": exc.error, "error_description": exc.description})
            else:
                _send_json(handler, 200, answer)
        elif not self.token_valid(handler.headers.get("Authorization")):
            with self._lock:
                self.gateway.append(GatewayRecord(handler.command, handler.path, 401))
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "a valid bearer token is required"}],
            }
            _send_json(handler, 401, outcome, extra=[("WWW-Authenticate", 'Bearer error="invalid_token"')])
        else:
            status, headers, payload = self.forward_without_token(handler, body or None)
            with self._lock:
                self.gateway.append(GatewayRecord(handler.command, handler.path, status))
            send(handler, status, headers, payload)


def _send_json(
    handler: BaseHTTPRequestHandler, status: int, data: dict[str, Any], *, extra: list[tuple[str, str]] | None = None
) -> None:
    # Token answers must not be cached (RFC 6749 section 5.1).
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), *(extra or [])]
    send(handler, status, headers, json.dumps(data).encode())
