"""``medagent bench service``: many concurrent SSE chats against the real service process.

What runs: ``medagent serve`` in its own process (embedded fixtures, the SQL trace, the thread
checkpointer), its MedGemma a fast fake OpenAI-compatible endpoint on 127.0.0.1
(:mod:`agent.bench.fake_chat`) and its MedSigLIP the tiny test model, so the figures are what the
service adds around the models. Each chat opens a thread and posts one question, reading the SSE
reply to ``[DONE]``.

Added latency of a chat = the client's time from sending the message to ``[DONE]`` minus the run's
own duration in the trace (``run_started`` to ``run_finished``): HTTP, SSE framing, waiting for a
worker thread, checkpointer and trace set-up. It is reported for the chats run one at a time and
all at once, side by side. Peak RSS is the server process's high-water mark (``VmHWM``).

Then a burst of FHIR subscription notifications (R5 ``subscription-notification`` bundles, each
with a new ImagingStudy of a fixture patient, 30% of them byte-identical redeliveries, 50 in
flight) goes to ``/fhir/notifications``; the benchmark waits until every summary job has finished
and checks each distinct event was summarized exactly once.

The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from agent.audit.db import make_engine
from agent.audit.reader import load_run
from agent.audit.tables import AuditRun
from agent.bench.fake_chat import FakeChatServer
from agent.config import DEFAULT_FIXTURES
from agent.jobs.tables import SummaryJob
from agent.service.sse import DONE, read_sse

QUESTIONS = (
    "What are the active problems?",
    "What is the latest creatinine?",
    "Which medications is the patient on?",
    "Any allergies?",
    "What does the latest chest X-ray show?",
)


@dataclass
class ChatOutcome:
    """One chat as the client saw it."""

    ok: bool
    total_ms: float
    run_id: str | None = None
    error: str | None = None
    events: int = 0


@dataclass
class Phase:
    """A batch of chats and what they cost."""

    outcomes: list[ChatOutcome] = field(default_factory=list)
    wall_s: float = 0.0
    added_ms: list[float] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    """Return the process's resident-set high-water mark (Linux ``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _chat(client: httpx.AsyncClient, patient_id: str, question: str) -> ChatOutcome:
    opened = await client.post("/v1/threads", json={"patient_id": patient_id})
    if opened.status_code != 201:
        return ChatOutcome(ok=False, total_ms=0.0, error=f"open thread: HTTP {opened.status_code}")
    thread_id = opened.json()["thread_id"]
    started = time.perf_counter()
    lines: list[str] = []
    async with client.stream("POST", f"/v1/threads/{thread_id}/messages", json={"question": question}) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return ChatOutcome(ok=False, total_ms=0.0, error=f"message: HTTP {reply.status_code}")
        async for line in reply.aiter_lines():
            lines.append(line)
    total_ms = (time.perf_counter() - started) * 1000
    events = read_sse(lines)
    final = next((data for kind, data in events if kind == "final"), None)
    if not events or events[-1][1] != DONE or final is None or final.get("status") != "ok":
        error = next((data["data"].get("code") for kind, data in events if kind == "error"), "no final event")
        return ChatOutcome(ok=False, total_ms=total_ms, error=str(error), events=len(events))
    return ChatOutcome(ok=True, total_ms=total_ms, run_id=final["data"]["run_id"], events=len(events))


async def _phase(base_url: str, work: list[tuple[str, str]], concurrency: int) -> Phase:
    phase = Phase()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    gate = asyncio.Semaphore(concurrency)

    async def one(patient_id: str, question: str) -> ChatOutcome:
        async with gate:
            try:
                return await _chat(client, patient_id, question)
            except httpx.HTTPError as exc:
                return ChatOutcome(ok=False, total_ms=0.0, error=type(exc).__name__)

    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        phase.outcomes = list(await asyncio.gather(*(one(p, q) for p, q in work)))
        phase.wall_s = time.perf_counter() - started
    return phase


def _run_ms(engine: Any, run_id: str) -> float:
    """Return the run's own duration in the trace: run_started to run_finished."""
    events = load_run(engine, run_id).events
    return (events[-1].at - events[0].at).total_seconds() * 1000


