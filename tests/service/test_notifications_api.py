"""The FHIR Subscription rest-hook over HTTP: sender secret, every notification shape, dedup, a 1,000-post burst.

Real: the app and its in-process job queue (started by the lifespan), SQL (SQLite; the burst also
on PostgreSQL), the trace, the bundle-folder FHIR source, and the live FHIR engine for id-only and
empty payloads. Fake: the models the queued jobs would run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from agent.audit.reader import load_run
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.inference.factory import LoadedModels
from agent.jobs.notifications import list_events
from agent.jobs.store import JobRecord, list_jobs
from agent.runtime import AgentRuntime, ModelCache
from agent.service.app import create_app
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner
from tests.integrations.test_fhir_notifications import (
    backport_bundle,
    body,
    diagnostic_report,
    imaging_study,
    r5_bundle,
)
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import FhirServerHandle

SECRET = "test-subscription-secret-7f3a"
HEADERS = {"X-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
CXR, CT = PATIENTS["cxr"], PATIENTS["ct"]
CXR_STUDY = CXR["studies"][-1]["imaging_study_id"]
CT_STUDY = CT["studies"][0]["imaging_study_id"]
#: A DiagnosticReport of the CT patient in fixtures/fhir/ct.json (and on the live FHIR engine).
CT_REPORT = "e478785a-cae4-54fa-8e7e-fe0e7351e3c4"


def make_runtime(db_url: str, *, fhir: dict[str, Any] | None = None, secret: str | None = SECRET) -> AgentRuntime:
    """Return a runtime over the fixture patients with fake models and the subscription secret set."""
    settings = get_settings(
        fhir=fhir or {"bundle_dir": DEFAULT_FIXTURES / "fhir"},
        dicom={"dicom_dir": DEFAULT_FIXTURES / "dicom"},
        db={"url": db_url},
        service={"subscription_secret": secret},
        jobs={"poll_interval_s": 0.05},
    )
    loaded = LoadedModels(scorer=FakeScorer(), reasoner=ScriptedReasoner(), used_test_models=False, banner=None)
    return AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[AgentRuntime]:
    made = make_runtime(f"sqlite:///{tmp_path / 'trace.db'}")
    yield made
    made.engine.dispose()


@pytest.fixture
def client(runtime: AgentRuntime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as test_client:
        yield test_client


def subscription_jobs(runtime: AgentRuntime) -> list[JobRecord]:
    return [job for job in list_jobs(runtime.engine, limit=5000) if job.trigger == "subscription"]


def post(client: TestClient, data: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
    content = data if isinstance(data, bytes) else body(data)
    return client.post("/fhir/notifications", content=content, headers={**HEADERS, **headers})


# -- the sender --------------------------------------------------------------------------------------


def test_the_subscription_secret_is_required(client: TestClient, runtime: AgentRuntime) -> None:
    study = imaging_study(CXR_STUDY, CXR["patient_id"])
    notification = body(backport_bundle(events=[(1, f"ImagingStudy/{CXR_STUDY}", None)], resources=[study]))
    for headers in ({"Content-Type": "application/fhir+json"}, {**HEADERS, "X-Subscription-Secret": "wrong"}):
        reply = client.post("/fhir/notifications", content=notification, headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["code"] == "not_authenticated" and "X-Subscription-Secret" in reply.json()["detail"]
    # An API key is not a sender's credential here.
    reply = client.post("/fhir/notifications", content=notification, headers={"X-API-Key": SECRET})
    assert reply.status_code == 401
    runtime.ensure_schema()
    assert list_events(runtime.engine) == [] and subscription_jobs(runtime) == []
    assert post(client, notification).status_code == 200


def test_without_a_secret_dev_accepts_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'trace.db'}", secret=None)
    handshake = body(backport_bundle(kind="handshake"))
    with TestClient(create_app(runtime.settings, runtime)) as client, caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert client.post("/fhir/notifications", content=handshake).status_code == 200
    warnings = [r for r in caplog.records if "subscription_secret" in r.getMessage()]
    assert len(warnings) == 1


# -- notification kinds and payloads -----------------------------------------------------------------


def test_handshake_and_heartbeat_are_acknowledged_and_queue_nothing(client: TestClient, runtime: AgentRuntime) -> None:
    for data, kind, flavor in (
        (backport_bundle(kind="handshake"), "handshake", "r4-backport"),
        (r5_bundle(kind="heartbeat"), "heartbeat", "r4b-r5"),
        (r5_bundle(kind="query-status"), "query-status", "r4b-r5"),
    ):
        reply = post(client, data)
        assert reply.status_code == 200, reply.text
        receipt = reply.json()
        assert (receipt["kind"], receipt["flavor"], receipt["queued"]) == (kind, flavor, [])
    runtime.ensure_schema()
    assert list_events(runtime.engine) == [] and subscription_jobs(runtime) == []


def test_full_resource_event_queues_one_summary_and_a_redelivery_is_a_duplicate(
    client: TestClient, runtime: AgentRuntime
) -> None:
    study = imaging_study(CXR_STUDY, CXR["patient_id"])
    observation = {"resourceType": "Observation", "id": "o-1", "subject": {"reference": f"Patient/{CXR['patient_id']}"}}
    notification = backport_bundle(
        events=[(7, f"ImagingStudy/{CXR_STUDY}", "2026-10-14T14:20:00Z"), (8, "Observation/o-1", None)],
        resources=[study, observation],
    )
    reply = post(client, notification)
    assert reply.status_code == 200, reply.text
    receipt = reply.json()
    assert receipt["payload"] == "full-resource" and receipt["run_id"] is None  # nothing had to be read
    [queued] = receipt["queued"]
    assert (queued["event_number"], queued["focus"]) == (7, f"ImagingStudy/{CXR_STUDY}")
    [ignored] = receipt["ignored"]
    assert ignored["focus"] == "Observation/o-1" and "ImagingStudy and DiagnosticReport" in ignored["reason"]

    [job] = subscription_jobs(runtime)
    assert job.id == queued["job_id"]
    assert (job.patient_id, job.focus, job.idempotency_key) == (
        CXR["patient_id"],
        f"ImagingStudy/{CXR_STUDY}",
        "sub:Subscription/sub-1:7",
    )
    assert job.requested_by == "fhir-subscription"

    again = post(client, notification).json()
    assert again["queued"] == [] and again["ignored"] == []
    assert {(d["event_number"], d["job_id"]) for d in again["duplicates"]} == {(7, job.id), (8, None)}
    assert len(subscription_jobs(runtime)) == 1
    events = {(e.event_number, e.focus, e.job_id) for e in list_events(runtime.engine)}
    assert events == {(7, f"ImagingStudy/{CXR_STUDY}", job.id), (8, "Observation/o-1", None)}


def test_r5_notification_of_a_report_queues_a_summary(client: TestClient, runtime: AgentRuntime) -> None:
    report = diagnostic_report(CT_REPORT, CT["patient_id"])
    reply = post(
        client,
        r5_bundle(events=[(41, f"DiagnosticReport/{CT_REPORT}", None)], resources=[report]),
        **{"Content-Type": "application/json; charset=utf-8"},
    )
    assert reply.status_code == 200, reply.text
    [queued] = reply.json()["queued"]
    [job] = subscription_jobs(runtime)
    assert job.id == queued["job_id"] and job.patient_id == CT["patient_id"]
    assert job.idempotency_key == "sub:Subscription/sub-5:41"


def test_a_focus_without_a_patient_subject_is_ignored(client: TestClient, runtime: AgentRuntime) -> None:
    study = imaging_study("s-group", "x") | {"subject": {"reference": "Group/g-1"}}
    reply = post(client, r5_bundle(events=[(1, "ImagingStudy/s-group", None)], resources=[study])).json()
    assert reply["queued"] == [] and reply["ignored"][0]["reason"] == "the focus has no Patient subject"
    assert subscription_jobs(runtime) == []


def test_r4_criteria_deliveries_are_deduplicated_by_resource_version(client: TestClient, runtime: AgentRuntime) -> None:
    path = f"/fhir/notifications/ImagingStudy/{CT_STUDY}"
    v1 = body(imaging_study(CT_STUDY, CT["patient_id"], version="1"))
    first = client.put(path, content=v1, headers=HEADERS)
    assert first.status_code == 200, first.text
    assert first.json()["flavor"] == "r4-criteria" and len(first.json()["queued"]) == 1
    assert client.put(path, content=v1, headers=HEADERS).json()["queued"] == []  # redelivered: same version
    v2 = body(imaging_study(CT_STUDY, CT["patient_id"], version="2"))
    assert len(client.put(path, content=v2, headers=HEADERS).json()["queued"]) == 1  # a new version

    posted = post(client, diagnostic_report(CT_REPORT, CT["patient_id"]), **{"X-Subscription-Id": "Subscription/r4"})
    assert posted.json()["subscription"] == "Subscription/r4" and len(posted.json()["queued"]) == 1

    jobs = subscription_jobs(runtime)
    assert len(jobs) == 3 and {j.patient_id for j in jobs} == {CT["patient_id"]}
    assert {j.focus for j in jobs} == {f"ImagingStudy/{CT_STUDY}", f"DiagnosticReport/{CT_REPORT}"}
    mismatch = client.put(path, content=body(diagnostic_report(CT_REPORT, "p")), headers=HEADERS)
    assert mismatch.status_code == 422 and "does not match" in mismatch.json()["detail"]


def test_an_empty_r4_delivery_is_noted_in_the_trace(client: TestClient, runtime: AgentRuntime) -> None:
    reply = client.post("/fhir/notifications", headers={"X-Subscription-Secret": SECRET})
    assert reply.status_code == 200, reply.text
    receipt = reply.json()
    assert receipt["payload"] == "empty" and "nothing to summarize" in receipt["note"]
    trace = load_run(runtime.engine, receipt["run_id"])
    assert (trace.run.kind, trace.run.trigger, trace.run.status) == ("notification", "subscription", "ok")
    assert "nothing_to_summarize" in [e.name for e in trace.events]
    assert subscription_jobs(runtime) == []


def test_empty_topic_payload_without_events_support_is_noted_once(client: TestClient, runtime: AgentRuntime) -> None:
    # The bundle-folder source has no $events: the note says so, and a redelivery adds nothing.
    notification = backport_bundle(subscription="Subscription/sub-e", events=[(3, None, None)])
    receipt = post(client, notification).json()
    assert receipt["payload"] == "empty" and "$events" in receipt["note"] and receipt["queued"] == []
    trace = load_run(runtime.engine, receipt["run_id"])
    assert "events_operation_failed" in [e.name for e in trace.events]
    again = post(client, notification).json()
    assert [d["event_number"] for d in again["duplicates"]] == [3] and again["run_id"] is None


# -- over the live FHIR engine -------------------------------------------------------------------


def test_id_only_payload_reads_the_focus_from_the_fhir_server(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'trace.db'}", fhir={"base_url": fhir_server.base_url})
    notification = backport_bundle(
        events=[(1, f"DiagnosticReport/{CT_REPORT}", None), (2, "ImagingStudy/no-such-study", None)],
        id_only=[f"DiagnosticReport/{CT_REPORT}", "ImagingStudy/no-such-study"],
    )
    with TestClient(create_app(runtime.settings, runtime)) as client:
        reply = post(client, notification)
    assert reply.status_code == 200, reply.text
    receipt = reply.json()
    assert receipt["payload"] == "id-only"
    [queued] = receipt["queued"]
    [job] = subscription_jobs(runtime)
    assert job.id == queued["job_id"] and job.patient_id == CT["patient_id"]
    assert receipt["ignored"][0]["reason"] == "the focus was not found on the FHIR source"

    trace = load_run(runtime.engine, receipt["run_id"])
    assert (trace.run.kind, trace.run.user_role, trace.run.status) == ("notification", "service", "ok")
    reads = [(e.meta["path"], e.meta["status"]) for e in trace.events if e.kind == "fhir_request"]
    assert (f"DiagnosticReport/{CT_REPORT}", 200) in reads and ("ImagingStudy/no-such-study", 404) in reads


def test_empty_topic_payload_asks_the_servers_events_operation(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    # The engine has no $events; the proxy in front of it answers that one operation as a server would.
    listed = r5_bundle(
        kind="query-event", subscription="Subscription/sub-e", events=[(3, f"ImagingStudy/{CT_STUDY}", None)]
    )
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^Subscription/sub-e/\$events\?", [Fault.status_code(200, body=body(listed))])
        runtime = make_runtime(f"sqlite:///{tmp_path / 'trace.db'}", fhir={"base_url": proxy.base_url})
        with TestClient(create_app(runtime.settings, runtime)) as client:
            receipt = post(client, r5_bundle(subscription="Subscription/sub-e", events=[(3, None, None)])).json()
        asked = [r.path for r in proxy.records]
    assert receipt["payload"] == "empty" and receipt["note"] is None
    [queued] = receipt["queued"]
    assert queued["focus"] == f"ImagingStudy/{CT_STUDY}"
    [job] = subscription_jobs(runtime)
    assert job.patient_id == CT["patient_id"] and job.idempotency_key == "sub:Subscription/sub-e:3"
    events_call = next(path for path in asked if "$events" in path)
    assert "eventsSinceNumber=3" in events_call and "content=id-only" in events_call
    assert f"ImagingStudy/{CT_STUDY}" in asked


def test_a_failing_fhir_source_is_a_502_and_the_redelivery_queues(
    fhir_server: FhirServerHandle, tmp_path: Path
) -> None:
    notification = r5_bundle(
        events=[(7, f"DiagnosticReport/{CT_REPORT}", None)], id_only=[f"DiagnosticReport/{CT_REPORT}"]
    )
    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(rf"^DiagnosticReport/{CT_REPORT}$", [Fault.status_code(503)])
        runtime = make_runtime(
            f"sqlite:///{tmp_path / 'trace.db'}", fhir={"base_url": proxy.base_url, "max_retries": 0}
        )
        with TestClient(create_app(runtime.settings, runtime)) as client:
            failed = post(client, notification)
            retried = post(client, notification)  # the server retries: the event was recorded, not lost
    assert failed.status_code == 502 and failed.json()["code"] == "source_unavailable"
    assert load_run(runtime.engine, failed.json()["run_id"]).run.status == "failed"
    [queued] = retried.json()["queued"]
    [job] = subscription_jobs(runtime)
    assert job.id == queued["job_id"] and job.patient_id == CT["patient_id"]


# -- bad input -----------------------------------------------------------------------------------


def test_malformed_notifications_are_problems_and_queue_nothing(client: TestClient, runtime: AgentRuntime) -> None:
    cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (b"{oops", {}, 400, "notification_unreadable"),
        (b'"just a string"', {}, 400, "notification_unreadable"),
        (body({"resourceType": "Bundle", "type": "history", "entry": []}), {}, 422, "notification_invalid"),
        (body(backport_bundle(kind="event-notifcation")), {}, 422, "notification_invalid"),
        (
            b"<Bundle xmlns='http://hl7.org/fhir'/>",
            {"Content-Type": "application/fhir+xml"},
            415,
            "unsupported_media_type",
        ),
    ]
    for content, headers, status, code in cases:
        reply = post(client, content, **headers)
        assert reply.status_code == status, (content[:40], reply.text)
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["code"] == code and reply.json()["detail"]
    too_big = post(client, b" " * (5 * 1024 * 1024 + 1))
    assert too_big.status_code == 413 and too_big.json()["code"] == "payload_too_large"
    runtime.ensure_schema()
    assert list_events(runtime.engine) == [] and subscription_jobs(runtime) == []


# -- the burst -----------------------------------------------------------------------------------


def burst_bodies(distinct: int, total: int, seed: int = 7) -> tuple[list[bytes], dict[str, int]]:
    """Return ``total`` notifications covering ``distinct`` events (the rest are copies), shuffled.

    Events alternate between R4 backport and R5 senders, and between studies and reports of the
    fixture patients; copies of one event are byte-identical, as a redelivery is.
    """
    rng = random.Random(seed)
    patients = [CXR["patient_id"], CT["patient_id"], PATIENTS["noimg"]["patient_id"]]
    originals: list[bytes] = []
    keys: dict[str, int] = {}
    for n in range(1, distinct + 1):
        patient = patients[n % len(patients)]
        if n % 2:
            resource = imaging_study(f"burst-study-{n}", patient)
            focus = f"ImagingStudy/burst-study-{n}"
        else:
            resource = diagnostic_report(f"burst-report-{n}", patient)
            focus = f"DiagnosticReport/burst-report-{n}"
        builder, subscription = (
            (backport_bundle, "Subscription/burst-a") if n % 3 else (r5_bundle, "Subscription/burst-b")
        )
        originals.append(body(builder(subscription=subscription, events=[(n, focus, None)], resources=[resource])))
        keys[f"sub:{subscription}:{n}"] = n
    copies = [rng.choice(originals) for _ in range(total - distinct)]
    bodies = originals + copies
    rng.shuffle(bodies)
    return bodies, keys


async def run_burst(app: FastAPI, bodies: list[bytes], *, concurrency: int = 50) -> tuple[list[httpx.Response], float]:
    """Post every body at once (``concurrency`` in flight) through the app and its lifespan; return replies, seconds."""
    limit = asyncio.Semaphore(concurrency)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://medagent.test", timeout=120) as client:

            async def send(content: bytes) -> httpx.Response:
                async with limit:
                    return await client.post("/fhir/notifications", content=content, headers=HEADERS)

            started = time.perf_counter()
            replies = await asyncio.gather(*(send(content) for content in bodies))
            elapsed = time.perf_counter() - started
    return list(replies), elapsed


async def test_concurrent_copies_of_one_event_queue_one_job(runtime: AgentRuntime) -> None:
    study = imaging_study(CXR_STUDY, CXR["patient_id"])
    copy = body(
        r5_bundle(subscription="Subscription/hot", events=[(9, f"ImagingStudy/{CXR_STUDY}", None)], resources=[study])
    )
    replies, _ = await run_burst(create_app(runtime.settings, runtime), [copy] * 100, concurrency=100)
    receipts = [r.json() for r in replies]
    assert sum(len(r["queued"]) for r in receipts) == 1
    assert sum(len(r["duplicates"]) for r in receipts) == 99
    [job] = await asyncio.to_thread(subscription_jobs, runtime)
    assert {d["job_id"] for r in receipts for d in r["duplicates"]} == {job.id}


@pytest.mark.slow
async def test_a_burst_of_1000_notifications_with_duplicates_queues_each_event_once(db_url: str) -> None:
    distinct, total = 700, 1000
    runtime = make_runtime(db_url)
    await asyncio.to_thread(runtime.ensure_schema)
    bodies, keys = burst_bodies(distinct, total)
    app = create_app(runtime.settings, runtime)
    try:
        replies, elapsed = await run_burst(app, bodies)
        jobs = await asyncio.to_thread(subscription_jobs, runtime)
        events = await asyncio.to_thread(list_events, runtime.engine, limit=5000)
    finally:
        runtime.engine.dispose()

    assert [r.status_code for r in replies if r.status_code != 200] == []
    receipts = [r.json() for r in replies]
    queued = [q for r in receipts for q in r["queued"]]
    duplicates = [d for r in receipts for d in r["duplicates"]]
    assert len(queued) == distinct and len(duplicates) == total - distinct
    assert len({q["job_id"] for q in queued}) == distinct
    assert len(jobs) == distinct
    assert {job.idempotency_key for job in jobs} == set(keys)
    # every duplicate names the one job of its event
    job_of_event = {(q["focus"], q["event_number"]): q["job_id"] for q in queued}
    assert all(job_of_event[(d["focus"], d["event_number"])] == d["job_id"] for d in duplicates)
    assert len(events) == distinct
    print(
        json.dumps(
            {
                "burst_posts": total,
                "distinct_events": distinct,
                "db": db_url.split(":")[0],
                "seconds": round(elapsed, 2),
            }
        )
    )
