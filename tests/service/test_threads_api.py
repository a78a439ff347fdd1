"""Chat threads over HTTP: SSE replies, multi-turn context, interrupts and resume, ownership, disconnects.

Real: the app, the graph, the SQLite checkpointer, bundle-folder FHIR, the SQL trace; for the
disconnect test a real uvicorn server and socket. Scripted: the models.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.audit.keys import verifiers_for
from agent.audit.reader import list_runs, load_run
from agent.audit.verify import verify_trace
from agent.config import ApiKeySpec
from agent.runner import AgentRuntime
from agent.service.app import create_app
from agent.service.auth import new_api_key
from agent.service.sse import DONE, read_sse
from tests.graph.scripted import PlanningReasoner
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, _runtime, bundles_with_twins
from tests.support.app_server import serve_app

NOIMG = PATIENTS["noimg"]["patient_id"]
CXR = PATIENTS["cxr"]["patient_id"]


def _thread_runtime(tmp_path: Path, reasoner: PlanningReasoner, **settings: Any) -> AgentRuntime:
    runtime = _runtime(tmp_path, FakeScorer(), reasoner, **settings)
    runtime.settings.agent.checkpointer_url = SecretStr(f"sqlite:///{tmp_path / 'threads.db'}")
    return runtime


def _ask(client: TestClient, thread_id: str, body: dict[str, Any], **kw: Any) -> list[tuple[str, Any]]:
    with client.stream("POST", f"/v1/threads/{thread_id}/messages", json=body, **kw) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        return read_sse(reply.iter_lines())


def test_a_thread_streams_typed_events_and_remembers_its_turns(tmp_path: Path) -> None:
    reasoner = PlanningReasoner()
    runtime = _thread_runtime(tmp_path, reasoner)
    client = TestClient(create_app(runtime.settings, runtime))
    opened = client.post("/v1/threads", json={"patient_id": CXR})
    assert opened.status_code == 201, opened.text
    thread_id = opened.json()["thread_id"]

    events = _ask(client, thread_id, {"question": "Heart failure status?"})
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "message" and events[-1][1] == DONE
    assert kinds[-2] == "final"
    assert {"progress", "token", "citation", "finding"} <= set(kinds)
    started = [data["node"] for kind, data in events if kind == "progress" and data["status"] == "started"]
    assert started[:2] == ["resolve_patient", "plan"] and "reason" in started
    final = events[-2][1]
    assert final["type"] == "final" and final["status"] == "ok"
    result = final["data"]
    assert result["thread_id"] == thread_id and result["answer"]
    streamed = "".join(data.get("text", "") for kind, data in events if kind == "token")
    assert streamed.strip() and all(c["reference"] in result["sources"] for c in result["citations"] if c["valid"])

    second = _ask(client, thread_id, {"question": "And the medications?"})
    assert second[-2][1]["status"] == "ok"
    # the second turn's prompt carries the first turn from the thread's state
    assert "Q1: Heart failure status?" in reasoner.answer_requests()[-1].user_text

    view = client.get(f"/v1/threads/{thread_id}").json()
    assert view["patient_id"] == CXR and view["pending_interrupt"] is None
    assert [t["question"] for t in view["turns"]] == ["Heart failure status?", "And the medications?"]
    assert view["turns"][0]["answer"] == result["answer"] and view["turns"][0]["status"] == "ok"
    runs = list_runs(runtime.engine)
    assert {r.thread_id for r in runs} == {thread_id} and {r.trigger for r in runs} == {"chat"}


def test_an_ambiguous_patient_interrupts_and_a_message_resumes_it(tmp_path: Path) -> None:
    bundles = bundles_with_twins(tmp_path)
    runtime = _thread_runtime(tmp_path, PlanningReasoner())
    runtime.settings.fhir.bundle_dir = bundles
    client = TestClient(create_app(runtime.settings, runtime))
    thread_id = client.post("/v1/threads", json={"patient_id": "identifier=urn:test:mrn|DUP-1"}).json()["thread_id"]

    events = _ask(client, thread_id, {"question": "Status?"})
    interrupt = next(data for kind, data in events if kind == "interrupt")
    assert interrupt["data"]["kind"] == "ambiguous_patient"
    assert [c["id"] for c in interrupt["data"]["candidates"]] == ["twin-1", "twin-2"]
    assert events[-1][1] == DONE and "final" not in [kind for kind, _ in events]

    waiting = client.get(f"/v1/threads/{thread_id}").json()
    assert waiting["turns"][-1]["status"] == "interrupted"
    assert waiting["pending_interrupt"]["kind"] == "ambiguous_patient"

    resumed = _ask(client, thread_id, {"resume": {"patient_id": "twin-2"}})
    final = resumed[-2][1]
    assert final["type"] == "final" and final["status"] == "ok"
    assert "Patient/twin-2" in final["data"]["sources"]
    after = client.get(f"/v1/threads/{thread_id}").json()
    assert after["pending_interrupt"] is None and [t["status"] for t in after["turns"]] == ["interrupted", "ok"]


def test_threads_belong_to_their_owner_and_need_the_clinician_role(tmp_path: Path) -> None:
    runtime = _thread_runtime(tmp_path, PlanningReasoner())
    keys: dict[str, str] = {}
    specs: list[ApiKeySpec] = []
    for user, roles in (("ann", ["clinician"]), ("bob", ["clinician"]), ("aud", ["auditor"])):
        key, spec = new_api_key(user, roles, user)  # type: ignore[arg-type]
        keys[user], specs = key, [*specs, spec]
    runtime.settings.service.api_keys = specs
    client = TestClient(create_app(runtime.settings, runtime))

    assert client.post("/v1/threads", json={"patient_id": NOIMG}).status_code == 401
    denied = client.post("/v1/threads", json={"patient_id": NOIMG}, headers={"X-API-Key": keys["aud"]})
    assert denied.status_code == 403
    thread_id = client.post("/v1/threads", json={"patient_id": NOIMG}, headers={"X-API-Key": keys["ann"]}).json()[
        "thread_id"
    ]
    other = client.get(f"/v1/threads/{thread_id}", headers={"X-API-Key": keys["bob"]})
    assert other.status_code == 404 and other.json()["code"] == "thread_not_found"
    posted = client.post(
        f"/v1/threads/{thread_id}/messages", json={"question": "Status?"}, headers={"X-API-Key": keys["bob"]}
    )
    assert posted.status_code == 404
    events = _ask(
        client,
        thread_id,
        {"question": "Status?"},
        headers={"X-API-Key": keys["ann"], "X-Purpose-Of-Use": "ETREAT"},
    )
    run = load_run(runtime.engine, events[-2][1]["data"]["run_id"]).run
    assert (run.user_id, run.user_role, run.purpose_of_use) == ("ann", "clinician", "ETREAT")


def test_invalid_messages_are_refused_before_any_run(tmp_path: Path) -> None:
    runtime = _thread_runtime(tmp_path, PlanningReasoner())
    client = TestClient(create_app(runtime.settings, runtime))
    thread_id = client.post("/v1/threads", json={"patient_id": NOIMG}).json()["thread_id"]
    both = client.post(f"/v1/threads/{thread_id}/messages", json={"question": "a", "resume": {"patient_id": "x"}})
    assert both.status_code == 422 and both.json()["code"] == "invalid_request"
    neither = client.post(f"/v1/threads/{thread_id}/messages", json={})
    assert neither.status_code == 422
    assert client.post("/v1/threads", json={"patient_id": "../etc"}).status_code == 422
    assert client.get("/v1/threads/nope").status_code == 404
    assert list_runs(runtime.engine) == []


def test_a_failed_run_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    runtime = _thread_runtime(tmp_path, PlanningReasoner())
    client = TestClient(create_app(runtime.settings, runtime))
    thread_id = client.post("/v1/threads", json={"patient_id": "nobody"}).json()["thread_id"]
    events = _ask(client, thread_id, {"question": "Status?"})
    kind, error = events[-2]
    assert kind == "error" and error["data"]["code"] == "patient_not_found" and error["data"]["details"]["run_id"]
    assert events[-1][1] == DONE
    assert load_run(runtime.engine, error["data"]["details"]["run_id"]).run.status == "failed"


def test_a_client_that_disconnects_mid_stream_cancels_its_run_and_the_trace_verifies(tmp_path: Path) -> None:
    gate = threading.Event()
    runtime = _thread_runtime(tmp_path, PlanningReasoner(block=gate))
    app = create_app(runtime.settings, runtime)
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        thread_id = http.post("/v1/threads", json={"patient_id": NOIMG}).json()["thread_id"]
        with http.stream("POST", f"/v1/threads/{thread_id}/messages", json={"question": "Status?"}) as reply:
            for line in reply.iter_lines():
                if '"node":"plan"' in line:  # the run is now waiting on the (blocked) model
                    break
        # the connection is closed: the run must end as cancelled, and the thread be free again
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            runs = list_runs(runtime.engine)
            if runs and runs[0].status != "running":
                break
            time.sleep(0.1)
        gate.set()
        assert runs[0].status == "cancelled", runs
        report = verify_trace(runtime.engine, verifiers=verifiers_for(runtime.signer))
        assert report.ok, report
        with http.stream("POST", f"/v1/threads/{thread_id}/messages", json={"question": "Again?"}) as again:
            assert again.status_code == 200
            events = read_sse(again.iter_lines())
        assert events[-2][1]["status"] == "ok"


def test_one_message_at_a_time_per_thread(tmp_path: Path) -> None:
    gate = threading.Event()
    runtime = _thread_runtime(tmp_path, PlanningReasoner(block=gate))
    app = create_app(runtime.settings, runtime)
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        thread_id = http.post("/v1/threads", json={"patient_id": NOIMG}).json()["thread_id"]
        with http.stream("POST", f"/v1/threads/{thread_id}/messages", json={"question": "Status?"}) as first:
            lines = first.iter_lines()
            for line in lines:
                if '"node":"plan"' in line:
                    break
            busy = http.post(f"/v1/threads/{thread_id}/messages", json={"question": "Meanwhile?"})
            assert busy.status_code == 409 and busy.json()["code"] == "thread_busy"
            assert thread_id in app.state.thread_locks
            gate.set()
            rest = read_sse(lines)
        assert rest[-2][1]["status"] == "ok" and rest[-1][1] == DONE
        # once the reply is over its lock is not kept: a long-running service holds none per idle thread
        deadline = time.monotonic() + 5
        while thread_id in app.state.thread_locks and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert thread_id not in app.state.thread_locks