def _summary(phase: Phase) -> dict[str, Any]:
    totals = [o.total_ms for o in phase.outcomes if o.ok]
    return {
        "chats": len(phase.outcomes),
        "errors": sum(not o.ok for o in phase.outcomes),
        "p50_added_ms": round(_percentile(phase.added_ms, 0.5), 1),
        "p99_added_ms": round(_percentile(phase.added_ms, 0.99), 1),
        "p50_total_ms": round(_percentile(totals, 0.5), 1),
        "p99_total_ms": round(_percentile(totals, 0.99), 1),
        "chats_per_s": round(len(totals) / phase.wall_s, 2) if phase.wall_s else 0.0,
    }


SECRET = "bench-subscription-secret-0123456789"


def _notification(subscription: str, number: int, patient_id: str) -> bytes:
    """Return an R5 event notification (full resource) announcing a new ImagingStudy of the patient."""
    study = {
        "resourceType": "ImagingStudy",
        "id": f"bench-study-{number}",
        "meta": {"versionId": "1"},
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "eventsSinceSubscriptionStart": str(number),
        "subscription": {"reference": subscription},
        "topic": "http://example.org/medagent/SubscriptionTopic/new-imaging-study",
        "notificationEvent": [{"eventNumber": str(number), "focus": {"reference": f"ImagingStudy/{study['id']}"}}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status},
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": study},
        ],
    }
    return json.dumps(bundle).encode()


def _burst_bodies(total: int, patients: list[str]) -> tuple[list[bytes], int]:
    """Return ``total`` notifications of which 70% are distinct events and the rest redeliveries, shuffled."""
    rng = random.Random(11)
    distinct = max(1, round(total * 0.7))
    originals = [_notification("Subscription/bench", n, patients[n % len(patients)]) for n in range(1, distinct + 1)]
    bodies = originals + [rng.choice(originals) for _ in range(total - distinct)]
    rng.shuffle(bodies)
    return bodies, distinct


async def _post_burst(base_url: str, bodies: list[bytes], concurrency: int = 50) -> tuple[list[int], float]:
    gate = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/fhir+json", "X-Subscription-Secret": SECRET}

    async def one(client: httpx.AsyncClient, content: bytes) -> int:
        async with gate:
            try:
                return (await client.post("/fhir/notifications", content=content, headers=headers)).status_code
            except httpx.HTTPError:
                return 0

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        started = time.perf_counter()
        statuses = await asyncio.gather(*(one(client, body) for body in bodies))
        return list(statuses), time.perf_counter() - started


