"""OIDC bearer tokens against a real JWKS over HTTP: roles, refusals with reasons, key rotation, provider outages.

Real: the app over its ASGI interface with the SQL trace, and an identity provider's discovery
document and JWKS served on 127.0.0.1 (:mod:`tests.support.jwks_server`) with RSA and EC keys
generated here. Fakes: the models only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.config import OidcSettings, Settings
from agent.errors import ConfigError
from agent.runtime import AgentRuntime
from agent.service.app import create_app
from agent.service.auth import new_api_key
from agent.service.oidc import FAILED_FETCH_BACKOFF_S, STALE_GRACE_S, OidcVerifier, roles_from_claims
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime
from tests.support.jwks_server import JwksServer, SigningKey, hmac_token, unsigned_token

AUDIENCE = "medagent-api"
QUESTION = "Heart failure status?"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "rsa": SigningKey.rsa("rsa-1"),
        "ec": SigningKey.ec("ec-1"),
        "rsa_next": SigningKey.rsa("rsa-2", alg="PS256"),
        "stranger": SigningKey.rsa("rsa-1"),  # same kid as "rsa", other key: a forgery
    }


@pytest.fixture
def idp(keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.publish(keys["rsa"], keys["ec"])
        yield server


def _settings(base: Settings, **service: Any) -> Settings:
    merged = base.model_dump()
    merged["service"].update(service)
    return type(base).model_validate(merged)


@dataclass
class OidcApp:
    client: TestClient
    runtime: AgentRuntime
    idp: JwksServer
    api_key: str

    def token(self, key: SigningKey, user: str, roles: list[str] | str, **claims: Any) -> str:
        body = self.idp.claims(AUDIENCE, sub=f"sub-{user}", preferred_username=user, realm_access={"roles": roles})
        return key.sign({**body, **claims})

    def use_clock(self, clock: Any) -> OidcVerifier:
        """Give the app a verifier on ``clock`` (a fresh JWKS cache)."""
        authenticator = self.client.app.state.authenticator  # type: ignore[attr-defined]
        authenticator.verifier = OidcVerifier(self.runtime.settings.service.oidc, clock=clock)
        return authenticator.verifier  # type: ignore[no-any-return]


@pytest.fixture
def app(tmp_path: Path, idp: JwksServer) -> OidcApp:
    base = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    key, spec = new_api_key("svc-user", ["service"], "cds-client")
    oidc = {
        "issuer": idp.issuer,
        "audience": AUDIENCE,
        "roles_claim": "realm_access.roles",
        "user_claim": "preferred_username",
    }
    settings = _settings(base.settings, oidc=oidc, api_keys=[spec.model_dump()], rate_limit_per_minute=0)
    runtime = AgentRuntime(settings=settings, models=base.models)
    return OidcApp(TestClient(create_app(settings, runtime)), runtime, idp, key)


def _bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def _ask(app: OidcApp, headers: dict[str, str]) -> Any:
    return app.client.post(
        "/v1/ask", json={"patient_id": PATIENTS["cxr"]["patient_id"], "question": QUESTION}, headers=headers
    )


def test_token_roles_decide_and_the_user_reaches_the_trace(app: OidcApp, keys: dict[str, SigningKey]) -> None:
    clinician = app.token(keys["rsa"], "dr.ada", ["clinician", "offline_access"])
    auditor = app.token(keys["ec"], "audrey", "auditor")  # an EC key, and roles as a space-separated string

    asked = _ask(app, _bearer(clinician, **{"X-Purpose-Of-Use": "etreat"}))
    assert asked.status_code == 200, asked.text
    run_id = asked.json()["run_id"]

    assert _ask(app, _bearer(auditor)).status_code == 403
    assert app.client.get("/v1/runs", headers=_bearer(clinician)).status_code == 403
    listed = app.client.get("/v1/runs", headers=_bearer(auditor), params={"user": "dr.ada"})
    assert listed.status_code == 200, listed.text
    [run] = listed.json()
    assert (run["run_id"], run["user_id"], run["user_role"], run["purpose_of_use"]) == (
        run_id,
        "dr.ada",
        "clinician",
        "ETREAT",
    )
    # The discovery document was read once and the JWKS fetched once for both tokens.
    assert (app.idp.discoveries, app.idp.jwks_fetches) == (1, 1)
    # API keys keep working beside OIDC, without asking the identity provider anything.
    assert app.client.get("/v1/runs", headers={"X-API-Key": app.api_key}).status_code == 403
    assert app.idp.jwks_fetches == 1


def test_an_unknown_purpose_of_use_is_422(app: OidcApp, keys: dict[str, SigningKey]) -> None:
    token = app.token(keys["rsa"], "dr.ada", ["clinician"])
    reply = _ask(app, _bearer(token, **{"X-Purpose-Of-Use": "MARKETING"}))
    assert reply.status_code == 422
    assert reply.json()["code"] == "invalid_purpose_of_use" and "TREAT" in reply.json()["detail"]
    # free text is never echoed back (it could be anything)
    reply = _ask(app, _bearer(token, **{"X-Purpose-Of-Use": "for patient Jane Doe"}))
    assert reply.status_code == 422 and "Jane" not in reply.text


def _refused(app: OidcApp, token: str) -> str:
    reply = app.client.get("/v1/runs", headers=_bearer(token))
    assert reply.status_code == 401, reply.text
    assert reply.json()["code"] == "not_authenticated"
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    return str(reply.json()["detail"])


def test_refused_tokens_say_why(app: OidcApp, keys: dict[str, SigningKey]) -> None:
    rsa = keys["rsa"]
    now = int(time.time())

    def claims(**extra: Any) -> dict[str, Any]:
        return {
            **app.idp.claims(AUDIENCE, sub="s1", preferred_username="eve", realm_access={"roles": ["auditor"]}),
            **extra,
        }

    cases = {
        "expired": (rsa.sign(claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600)), "has expired"),
        "wrong audience": (rsa.sign(claims(aud="another-app")), "audience (aud) is not this API"),
        "wrong issuer": (rsa.sign(claims(iss="https://evil.example")), "another issuer"),
        "forged signature": (keys["stranger"].sign(claims()), "signature does not verify"),
        "alg none": (unsigned_token(claims()), "alg 'none' are not accepted"),
        "HS256 keyed with the public key": (hmac_token(claims(), rsa.public_pem(), "rsa-1"), "alg 'HS256'"),
        "unknown kid": (rsa.sign(claims(), kid="nobody-knows-me"), "'nobody-knows-me' is not in the issuer's JWKS"),
        "not yet valid": (rsa.sign(claims(nbf=now + 3600)), "not valid yet"),
        "no exp": (rsa.sign({k: v for k, v in claims().items() if k != "exp"}), "lacks the exp claim"),
        "no user claim": (rsa.sign({k: v for k, v in claims().items() if k != "preferred_username"}), "user claim"),
        "RSA key claimed as ES256": (rsa.sign(claims(), alg="PS256"), "published for alg RS256, not PS256"),
        "garbage": ("eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "not a well-formed JWT"),
    }
    details = {name: _refused(app, token) for name, (token, _) in cases.items()}
    for name, (_, expected) in cases.items():
        assert expected in details[name], (name, details[name])
    # Within the configured leeway (30 s) a just-expired token still passes: clocks drift.
    assert app.client.get("/v1/runs", headers=_bearer(rsa.sign(claims(exp=now - 5)))).status_code == 200


def test_key_rotation_is_followed_and_unknown_kids_cannot_flood_the_provider(
    app: OidcApp, keys: dict[str, SigningKey]
) -> None:
    first = app.token(keys["rsa"], "audrey", ["auditor"])
    assert app.client.get("/v1/runs", headers=_bearer(first)).status_code == 200
    assert app.idp.jwks_fetches == 1

    # The provider publishes a new key (PS256) and starts signing with it: one refetch finds it.
    app.idp.publish(keys["rsa_next"])
    rotated = app.token(keys["rsa_next"], "audrey", ["auditor"])
    assert app.client.get("/v1/runs", headers=_bearer(rotated)).status_code == 200
    assert app.idp.jwks_fetches == 2
    assert app.client.get("/v1/runs", headers=_bearer(first)).status_code == 200
    assert app.idp.jwks_fetches == 2

    # A stream of tokens naming kids nobody published costs the provider at most one request.
    for n in range(20):
        _refused(app, keys["rsa"].sign(app.idp.claims(AUDIENCE, preferred_username="x"), kid=f"forged-{n}"))
    assert app.idp.jwks_fetches <= 3


def test_provider_down_is_503_and_cached_keys_bridge_an_outage(app: OidcApp, keys: dict[str, SigningKey]) -> None:
    now = [1000.0]
    app.use_clock(lambda: now[0])
    token = app.token(keys["rsa"], "audrey", ["auditor"])

    app.idp.down = True
    reply = app.client.get("/v1/runs", headers=_bearer(token))
    assert reply.status_code == 503, reply.text
    assert reply.json()["code"] == "identity_provider_unavailable" and "HTTP 503" in reply.json()["detail"]
    fetches = app.idp.discoveries + app.idp.jwks_fetches
    # During the back-off callers are answered at once, without asking the provider again.
    assert app.client.get("/v1/runs", headers=_bearer(token)).status_code == 503
    assert app.idp.discoveries + app.idp.jwks_fetches == fetches
    # API keys do not depend on the provider.
    assert app.client.get("/v1/runs", headers={"X-API-Key": app.api_key}).status_code == 403

    app.idp.down = False
    now[0] += FAILED_FETCH_BACKOFF_S + 1
    assert app.client.get("/v1/runs", headers=_bearer(token)).status_code == 200

    # Down again after the cache expired: the keys fetched earlier still verify, for a while.
    app.idp.down = True
    now[0] += app.runtime.settings.service.oidc.jwks_cache_s + 1
    assert app.client.get("/v1/runs", headers=_bearer(token)).status_code == 200
    now[0] += STALE_GRACE_S
    assert app.client.get("/v1/runs", headers=_bearer(token)).status_code == 503


def test_provider_unreachable_is_503(app: OidcApp, keys: dict[str, SigningKey]) -> None:
    token = app.token(keys["rsa"], "audrey", ["auditor"])
    app.idp.stop()  # nothing listens on that port now
    reply = app.client.get("/v1/runs", headers=_bearer(token))
    assert reply.status_code == 503 and reply.json()["code"] == "identity_provider_unavailable"


async def test_an_explicit_jwks_url_skips_discovery(idp: JwksServer, keys: dict[str, SigningKey]) -> None:
    issuer = "https://idp.example/realms/h"
    verifier = OidcVerifier(OidcSettings(issuer=issuer, audience=AUDIENCE, jwks_url=idp.jwks_uri))
    claims = {**idp.claims(AUDIENCE, sub="u-1", roles="admin clinician unknown"), "iss": issuer}
    verified = await verifier.verify(keys["ec"].sign(claims))
    assert (verified.user, verified.roles) == ("u-1", ["admin", "clinician"])
    assert (idp.discoveries, idp.jwks_fetches) == (0, 1)


def test_roles_come_from_a_dotted_claim_and_unknown_ones_are_dropped() -> None:
    claims = {"resource_access": {"medagent": {"roles": ["auditor", "root", 7, "auditor"]}}, "roles": "clinician"}
    assert roles_from_claims(claims, "resource_access.medagent.roles") == ["auditor"]
    assert roles_from_claims(claims, "roles") == ["clinician"]
    assert roles_from_claims(claims, "resource_access.other.roles") == []
    assert roles_from_claims({"roles": {"clinician": True}}, "roles") == []


@pytest.mark.parametrize(
    ("oidc", "message"),
    [
        ({"issuer": "https://idp.example"}, "oidc.audience is required"),
        ({"issuer": "https://idp.example", "audience": "a", "algorithms": ["RS256", "HS256"]}, "asymmetric"),
        ({"issuer": "https://idp.example", "audience": "a", "algorithms": ["none"]}, "asymmetric"),
        ({"issuer": "http://idp.example", "audience": "a"}, "must be an https URL"),
        ({"issuer": "https://idp.example", "audience": "a", "jwks_url": "http://10.0.0.5/jwks"}, "https URL"),
    ],
)
def test_unsafe_oidc_settings_stop_the_app_from_starting(tmp_path: Path, oidc: dict[str, Any], message: str) -> None:
    base = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    # refused by the settings themselves (a validation error) or, at the latest, when the app is built
    with pytest.raises((ConfigError, ValueError), match=message):
        settings = _settings(base.settings, oidc=oidc)
        create_app(settings, AgentRuntime(settings=settings, models=base.models))
