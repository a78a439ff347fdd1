"""Per-caller rate limits, CORS, security headers, the PHI-free access log, and streaming through it all.

Real: the app over its ASGI interface with the SQL trace; a real uvicorn server on 127.0.0.1
for the streaming and disconnect checks (TestClient would buffer). Fakes: the models only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from agent.config import Settings
from agent.service.app import create_app
from agent.service.auth import Principal, new_api_key
from agent.service.middleware import RateLimiter, install_middleware
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime
from tests.support.app_server import serve_app

ACCESS_LOGGER = "agent.service.access"


def _app(tmp_path: Path, **service: Any) -> tuple[TestClient, dict[str, str]]:
    """Return a client of the real app with three API keys, and the keys by name."""
    base = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    keys, specs = {}, []
    for name, roles in {"ward-a": ["auditor"], "ward-b": ["auditor"], "clin": ["clinician"]}.items():
        key, spec = new_api_key(f"user-{name}", roles, name)  # type: ignore[arg-type]
        keys[name] = key
        specs.append(spec.model_dump())
    merged = base.settings.model_dump()
    merged["service"].update({"api_keys": specs, **service})
    settings = type(base.settings).model_validate(merged)
    runtime = type(base)(settings=settings, models=base.models)
    return TestClient(create_app(settings, runtime)), keys


def _key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


# -- rate limits -----------------------------------------------------------------------------------


def test_one_caller_is_limited_and_the_others_are_not(tmp_path: Path) -> None:
    client, keys = _app(tmp_path, rate_limit_per_minute=3)
    for _ in range(3):
        assert client.get("/v1/runs", headers=_key(keys["ward-a"])).status_code == 200
    limited = client.get("/v1/runs", headers=_key(keys["ward-a"]))
    assert limited.status_code == 429
    assert limited.headers["content-type"].startswith("application/problem+json")
    assert limited.json()["code"] == "rate_limited" and "3 requests per minute" in limited.json()["detail"]
    # 3 a minute: the next request is free in at most 20 s
    assert 1 <= int(limited.headers["Retry-After"]) <= 20
    assert limited.headers["X-Content-Type-Options"] == "nosniff"

    # Another key, the same client address: its own budget, untouched by ward-a.
    for _ in range(3):
        assert client.get("/v1/runs", headers=_key(keys["ward-b"])).status_code == 200
    # Probes are never limited, even for a throttled caller.
    assert client.get("/healthz", headers=_key(keys["ward-a"])).status_code == 200


def test_bad_or_missing_credentials_spend_the_address_budget_not_a_keys(tmp_path: Path) -> None:
    client, keys = _app(tmp_path, rate_limit_per_minute=3)
    answers = [client.get("/v1/runs", headers=_key(f"mak_guess{n}")).status_code for n in range(3)]
    assert answers == [401, 401, 401]
    # Guessing keys is bounded: new guesses and credential-less requests share the address's budget.
    assert client.get("/v1/runs", headers=_key("mak_guess-again")).status_code == 429
    assert client.get("/v1/runs").status_code == 429
    # The forged keys did not spend a real key's budget (nor can they: it is keyed by the verified name).
    assert client.get("/v1/runs", headers=_key(keys["ward-a"])).status_code == 200


def test_notifications_with_the_shared_secret_are_not_limited(tmp_path: Path) -> None:
    client, _ = _app(tmp_path, rate_limit_per_minute=3, subscription_secret="s" * 32)
    trusted = {"X-Subscription-Secret": "s" * 32, "Content-Type": "application/fhir+json"}
    heartbeat = {"resourceType": "Parameters"}  # not a valid notification: refused, but never throttled
    answers = {client.post("/fhir/notifications", json=heartbeat, headers=trusted).status_code for _ in range(6)}
    assert 429 not in answers
    # without the secret a sender is an unauthenticated caller, counted by its address
    wrong = {"X-Subscription-Secret": "x" * 32, "Content-Type": "application/fhir+json"}
    answers = {client.post("/fhir/notifications", json=heartbeat, headers=wrong).status_code for _ in range(5)}
    assert 429 in answers


def test_the_limit_is_off_at_zero_and_refills_over_time(tmp_path: Path) -> None:
    client, keys = _app(tmp_path, rate_limit_per_minute=0)
    assert all(client.get("/v1/runs", headers=_key(keys["ward-a"])).status_code == 200 for _ in range(10))

    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(30.0)
    assert limiter.acquire("b") == 0.0
    now[0] = 29.0
    assert limiter.acquire("a") == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter.acquire("a") == 0.0


def test_oidc_callers_are_counted_by_a_hash_not_their_subject() -> None:
    principal = Principal(
        user="ada@hospital.example",
        roles=["clinician"],
        key_name="oidc",
        auth_method="oidc",
        issuer="https://idp",
        subject="ada@hospital.example",
    )
    other = principal.model_copy(update={"subject": "bob@hospital.example"})
    assert principal.caller_id.startswith("oidc:") and "ada" not in principal.caller_id
    assert principal.caller_id != other.caller_id


# -- CORS and security headers ---------------------------------------------------------------------


def test_cors_answers_only_the_configured_origins(tmp_path: Path) -> None:
    client, keys = _app(tmp_path, cors_origins=["https://ehr.example"])
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, x-purpose-of-use",
    }
    allowed = client.options("/v1/runs", headers={"Origin": "https://ehr.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ehr.example"
    assert {"authorization", "x-purpose-of-use"} <= {
        h.strip().lower() for h in allowed.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert "Access-Control-Allow-Credentials" not in allowed.headers

    denied = client.options("/v1/runs", headers={"Origin": "https://evil.example", **preflight})
    assert denied.status_code == 400 and "Access-Control-Allow-Origin" not in denied.headers
    simple = client.get("/v1/runs", headers={"Origin": "https://evil.example", **_key(keys["ward-a"])})
    assert simple.status_code == 200 and "Access-Control-Allow-Origin" not in simple.headers
    ok = client.get("/v1/runs", headers={"Origin": "https://ehr.example", **_key(keys["ward-a"])})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr.example"


def test_no_cors_headers_without_configured_origins(tmp_path: Path) -> None:
    client, keys = _app(tmp_path)
    reply = client.get("/v1/runs", headers={"Origin": "https://ehr.example", **_key(keys["ward-a"])})
    assert reply.status_code == 200
    assert not [h for h in reply.headers if h.lower().startswith("access-control-")]
    preflight = client.options(
        "/v1/runs", headers={"Origin": "https://ehr.example", "Access-Control-Request-Method": "GET"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_security_headers_on_every_response(tmp_path: Path) -> None:
    client, keys = _app(tmp_path)
    for reply in (
        client.get("/healthz"),
        client.get("/v1/runs", headers=_key(keys["ward-a"])),
        client.get("/v1/runs"),  # 401
        client.get("/no/such/page"),  # 404
    ):
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
        csp = reply.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert "Strict-Transport-Security" not in reply.headers  # plain http here
    clinical = client.get("/v1/runs", headers=_key(keys["ward-a"]))
    assert clinical.headers["Cache-Control"] == "no-store"
    assert "no-store" not in client.get("/healthz").headers.get("Cache-Control", "")
    unauthorised = client.get("/v1/runs")
    assert unauthorised.headers["WWW-Authenticate"].startswith("Bearer")
    # The API docs load Swagger UI from its CDN, and only they may.
    assert "https://cdn.jsdelivr.net" in client.get("/docs").headers["Content-Security-Policy"]

    secure = TestClient(client.app, base_url="https://testserver")
    assert secure.get("/healthz").headers["Strict-Transport-Security"].startswith("max-age=")


# -- access log ------------------------------------------------------------------------------------


def test_access_log_names_the_route_template_never_the_patient_or_the_question(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, keys = _app(tmp_path, rate_limit_per_minute=4)
    patient_id = PATIENTS["cxr"]["patient_id"]
    question = "Is the SENTINEL-QUESTION effusion larger?"
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        asked = client.post(
            "/v1/ask",
            json={"patient_id": patient_id, "question": question},
            headers=_key(keys["clin"]),
        )
        assert asked.status_code == 200, asked.text
        client.get("/v1/runs/Jane-Doe-1960", headers=_key(keys["ward-a"]))
        client.get("/v1/runs", params={"patient": patient_id}, headers=_key(keys["ward-a"]))
        client.get("/v1/runs", params={"patient": patient_id}, headers=_key(keys["ward-a"]))
        client.get("/v1/runs", params={"patient": patient_id}, headers=_key(keys["ward-a"]))
        client.get("/v1/runs/Jane-Doe-1960", headers=_key(keys["ward-a"]))  # the 5th: 429
        client.get("/patients/Jane-Doe-1960/unknown")
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 7, lines
    assert lines[0].startswith("POST /v1/ask 200 ") and lines[0].endswith("caller=key:clin")
    assert lines[1].startswith("GET /v1/runs/{run_id} 404 ")
    assert lines[2].startswith("GET /v1/runs 200 ") and lines[2].endswith("caller=key:ward-a")
    assert lines[5].startswith("GET /v1/runs/{run_id} 429 ")
    assert lines[6].startswith("GET (unmatched) 404 ") and lines[6].endswith("caller=unauthenticated")
    text = "\n".join(lines)
    for secret in (patient_id, "Jane", "SENTINEL", "effusion", keys["clin"], "user-clin"):
        assert secret not in text
    record = next(r for r in caplog.records if r.name == ACCESS_LOGGER)
    assert record.http_route == "/v1/ask" and record.http_status == 200  # type: ignore[attr-defined]
    assert record.duration_ms >= 0  # type: ignore[attr-defined]


# -- streaming -------------------------------------------------------------------------------------


def _streaming_app(release: threading.Event, finished: list[str]) -> FastAPI:
    """Return a tiny app with one SSE-style route that waits for ``release`` between its two events."""
    app = FastAPI()
    install_middleware(app, Settings())

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                yield "event: progress\ndata: one\n\n"
                deadline = time.monotonic() + 10
                while not release.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                yield "event: final\ndata: two\n\n"
                finished.append("completed")
            except (asyncio.CancelledError, GeneratorExit):
                finished.append("cancelled")
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/own-policy")
    async def own_policy() -> JSONResponse:
        return JSONResponse({}, headers={"Content-Security-Policy": "default-src 'none'"})

    return app


def test_streamed_events_pass_through_one_by_one_and_a_disconnect_cancels(caplog: pytest.LogCaptureFixture) -> None:
    release, finished = threading.Event(), []
    app = _streaming_app(release, finished)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER), serve_app(app) as base, httpx.Client(timeout=5) as http:
        with http.stream("GET", f"{base}/v1/stream") as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            assert reply.headers["Cache-Control"] == "no-store" and reply.headers["X-Frame-Options"] == "DENY"
            chunks = reply.iter_text()
            # The first event arrives while the route is still waiting: nothing buffers the stream.
            assert "data: one" in next(chunks)
            assert finished == []
            release.set()
            assert "data: two" in "".join(chunks)
        assert finished == ["completed"]

        release.clear()
        with http.stream("GET", f"{base}/v1/stream") as reply:
            assert "data: one" in next(reply.iter_text())
        # The client hung up mid-stream: the route is cancelled, not left waiting for its event.
        deadline = time.monotonic() + 5
        while len(finished) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert finished == ["completed", "cancelled"]

        assert http.get(f"{base}/own-policy").headers["Content-Security-Policy"] == "default-src 'none'"
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert lines[0].startswith("GET /v1/stream 200 ") and lines[0].endswith("caller=dev")
    assert len([line for line in lines if line.startswith("GET /v1/stream ")]) == 2