def _subscription_jobs(url: str) -> dict[str, int]:
    """Count the subscription jobs by status, and their traced runs that ended ok."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(SummaryJob.status, func.count())
                .where(SummaryJob.trigger == "subscription")
                .group_by(SummaryJob.status)
            ).all()
            runs_total = conn.execute(
                select(func.count())
                .select_from(AuditRun)
                .where(AuditRun.trigger == "subscription", AuditRun.kind == "ask")
            ).scalar_one()
    finally:
        engine.dispose()
    counts = {str(status): int(count) for status, count in rows}
    counts["runs"] = int(runs_total)
    return counts


def _wait_for_summaries(url: str, distinct: int, timeout_s: float) -> tuple[dict[str, int], float]:
    started = time.perf_counter()
    while True:
        counts = _subscription_jobs(url)
        finished = counts.get("done", 0) + counts.get("dead", 0)
        if finished >= distinct or time.perf_counter() - started > timeout_s:
            return counts, time.perf_counter() - started
        time.sleep(1.0)


def run_benchmark(
    *, chats: int, sequential: int, notifications: int, db_url: str | None, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Start the service, run the chats one at a time and then all at once, then the notification burst."""
    manifest = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
    patients = [p["patient_id"] for p in manifest["patients"]]
    work = [(patients[n % len(patients)], QUESTIONS[n % len(QUESTIONS)]) for n in range(chats)]
    fake = FakeChatServer()
    with tempfile.TemporaryDirectory(prefix="medagent-bench-service-") as tmp:
        url = db_url or f"sqlite:///{Path(tmp) / 'trace.db'}"
        threads = db_url or f"sqlite:///{Path(tmp) / 'threads.db'}"
        port = _free_port()
        env = {
            **os.environ,
            "MEDAGENT_DB__URL": url,
            "MEDAGENT_AGENT__CHECKPOINTER_URL": threads,
            "MEDAGENT_MODELS__BACKEND": "remote",
            "MEDAGENT_MODELS__REMOTE_URL": fake.base_url,
            "MEDAGENT_MODELS__REMOTE_MODEL": fake.model,
            "MEDAGENT_MODELS__USE_TEST_MODELS": "true",
            "MEDAGENT_MODELS__TEST_MODELS_DIR": str(Path(tmp) / "test-models"),
            "MEDAGENT_SERVICE__RATE_LIMIT_PER_MINUTE": "0",
            "MEDAGENT_IMAGING__SIMILAR_CASES": "0",
            "MEDAGENT_SERVICE__SUBSCRIPTION_SECRET": SECRET,
        }
        log_path = Path(tmp) / "serve.log"
        command = [sys.executable, "-m", "agent.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with log_path.open("wb") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base_url, server, log_path)
            rss_idle = _peak_rss_mb(server.pid)
            warm = asyncio.run(_phase(base_url, work[:1], 1))  # loads the models once
            if warm.outcomes[0].error:
                raise RuntimeError(f"warm-up chat failed: {warm.outcomes[0].error}; see {log_path.read_text()[-2000:]}")
            one_by_one = asyncio.run(_phase(base_url, work[:sequential], 1))
            together = asyncio.run(_phase(base_url, work, chats))
            peak = _peak_rss_mb(server.pid)
            burst: dict[str, Any] = {}
            if notifications:
                bodies, distinct = _burst_bodies(notifications, patients)
                statuses, posted_s = asyncio.run(_post_burst(base_url, bodies))
                jobs, summarized_s = _wait_for_summaries(url, distinct, timeout_s=max(120.0, distinct * 2.0))
                burst = {
                    "notifications": len(bodies),
                    "distinct_events": distinct,
                    "notification_errors": sum(code != 200 for code in statuses),
                    "notifications_s": round(posted_s, 2),
                    "subscription_jobs": sum(v for k, v in jobs.items() if k != "runs"),
                    "summaries_done": jobs.get("done", 0),
                    "summaries_dead": jobs.get("dead", 0),
                    "summary_runs": jobs["runs"],
                    "summaries_s": round(summarized_s, 1),
                }
                burst["each_event_summarized_once"] = (
                    burst["subscription_jobs"] == distinct
                    and burst["summary_runs"] == burst["summaries_done"] == distinct
                )
                peak = _peak_rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            fake.close()
        engine = make_engine(url)
        try:
            for phase in (one_by_one, together):
                phase.added_ms = [o.total_ms - _run_ms(engine, o.run_id) for o in phase.outcomes if o.ok and o.run_id]
        finally:
            engine.dispose()
    alone, loaded = _summary(one_by_one), _summary(together)
    echo(f"{'':24}{'one at a time':>16}{f'{chats} at once':>16}")
    for key in ("chats", "errors", "p50_added_ms", "p99_added_ms", "p50_total_ms", "p99_total_ms", "chats_per_s"):
        echo(f"{key:24}{alone[key]!s:>16}{loaded[key]!s:>16}")
    echo(f"{'server RSS idle / peak':24}{rss_idle:>15.0f}M{peak:>15.0f}M")
    if burst:
        echo(
            f"notifications: {burst['notifications']} posted ({burst['distinct_events']} distinct) in "
            f"{burst['notifications_s']} s, {burst['notification_errors']} errors; {burst['subscription_jobs']} jobs, "
            f"{burst['summaries_done']} summarized ({burst['summary_runs']} runs) in {burst['summaries_s']} s"
        )
    if loaded["errors"]:
        kinds = sorted({o.error or "?" for o in together.outcomes if not o.ok})
        echo(f"errors: {', '.join(kinds)}")
    result = {
        "concurrent_chats": chats,
        "errors": loaded["errors"],
        "p50_added_ms": loaded["p50_added_ms"],
        "p99_added_ms": loaded["p99_added_ms"],
        "peak_rss_mb": round(peak, 1),
        "idle_rss_mb": round(rss_idle, 1),
        "p50_total_ms": loaded["p50_total_ms"],
        "p99_total_ms": loaded["p99_total_ms"],
        "sequential_chats": alone["chats"],
        "sequential_errors": alone["errors"],
        "sequential_p50_added_ms": alone["p50_added_ms"],
        "sequential_p99_added_ms": alone["p99_added_ms"],
        "added_ratio_p50": round(loaded["p50_added_ms"] / alone["p50_added_ms"], 2) if alone["p50_added_ms"] else None,
        "database": "postgresql" if url.startswith("postgres") else "sqlite",
        **burst,
    }
    echo(json.dumps(result))
    return result


def _wait_ready(base_url: str, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"medagent serve exited ({server.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"medagent serve did not start in {timeout_s:.0f} s")
