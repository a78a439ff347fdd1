"""A real OIDC identity provider's public face, for tests: discovery document and JWKS over HTTP.

Where it sits: tests of :mod:`agent.service.oidc` and :mod:`agent.service.auth` start it on
127.0.0.1, point ``service.oidc.issuer`` at it, and mint tokens with :class:`SigningKey` (RSA
or EC key pairs generated in the test). It serves

- ``GET /.well-known/openid-configuration`` with ``issuer`` and ``jwks_uri``;
- ``GET /jwks`` with the public halves of the keys currently published (tests rotate them);

and answers 503 to everything while ``down`` is set. It counts what it served.

Example::

    key = SigningKey.rsa("rsa-1")
    with JwksServer() as idp:
        idp.publish(key)
        token = key.sign({"iss": idp.issuer, "aud": "medagent-api", "sub": "u1", ...})
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.http_handlers import LoopbackServer, send


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class SigningKey:
    """A key pair the test's identity provider signs with: its ``kid``, JWS ``alg`` and private key."""

    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256") -> Self:
        """Return a fresh 2048-bit RSA key (RS256 or PS256)."""
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> Self:
        """Return a fresh P-256 key (ES256)."""
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def public_jwk(self) -> dict[str, Any]:
        """Return the public half as a JWK with ``kid``, ``alg`` and ``use``."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        """Return the public key as PEM (what an attacker would try as an HMAC secret)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], *, kid: str | None = "same", alg: str | None = None) -> str:
        """Return a compact JWS of ``claims``; ``kid=None`` leaves the kid out, another value overrides it."""
        headers = {} if kid is None else {"kid": self.kid if kid == "same" else kid}
        return jwt.encode(claims, self.private_key, algorithm=alg or self.alg, headers=headers)


def unsigned_token(claims: dict[str, Any]) -> str:
    """Return an ``alg: none`` token (no signature), as a forger would send it."""
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(claims).encode())}."


def hmac_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """Return an HS256 token keyed with ``secret`` (e.g. the provider's public key PEM)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


class JwksServer(LoopbackServer):
    """An identity provider's discovery document and JWKS on a free 127.0.0.1 port."""

    thread_name = "jwks-server"

    def __init__(self) -> None:
        # No upstream: this server answers everything itself.
        super().__init__("127.0.0.1", 0, timeout_s=5.0)
        self._lock = threading.Lock()
        self._keys: list[dict[str, Any]] = []
        #: While set, every request is answered 503 (the provider is down).
        self.down = False
        self.discoveries = 0
        self.jwks_fetches = 0
        self.issuer = ""
        self.jwks_uri = ""

    def start(self) -> Self:
        """Start serving; ``issuer`` is the origin, ``jwks_uri`` its ``/jwks``."""
        super().start()
        self.issuer = self.origin
        self.jwks_uri = f"{self.origin}/jwks"
        return self

    def publish(self, *keys: SigningKey) -> None:
        """Add the public halves of ``keys`` to the JWKS."""
        with self._lock:
            self._keys.extend(key.public_jwk() for key in keys)

    def retire(self, kid: str) -> None:
        """Remove the key ``kid`` from the JWKS."""
        with self._lock:
            self._keys = [k for k in self._keys if k.get("kid") != kid]

    def claims(self, audience: str, *, lifetime_s: int = 300, **extra: Any) -> dict[str, Any]:
        """Return a typical access token's claims from this issuer (``extra`` adds or overrides)."""
        now = int(time.time())
        return {"iss": self.issuer, "aud": audience, "iat": now, "nbf": now, "exp": now + lifetime_s, **extra}

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Serve discovery and the JWKS (or 503 while down)."""
        path = urlsplit(handler.path).path
        if self.down:
            send(handler, 503, [("Content-Type", "text/plain")], b"down for maintenance")
            return
        if handler.command == "GET" and path == "/.well-known/openid-configuration":
            with self._lock:
                self.discoveries += 1
            document = {"issuer": self.issuer, "jwks_uri": self.jwks_uri, "id_token_signing_alg_values_supported": []}
            _send_json(handler, document)
        elif handler.command == "GET" and path == "/jwks":
            with self._lock:
                self.jwks_fetches += 1
                document = {"keys": list(self._keys)}
            _send_json(handler, document)
        else:
            send(handler, 404, [("Content-Type", "text/plain")], b"not found")


def _send_json(handler: BaseHTTPRequestHandler, data: dict[str, Any]) -> None:
    send(handler, 200, [("Content-Type", "application/json")], json.dumps(data).encode())
