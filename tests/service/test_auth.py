"""API keys and roles: clinicians ask, auditors audit, clinical content only for clinicians."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.audit.reader import load_run
from agent.config import get_settings
from agent.errors import ConfigError
from agent.runtime import AgentRuntime
from agent.service.app import create_app
from agent.service.auth import new_api_key
from tests.e2e.cli import run_cli
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime

QUESTION = "Heart failure status?"


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[TestClient, dict[str, str], AgentRuntime]:
    keys, specs = {}, []
    for label, roles in {
        "clinician": ["clinician"],
        "auditor": ["auditor"],
        "both": ["auditor", "clinician"],
        "service": ["service"],
    }.items():
        key, spec = new_api_key(f"user-{label}", roles, label)  # type: ignore[arg-type]
        keys[label] = key
        specs.append(spec.model_dump())
    base = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    merged = base.settings.model_dump()
    merged["service"]["api_keys"] = specs
    settings = type(base.settings).model_validate(merged)
    runtime = AgentRuntime(settings=settings, models=base.models)
    return TestClient(create_app(settings, runtime)), keys, runtime


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_or_wrong_key_is_401(keyed: tuple[TestClient, dict[str, str], AgentRuntime]) -> None:
    client, _, _ = keyed
    for headers in ({}, _auth("mak_wrong"), {"X-API-Key": "nope"}):
        reply = client.post(
            "/v1/ask", json={"patient_id": PATIENTS["cxr"]["patient_id"], "question": "?"}, headers=headers
        )
        assert reply.status_code == 401 and reply.json()["code"] == "not_authenticated"
    assert client.get("/v1/runs").status_code == 401


def test_roles_decide_what_each_caller_may_do(keyed: tuple[TestClient, dict[str, str], AgentRuntime]) -> None:
    client, keys, runtime = keyed
    body = {"patient_id": PATIENTS["cxr"]["patient_id"], "question": QUESTION}
    headers = {**_auth(keys["clinician"]), "X-Purpose-Of-Use": "TREAT"}
    asked = client.post("/v1/ask", json=body, headers=headers)
    assert asked.status_code == 200, asked.text
    run_id = asked.json()["run_id"]
    run = load_run(runtime.engine, run_id).run
    assert (run.user_id, run.user_role, run.purpose_of_use) == ("user-clinician", "clinician", "TREAT")

    assert client.post("/v1/ask", json=body, headers={"X-API-Key": keys["auditor"]}).status_code == 403
    assert client.get("/v1/runs", headers=_auth(keys["clinician"])).status_code == 403
    assert client.get("/v1/runs", headers=_auth(keys["service"])).status_code == 403

    auditor = _auth(keys["auditor"])
    assert [r["run_id"] for r in client.get("/v1/runs", headers=auditor).json()] == [run_id]
    metadata = client.get(f"/v1/runs/{run_id}", headers=auditor)
    assert metadata.status_code == 200 and QUESTION not in metadata.text
    assert client.get(f"/v1/runs/{run_id}/verify", headers=auditor).json()["ok"] is True
    assert client.get(f"/v1/runs/{run_id}/export", params={"format": "fhir"}, headers=auditor).status_code == 200
    denied = client.get(f"/v1/runs/{run_id}", params={"content": "true"}, headers=auditor)
    assert denied.status_code == 403 and "clinician" in denied.json()["detail"]
    assert client.get(f"/v1/runs/{run_id}/replay", headers=auditor).status_code == 403

    both = _auth(keys["both"])
    full = client.get(f"/v1/runs/{run_id}", params={"content": "true"}, headers=both)
    assert full.status_code == 200 and QUESTION in full.text
    assert client.get(f"/v1/runs/{run_id}/replay", headers=both).json()["answer"] == asked.json()["answer"]


def test_production_refuses_an_open_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAGENT_ENVIRONMENT", "prod")
    monkeypatch.setenv("MEDAGENT_DB__URL", "postgresql+psycopg://u@db/medagent")
    monkeypatch.setenv("MEDAGENT_AUDIT__HMAC_KEY", "k" * 32)
    with pytest.raises(ConfigError, match="API keys"):
        get_settings()
    _, spec = new_api_key("svc", ["service"], "svc")
    monkeypatch.setenv("MEDAGENT_SERVICE__API_KEYS", json.dumps([spec.model_dump()]))
    with pytest.raises(ConfigError, match="SUBSCRIPTION_SECRET"):
        get_settings()
    monkeypatch.setenv("MEDAGENT_SERVICE__SUBSCRIPTION_SECRET", "s" * 32)
    assert get_settings().service.api_keys[0].user == "svc"


def test_cli_makes_a_key_that_the_api_accepts(tmp_path: Path) -> None:
    made = run_cli(["config", "api-key", "--user", "ann", "--role", "auditor", "--name", "ann-laptop"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    spec = json.loads(lines[-1])
    assert spec["user"] == "ann" and spec["roles"] == ["auditor"] and key not in made.stdout.splitlines()[-1]
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() == spec["key_sha256"]
    bad = run_cli(["config", "api-key", "--user", "x", "--role", "superuser"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown role" in bad.stderr
