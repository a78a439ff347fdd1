"""SMART Backend Services auth over real HTTP: a real token server in front of the live FHIR engine.

Where it sits: tests of :mod:`agent.sources.smart_auth`. :class:`tests.support.token_server.TokenServer`
checks every client assertion for real (signature, claims, replay) and only forwards FHIR requests
that carry a token it issued; :class:`agent.sources.fhir_http.HttpFhirSource` reads the fixture
patient through it with an ``httpx.AsyncClient`` whose ``auth`` is the class under test. A shared,
controllable clock drives token lifetimes on both sides, so renewal is tested without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.domain.events import ListObserver
from agent.errors import ConfigError, SourceUnavailableError
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.smart_auth import Algorithm, SmartBackendAuth, jwk_thumbprint, public_jwk, public_jwks
from tests.support.servers import REPO_ROOT, FhirServerHandle
from tests.support.token_server import TokenServer

MANIFEST = json.loads((REPO_ROOT / "fixtures" / "manifest.json").read_text())
CXR_PATIENT = next(p["patient_id"] for p in MANIFEST["patients"] if p["key"] == "cxr")


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _rsa_pem(bits: int = 2048) -> bytes:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def _ec_pem(curve: ec.EllipticCurve | None = None) -> bytes:
    return _pem(ec.generate_private_key(curve or ec.SECP384R1()))


RSA_PEM = _rsa_pem()
EC_PEM = _ec_pem()
KEYS = {"RS384": ("rs-client", RSA_PEM), "ES384": ("es-client", EC_PEM)}


class Clock:
    """A clock tests move by hand; the client and the token server read the same one."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(fhir_server: FhirServerHandle, clock: Clock) -> Iterator[TokenServer]:
    """Yield a token server and gateway in front of the FHIR engine, with both clients registered."""
    with TokenServer(fhir_server.base_url, clock=clock) as token_server:
        for algorithm, (client_id, pem) in KEYS.items():
            token_server.register(client_id, public_jwks(pem, algorithm))
        yield token_server


def _auth(server: TokenServer, clock: Clock, algorithm: str = "RS384", **kwargs: Any) -> SmartBackendAuth:
    client_id, pem = KEYS[algorithm]
    options: dict[str, Any] = {"algorithm": algorithm, "clock": clock, **kwargs}
    return SmartBackendAuth(server.base_url, options.pop("client_id", client_id), options.pop("pem", pem), **options)


async def _read_patient(server: TokenServer, auth: httpx.Auth, reads: int = 1) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(auth=auth) as client:
        source = HttpFhirSource(server.base_url, observer=ListObserver(), client=client)
        return [await source.read("Patient", CXR_PATIENT) for _ in range(reads)]


def _decode_part(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- success paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_client_fetches_a_token_and_reads_the_patient(server: TokenServer, clock: Clock, algorithm: str) -> None:
    patients = await _read_patient(server, _auth(server, clock, algorithm))

    assert patients[0]["resourceType"] == "Patient"
    assert patients[0]["id"] == CXR_PATIENT
    assert server.discoveries == 1
    assert server.issued == 1
    assert [r.status for r in server.gateway] == [200]


async def test_the_gateway_refuses_requests_without_a_token(server: TokenServer) -> None:
    async with HttpFhirSource(server.base_url, observer=ListObserver()) as source:
        with pytest.raises(SourceUnavailableError, match=r"authentication failed \(HTTP 401\)"):
            await source.read("Patient", CXR_PATIENT)
    assert server.issued == 0


async def test_token_is_reused_across_requests_and_concurrent_ones(server: TokenServer, clock: Clock) -> None:
    auth = _auth(server, clock)
    await _read_patient(server, auth, reads=3)

    async with httpx.AsyncClient(auth=auth) as client:
        source = HttpFhirSource(server.base_url, observer=ListObserver(), client=client)
        await asyncio.gather(*(source.read("Patient", CXR_PATIENT) for _ in range(5)))

    assert server.issued == 1
    assert server.discoveries == 1
    assert len(server.gateway) == 8


async def test_concurrent_first_requests_fetch_one_token(server: TokenServer, clock: Clock) -> None:
    auth = _auth(server, clock, "ES384")
    async with httpx.AsyncClient(auth=auth) as client:
        source = HttpFhirSource(server.base_url, observer=ListObserver(), client=client)
        await asyncio.gather(*(source.read("Patient", CXR_PATIENT) for _ in range(6)))
    assert server.issued == 1


async def test_token_is_renewed_before_it_expires(server: TokenServer, clock: Clock) -> None:
    server.expires_in = 120
    auth = _auth(server, clock, renew_before_s=60)
    await _read_patient(server, auth)

    clock.advance(59)  # 61 s left: still used
    await _read_patient(server, auth)
    assert server.issued == 1

    clock.advance(2)  # 59 s left: renewed before the server would refuse it
    await _read_patient(server, auth)
    assert server.issued == 2
    assert [r.status for r in server.gateway] == [200, 200, 200]


async def test_failed_renewal_keeps_the_unexpired_token(
    server: TokenServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    server.expires_in = 120
    auth = _auth(server, clock, renew_before_s=60)
    await _read_patient(server, auth)
    server.register("rs-client", {"keys": []})  # the EHR stops accepting the client's key

    clock.advance(61)
    patients = await _read_patient(server, auth)
    assert patients[0]["id"] == CXR_PATIENT
    assert server.errors() == ["invalid_client"]
    assert "SMART token renewal failed" in caplog.text

    clock.advance(60)  # now expired: the refusal reaches the caller
    with pytest.raises(SourceUnavailableError, match="no registered key has this kid"):
        await _read_patient(server, auth)
    assert server.issued == 1


async def test_token_url_override_skips_discovery(server: TokenServer, clock: Clock) -> None:
    await _read_patient(server, _auth(server, clock, token_url=server.token_url))
    assert server.discoveries == 0
    assert server.issued == 1


async def test_a_401_refreshes_once_and_retries_the_request(server: TokenServer, clock: Clock) -> None:
    auth = _auth(server, clock)
    await _read_patient(server, auth)
    server.revoke_all()

    patients = await _read_patient(server, auth)

    assert patients[0]["id"] == CXR_PATIENT
    assert server.issued == 2
    assert [r.status for r in server.gateway] == [200, 401, 200]


async def test_a_second_401_goes_back_to_the_caller(server: TokenServer, clock: Clock) -> None:
    server.refuse_all_tokens = True
    with pytest.raises(SourceUnavailableError, match=r"authentication failed \(HTTP 401\)"):
        await _read_patient(server, _auth(server, clock))
    # One token, one refresh, one retry: never a loop.
    assert server.issued == 2
    assert [r.status for r in server.gateway] == [401, 401]


# -- the server refuses bad assertions ---------------------------------------------------------


class _FixedJti(SmartBackendAuth):
    def client_assertion(self, audience: str, **kwargs: Any) -> str:
        return super().client_assertion(audience, **{**kwargs, "jti": "the-same-jti"})


class _LongLived(SmartBackendAuth):
    def client_assertion(self, audience: str, **kwargs: Any) -> str:
        return super().client_assertion(audience, **{**kwargs, "lifetime_s": 600})


class _WrongAudience(SmartBackendAuth):
    def client_assertion(self, audience: str, **kwargs: Any) -> str:
        return super().client_assertion("https://ehr.example.org/other/token", **kwargs)


async def _expect_refusal(server: TokenServer, auth: SmartBackendAuth, description: str) -> SourceUnavailableError:
    with pytest.raises(SourceUnavailableError) as caught:
        await _read_patient(server, auth)
    message = caught.value.message
    assert f"refused client {auth.client_id!r} (HTTP 401, invalid_client): " in message
    assert description in message
    assert caught.value.details["oauth_error"] == "invalid_client"
    # Neither the signed assertion (a JWS starts with base64url '{"') nor a token leaks into the message.
    assert "eyJ" not in message
    assert server.errors() == ["invalid_client"]
    assert server.gateway == []
    return caught.value


async def test_server_rejects_an_unregistered_key(server: TokenServer, clock: Clock) -> None:
    await _expect_refusal(server, _auth(server, clock, pem=_rsa_pem()), "no registered key has this kid")


async def test_server_rejects_a_signature_by_another_key_under_the_registered_kid(
    server: TokenServer, clock: Clock
) -> None:
    registered_kid = public_jwks(RSA_PEM, "RS384")["keys"][0]["kid"]
    auth = _auth(server, clock, pem=_rsa_pem(), key_id=registered_kid)
    await _expect_refusal(server, auth, "signature does not verify")


async def test_server_rejects_an_expired_assertion(server: TokenServer) -> None:
    client_id, pem = KEYS["ES384"]
    # The client's clock is 20 minutes slow, so its assertion expired before it was sent.
    auth = SmartBackendAuth(server.base_url, client_id, pem, algorithm="ES384", clock=lambda: time.time() - 1200)
    await _expect_refusal(server, auth, "the client assertion has expired")


async def test_server_rejects_an_assertion_that_lives_too_long(server: TokenServer, clock: Clock) -> None:
    client_id, pem = KEYS["RS384"]
    auth = _LongLived(server.base_url, client_id, pem, clock=clock)
    await _expect_refusal(server, auth, "exp is more than 300 s away")


async def test_server_rejects_a_wrong_audience(server: TokenServer, clock: Clock) -> None:
    client_id, pem = KEYS["RS384"]
    await _expect_refusal(server, _WrongAudience(server.base_url, client_id, pem, clock=clock), "aud is not")


async def test_server_rejects_an_unknown_client(server: TokenServer, clock: Clock) -> None:
    await _expect_refusal(server, _auth(server, clock, client_id="nobody"), "unknown client")


async def test_server_rejects_a_replayed_jti(server: TokenServer, clock: Clock) -> None:
    client_id, pem = KEYS["RS384"]
    auth = _FixedJti(server.base_url, client_id, pem, clock=clock)
    await _read_patient(server, auth)
    server.revoke_all()

    # The 401 makes the client fetch again, with the same jti: the server must refuse the replay.
    with pytest.raises(SourceUnavailableError, match=r"invalid_client\): jti was already used \(replay\)"):
        await _read_patient(server, auth)
    assert server.issued == 1
    assert server.errors() == ["invalid_client"]


# -- discovery and transport failures ----------------------------------------------------------


async def test_unreachable_token_endpoint_is_source_unavailable(server: TokenServer, clock: Clock) -> None:
    token_url = f"http://127.0.0.1:{_closed_port()}/token"
    with pytest.raises(SourceUnavailableError, match=r"SMART token endpoint .* could not be reached"):
        await _read_patient(server, _auth(server, clock, token_url=token_url))


async def test_missing_smart_configuration_is_source_unavailable(fhir_server: FhirServerHandle, clock: Clock) -> None:
    # The bare engine serves no SMART configuration: discovery fails with a hint to set the token URL.
    auth = SmartBackendAuth(fhir_server.base_url, "rs-client", RSA_PEM, clock=clock)
    with pytest.raises(SourceUnavailableError, match="smart-configuration answered HTTP 4"):
        await auth.access_token()


async def test_server_without_private_key_jwt_is_a_config_error(server: TokenServer, clock: Clock) -> None:
    server.smart_configuration_extra["token_endpoint_auth_methods_supported"] = ["client_secret_basic"]
    with pytest.raises(ConfigError, match="does not accept private_key_jwt"):
        await _read_patient(server, _auth(server, clock))
    assert server.issued == 0


async def test_server_without_the_algorithm_is_a_config_error(server: TokenServer, clock: Clock) -> None:
    server.smart_configuration_extra["token_endpoint_auth_signing_alg_values_supported"] = ["RS384"]
    with pytest.raises(ConfigError, match="does not accept ES384"):
        await _read_patient(server, _auth(server, clock, "ES384"))


def test_sync_clients_are_refused() -> None:
    auth = SmartBackendAuth("http://127.0.0.1:1", "c", RSA_PEM, token_url="http://127.0.0.1:1/token")
    with httpx.Client(auth=auth) as client, pytest.raises(RuntimeError, match="AsyncClient only"):
        client.get("http://127.0.0.1:1/Patient/x")


# -- keys and assertions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "pem", "match"),
    [
        ("RS384", EC_PEM, "RS384 needs an RSA private key, not an EC key on secp384r1"),
        ("ES384", RSA_PEM, "ES384 needs an EC private key on P-384, not an RSA-2048 key"),
        ("ES384", _ec_pem(ec.SECP256R1()), "ES384 needs an EC private key on P-384"),
        ("RS384", _rsa_pem(1024), "at least 2048 bits"),
        ("RS384", b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n", "could not be read"),
        ("HS256", RSA_PEM, "'HS256' is not supported"),
    ],
)
def test_unusable_keys_are_config_errors(algorithm: str, pem: bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SmartBackendAuth("http://127.0.0.1:1", "client", pem, algorithm=algorithm)  # type: ignore[arg-type]


def test_from_files_reads_the_key_and_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "client.pem"
    path.write_bytes(EC_PEM)
    auth = SmartBackendAuth.from_files("http://127.0.0.1:1/fhir/", "client", path, algorithm="ES384")
    assert auth.fhir_base_url == "http://127.0.0.1:1/fhir"
    assert auth.key_id == public_jwks(EC_PEM, "ES384")["keys"][0]["kid"]
    with pytest.raises(ConfigError, match="cannot be read"):
        SmartBackendAuth.from_files("http://127.0.0.1:1", "client", tmp_path / "missing.pem")


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_assertion_header_claims_and_signature(algorithm: Algorithm) -> None:
    client_id, pem = KEYS[algorithm]
    auth = SmartBackendAuth("http://127.0.0.1:1", client_id, pem, algorithm=algorithm, clock=lambda: 1_700_000_000.5)
    first = auth.client_assertion("https://ehr.example.org/token")
    second = auth.client_assertion("https://ehr.example.org/token")

    header_b64, claims_b64, signature_b64 = first.split(".")
    header, claims = _decode_part(header_b64), _decode_part(claims_b64)
    assert header == {"alg": algorithm, "kid": auth.key_id, "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == client_id
    assert claims["aud"] == "https://ehr.example.org/token"
    assert claims["iat"] == 1_700_000_000
    assert claims["exp"] == 1_700_000_300
    assert claims["jti"] != _decode_part(second.split(".")[1])["jti"]

    signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    signing_input = f"{header_b64}.{claims_b64}".encode()
    key = serialization.load_pem_private_key(pem, password=None)
    if algorithm == "ES384":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert len(signature) == 96  # raw r||s, not DER
        der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
        key.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        key.public_key().verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA384())


def test_public_jwks_and_thumbprint() -> None:
    jwks = public_jwks(EC_PEM, "ES384", key_id="k1")
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == "k1"
    assert jwk["alg"] == "ES384"
    assert jwk["crv"] == "P-384"
    assert "d" not in jwk  # the private part never leaves
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 48

    key = serialization.load_pem_private_key(RSA_PEM, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    rsa_jwk = public_jwk(key)
    # RFC 7638: only the required members, in lexicographic order, without whitespace.
    canonical = json.dumps({"e": rsa_jwk["e"], "kty": "RSA", "n": rsa_jwk["n"]}, separators=(",", ":"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    assert jwk_thumbprint({**rsa_jwk, "alg": "RS384"}) == expected
    assert rsa_jwk["e"] == "AQAB"


async def test_settings_turn_smart_auth_on_for_the_whole_ask_flow(server: TokenServer, tmp_path: Path) -> None:
    """MEDAGENT_FHIR__SMART_* settings alone are enough: the agent's run reads through the protected gateway."""
    from agent.config import get_settings
    from agent.inference.factory import LoadedModels
    from agent.runner import AgentRuntime, ModelCache, run_ask
    from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner

    client_id, pem = KEYS["ES384"]
    key_file = tmp_path / "client.pem"
    key_file.write_bytes(pem)
    settings = get_settings(
        fhir={
            "base_url": server.base_url,
            "smart_client_id": client_id,
            "smart_private_key_file": key_file,
            "smart_algorithm": "ES384",
        },
        db={"url": f"sqlite:///{tmp_path / 'trace.db'}"},
    )
    loaded = LoadedModels(scorer=FakeScorer(), reasoner=ScriptedReasoner(), used_test_models=False)
    runtime = AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))
    result = await run_ask(runtime, patient_id=CXR_PATIENT, question="Status?")
    assert result.status == "ok" and f"Patient/{CXR_PATIENT}" in result.sources
    assert server.issued == 1  # one token for every request of the run
