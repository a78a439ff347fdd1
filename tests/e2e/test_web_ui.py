"""The web UI end to end in headless Chromium: ask, read the cited answer, open a citation, audit the run;
open a stored summary from a CDS Hooks card's link (done, being prepared, dead, unknown, forbidden).

Real: the app under uvicorn on 127.0.0.1 (threads over SSE, records, audit endpoints, summary jobs on
the in-process queue), bundle-folder FHIR, DICOM-folder imaging, pixel preparation, the SQL trace,
API keys, and Debian's chromium driven by Playwright (no browser download). Scripted: the models
(tests/graph/test_ask_flow.py), so the answer cites one real record and one made-up one.
Screenshots go under the test's tmp_path only.

Plain (non-async) tests: Playwright's sync API refuses to run inside an event loop.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from agent.audit.reader import list_runs, load_run
from agent.inference.protocols import GenerationRequest, GenerationResult
from agent.runtime import AgentRuntime
from agent.service.auth import new_api_key
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime
from tests.service.test_records_api import make_app
from tests.support.plugin_servers import skip_or_fail_missing
from tests.support.servers import ServerToolMissingError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CXR = PATIENTS["cxr"]
#: Generous for a 2-core CI machine; the whole scenario takes a few seconds here.
WAIT_MS = 60_000

pytestmark = pytest.mark.slow


class LiveServer:
    """The app under uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, runtime: AgentRuntime) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(make_app(runtime), log_level="warning", ws="none", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


class GatedReasoner(ScriptedReasoner):
    """The scripted reasoner, holding each call until the test opens the gate: a job that stays running."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if not self.gate.wait(WAIT_MS / 1000):
            raise TimeoutError("the test never opened the gate")
        return super().generate(request)


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def runtime(tmp_path: Path, request: pytest.FixtureRequest, gate: threading.Event) -> AgentRuntime:
    """The app's runtime; parametrized indirectly with "gated", its reasoner waits for ``gate``."""
    gated = getattr(request, "param", None) == "gated"
    return _runtime(tmp_path, FakeScorer(), GatedReasoner(gate) if gated else ScriptedReasoner())


@pytest.fixture
def api_key(runtime: AgentRuntime) -> str:
    """A key for one person who is both clinician and auditor (the UI needs no key in an open dev process)."""
    key, spec = new_api_key("dr-quinn", ["clinician", "auditor"], "e2e key")
    runtime.settings.service.api_keys.append(spec)
    return key


@pytest.fixture
def auditor_key(runtime: AgentRuntime) -> str:
    """A key for an auditor who is not a clinician (keys are read when the app starts)."""
    key, spec = new_api_key("ann-auditor", ["auditor"], "e2e auditor key")
    runtime.settings.service.api_keys.append(spec)
    return key


@pytest.fixture
def live(runtime: AgentRuntime, api_key: str, auditor_key: str) -> Iterator[LiveServer]:
    server = LiveServer(runtime)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """Yield a page of Debian's chromium with a fresh, empty profile; collect console errors on it."""
    if not CHROMIUM.exists():
        skip_or_fail_missing(
            "web UI (chromium)",
            ServerToolMissingError(f"{CHROMIUM} is missing: run tools/install_test_deps.sh (Debian package chromium)"),
        )
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.console_errors = errors  # type: ignore[attr-defined]
            yield page
        finally:
            context.close()


def test_ask_cite_open_and_verify_in_the_browser(
    live: LiveServer, browser_page: Any, api_key: str, runtime: AgentRuntime, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = browser_page
    shots = tmp_path / "screenshots"
    page.goto(f"{live.base_url}/")  # redirected to /ui/
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    assert page.url == f"{live.base_url}/ui/"
    expect(page.get_by_test_id("disclaimer")).to_be_visible()
    expect(page.get_by_test_id("disclaimer")).to_contain_text("not a diagnostic device")
    expect(page.get_by_test_id("service-info")).to_contain_text(runtime.settings.models.medgemma)

    # without the key the API refuses, and the page says so
    page.get_by_test_id("patient-identifier").fill(CXR["mrn"])
    page.get_by_test_id("patient-search-button").click()
    expect(page.get_by_test_id("error")).to_contain_text("not_authenticated")

    # pick the patient by MRN, with the key
    page.get_by_test_id("api-key").fill(api_key)
    page.get_by_test_id("patient-search-button").click()
    option = page.locator(f"[data-testid=patient-option][data-patient-id='{CXR['patient_id']}']")
    expect(option).to_contain_text(CXR["name"])
    option.click()
    expect(page.get_by_test_id("current-patient")).to_contain_text(CXR["name"])

    # ask, and watch the run
    page.get_by_test_id("question").fill("How is the heart failure?")
    page.get_by_test_id("ask-button").click()
    expect(page.get_by_test_id("run-status")).to_have_attribute("data-status", "ok")
    steps = page.get_by_test_id("progress-step")
    expect(page.locator("[data-testid=progress-step][data-node=reason]")).to_have_attribute("data-status", "finished")
    assert steps.count() >= 5

    answer = page.get_by_test_id("answer")
    expect(answer).to_contain_text("heart failure")
    link = answer.get_by_test_id("citation-link")
    expect(link).to_have_count(1)
    cited = link.get_attribute("data-reference")
    assert cited is not None and cited.startswith("Condition/")
    dangling = page.get_by_test_id("citation-dangling")
    expect(dangling).to_have_text("[Observation/00000000-made-up]")
    assert dangling.evaluate("node => node.tagName") == "S"
    assert "made-up" not in (answer.text_content() or "")

    # the study's images: the current PA and lateral, each with its top MedSigLIP labels
    thumbs = page.get_by_test_id("thumbnail")
    expect(thumbs).to_have_count(2)
    loaded = page.locator("[data-testid=thumbnail-img][data-loaded=true]")
    expect(loaded).to_have_count(2)
    assert loaded.first.evaluate("img => img.naturalWidth") == 256
    assert loaded.first.get_attribute("src", timeout=WAIT_MS).startswith("data:image/png;base64,")
    current = max(CXR["studies"], key=lambda s: s["started"])
    assert {t.get_attribute("data-sop-instance-uid") for t in thumbs.all()} == {
        i["sop_instance_uid"] for i in current["instances"]
    }
    expect(thumbs.first.get_by_test_id("finding-label")).to_have_count(3)
    expect(page.get_by_test_id("run-models")).to_contain_text("scripted-reasoner")
    page.screenshot(path=str(shots / "answer.png"), full_page=True)

    # open the citation: the resource the run read, in the side panel
    link.click()
    expect(page.get_by_test_id("resource-panel")).to_be_visible()
    expect(page.get_by_test_id("resource-title")).to_have_text(cited)
    expect(page.get_by_test_id("resource-json")).to_contain_text('"resourceType": "Condition"')
    expect(page.get_by_test_id("resource-json")).to_contain_text(f'"id": "{cited.split("/")[1]}"')
    page.screenshot(path=str(shots / "citation.png"), full_page=True)

    # the audit view of that run: its timeline and its verification
    runs = [r for r in list_runs(runtime.engine) if r.kind == "ask"]
    assert len(runs) == 1 and runs[0].trigger == "chat" and runs[0].user_id == "dr-quinn"
    run_id = runs[0].run_id
    page.get_by_test_id("open-audit").click()
    expect(page.get_by_test_id("audit-view")).to_be_visible()
    expect(page.get_by_test_id("run-title")).to_contain_text(run_id)
    expect(page.locator(f"[data-testid=run-row][data-run-id='{run_id}']")).to_have_count(1)
    timeline = page.get_by_test_id("timeline")
    expect(timeline.locator("[data-kind=model_call]")).to_have_count(3)
    fhir_events = timeline.locator("[data-kind=fhir_request]")
    assert fhir_events.count() == sum(1 for e in load_run(runtime.engine, run_id).events if e.kind == "fhir_request")
    expect(fhir_events.first).to_contain_text(f"Patient/{CXR['patient_id']}")
    expect(timeline.locator("[data-kind=model_call]").last).to_contain_text("scripted-reasoner")
    expect(page.get_by_test_id("timeline-summary")).to_contain_text("3 model call(s)")
    page.get_by_test_id("verify-button").click()
    expect(page.get_by_test_id("verify-result")).to_have_attribute("data-ok", "true")
    expect(page.get_by_test_id("verify-result")).to_contain_text("intact")
    page.screenshot(path=str(shots / "audit.png"), full_page=True)

    # the filters: the chat run alone by trigger; the views (patient search, thumbnails, citation) by kind
    page.get_by_test_id("filter-trigger").fill("chat")
    page.get_by_test_id("filter-apply").click()
    expect(page.get_by_test_id("run-row")).to_have_count(1)
    page.get_by_test_id("filter-trigger").fill("api")
    page.get_by_test_id("filter-apply").click()
    expect(page.locator("[data-testid=run-row][data-kind=view]")).to_have_count(4)  # search, 2 images, citation

    assert page.console_errors == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ], page.console_errors
    assert sorted(p.name for p in shots.iterdir()) == ["answer.png", "audit.png", "citation.png"]


def test_restricted_records_interrupt_and_resume_in_the_browser(
    live: LiveServer, browser_page: Any, api_key: str, runtime: AgentRuntime
) -> None:
    from playwright.sync_api import expect

    # clinicians must confirm a purpose before allergies are read: the thread asks, the page answers
    runtime.settings.agent.restricted_types = {"clinician": ["AllergyIntolerance"]}
    page = browser_page
    page.goto(f"{live.base_url}/ui/?patient={CXR['patient_id']}")  # a patient chosen by the link
    expect(page.get_by_test_id("current-patient")).to_contain_text(CXR["patient_id"])
    page.get_by_test_id("api-key").fill(api_key)
    page.get_by_test_id("question").fill("Any allergies?")
    page.get_by_test_id("ask-button").click()

    interrupt = page.get_by_test_id("interrupt")
    expect(interrupt).to_have_attribute("data-kind", "restricted_types")
    expect(interrupt).to_contain_text("AllergyIntolerance")
    page.get_by_test_id("interrupt-confirm").click()  # no purpose yet: refused in the page
    expect(page.get_by_test_id("error")).to_contain_text("purpose of use")
    page.get_by_test_id("interrupt-purpose").fill("allergy review before prescribing")
    page.get_by_test_id("interrupt-confirm").click()
    expect(page.get_by_test_id("run-status")).to_have_attribute("data-status", "ok")
    expect(page.get_by_test_id("answer").get_by_test_id("citation-link")).to_have_count(1)

    runs = sorted((r for r in list_runs(runtime.engine) if r.kind == "ask"), key=lambda r: r.created_at)
    assert [r.status for r in runs] == ["interrupted", "ok"]
    assert runs[0].thread_id == runs[1].thread_id is not None
    resumed = load_run(runtime.engine, runs[1].run_id)
    confirmed = next(e for e in resumed.events if e.name == "access_confirmed")
    assert confirmed.meta == {"types": ["AllergyIntolerance"], "purpose": "allergy review before prescribing"}
    assert page.console_errors == [], page.console_errors


# -- a stored summary opened from a CDS Hooks card's link (/ui/?patient=ID&summary=JOB_ID) --------------


def _queue_summary(live: LiveServer, key: str, patient_id: str) -> str:
    """Queue a summary through the API, as a card's service or a clinician would; return the job id."""
    reply = httpx.post(
        f"{live.base_url}/v1/patients/{patient_id}/summaries", headers={"X-API-Key": key}, timeout=WAIT_MS / 1000
    )
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    return job_id


def _settled_summary(live: LiveServer, key: str, job_id: str) -> dict[str, Any]:
    """Poll the job over the API until it is done or dead; return it."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        reply = httpx.get(f"{live.base_url}/v1/summaries/{job_id}", headers={"X-API-Key": key}, timeout=30)
        assert reply.status_code == 200, reply.text
        job: dict[str, Any] = reply.json()
        if job["status"] in ("done", "dead"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.1)


def _summary_url(live: LiveServer, patient_id: str, job_id: str) -> str:
    return f"{live.base_url}/ui/?patient={patient_id}&summary={job_id}"


def _enter_key(page: Any, live: LiveServer, key: str) -> None:
    """Store the key in this tab's sessionStorage through the page, as a user does before following links."""
    from playwright.sync_api import expect

    page.goto(f"{live.base_url}/ui/")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    page.get_by_test_id("api-key").fill(key)


def test_a_card_link_opens_the_finished_summary_with_its_citations(
    live: LiveServer, browser_page: Any, api_key: str, runtime: AgentRuntime, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    job_id = _queue_summary(live, api_key, CXR["patient_id"])
    job = _settled_summary(live, api_key, job_id)
    assert job["status"] == "done", job
    [cited] = [c["reference"] for c in job["citations"] if c["valid"]]

    # a clinician follows the card's link in a fresh tab: no key yet, so the panel asks for it
    page = browser_page
    page.goto(_summary_url(live, CXR["patient_id"], job_id))
    panel = page.get_by_test_id("summary-panel")
    expect(panel).to_have_attribute("data-state", "unauthenticated")
    expect(page.get_by_test_id("summary-status")).to_contain_text("API key")
    expect(page.get_by_test_id("current-patient")).to_contain_text(CXR["patient_id"])
    page.get_by_test_id("api-key").fill(api_key)
    page.get_by_test_id("summary-retry").click()

    expect(panel).to_have_attribute("data-state", "done")
    expect(page.get_by_test_id("summary-retry")).to_be_hidden()
    expect(page.get_by_test_id("summary-title")).to_contain_text(CXR["patient_id"])
    text = page.get_by_test_id("summary-text")
    expect(text).to_contain_text("heart failure")
    assert (text.text_content() or "").strip() == job["summary"].strip()  # as stored, through textContent
    link = text.get_by_test_id("citation-link")
    expect(link).to_have_count(1)
    assert link.get_attribute("data-reference") == cited
    dangling = panel.get_by_test_id("citation-dangling")
    expect(dangling).to_have_text("[Observation/00000000-made-up]")
    assert dangling.evaluate("node => node.tagName") == "S"
    expect(page.get_by_test_id("summary-models")).to_contain_text("scripted-reasoner")
    expect(page.get_by_test_id("summary-models")).to_contain_text(job["run_id"])
    expect(page.get_by_test_id("summary-status")).to_contain_text("Written")
    expect(page.get_by_test_id("summary-status")).to_contain_text("dr-quinn")
    expect(page.get_by_test_id("summary-disclaimer")).to_be_visible()
    expect(page.get_by_test_id("summary-disclaimer")).to_contain_text("not a diagnostic device")
    expect(page.get_by_test_id("answer")).to_have_text("")  # the chat below is untouched
    page.screenshot(path=str(tmp_path / "summary.png"), full_page=True)

    # the citation opens the resource the summary's run read, in the side panel
    link.click()
    expect(page.get_by_test_id("resource-panel")).to_be_visible()
    expect(page.get_by_test_id("resource-title")).to_have_text(cited)
    expect(page.get_by_test_id("resource-json")).to_contain_text('"resourceType": "Condition"')
    expect(page.get_by_test_id("resource-json")).to_contain_text(f'"id": "{cited.split("/")[1]}"')
    views = [r for r in list_runs(runtime.engine) if r.kind == "view"]
    assert [(v.user_id, v.patient_ref) for v in views] == [("dr-quinn", f"Patient/{CXR['patient_id']}")]

    assert page.console_errors == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ], page.console_errors


@pytest.mark.parametrize("runtime", ["gated"], indirect=True)
def test_a_summary_being_prepared_is_polled_until_done_and_not_while_away(
    live: LiveServer, browser_page: Any, api_key: str, gate: threading.Event
) -> None:
    from playwright.sync_api import expect

    page = browser_page
    _enter_key(page, live, api_key)
    polls: list[float] = []
    page.on("request", lambda r: polls.append(time.monotonic()) if "/v1/summaries/" in r.url else None)
    job_id = _queue_summary(live, api_key, CXR["patient_id"])  # runs until the gate opens
    try:
        page.goto(_summary_url(live, CXR["patient_id"], job_id))
        panel = page.get_by_test_id("summary-panel")
        expect(panel).to_have_attribute("data-state", re.compile(r"^(queued|running)$"))
        expect(page.get_by_test_id("summary-status")).to_contain_text("Being prepared")
        expect(page.get_by_test_id("summary-text")).to_have_text("")
        deadline = time.monotonic() + WAIT_MS / 1000
        while len(polls) < 2:  # it asks again by itself, about every 2 s
            assert time.monotonic() < deadline, "the page did not poll the job again"
            page.wait_for_timeout(100)
        assert 1.5 < polls[1] - polls[0] < 5, polls

        # in the audit view it stops asking, though the job is still running
        page.get_by_test_id("nav-audit").click()
        expect(page.get_by_test_id("audit-view")).to_be_visible()
        page.wait_for_timeout(500)  # a request issued just before leaving may still be reported
        asked = len(polls)
        page.wait_for_timeout(2_500)  # longer than the poll interval: a timer left running would have fired
        assert len(polls) == asked, "polled while the chat view was not shown"
        assert httpx.get(f"{live.base_url}/v1/summaries/{job_id}", headers={"X-API-Key": api_key}).json()["status"] in (
            "queued",
            "running",
        )

        # back in the chat it asks again at once, and keeps asking until the job is done
        page.get_by_test_id("nav-chat").click()
        while len(polls) == asked:
            assert time.monotonic() < deadline, "the page did not poll again in the chat view"
            page.wait_for_timeout(50)
        expect(panel).to_have_attribute("data-state", re.compile(r"^(queued|running)$"))
    finally:
        gate.set()
    expect(panel).to_have_attribute("data-state", "done")
    expect(page.get_by_test_id("summary-text").get_by_test_id("citation-link")).to_have_count(1)
    settled = len(polls)
    page.wait_for_timeout(2_500)
    assert len(polls) == settled, "still polling a finished summary"
    assert page.console_errors == [], page.console_errors


def test_unknown_dead_malformed_and_forbidden_summaries_say_so(
    live: LiveServer, browser_page: Any, api_key: str, auditor_key: str
) -> None:
    from playwright.sync_api import expect

    dead_id = _queue_summary(live, api_key, "no-such-patient")
    dead = _settled_summary(live, api_key, dead_id)
    assert dead["status"] == "dead" and dead["error_code"], dead
    page = browser_page
    _enter_key(page, live, api_key)
    panel, status = page.get_by_test_id("summary-panel"), page.get_by_test_id("summary-status")

    unknown = "00000000-0000-4000-8000-000000000000"
    page.goto(_summary_url(live, CXR["patient_id"], unknown))
    expect(panel).to_have_attribute("data-state", "not-found")
    expect(status).to_contain_text(f"No such summary: the service has no summary with id {unknown}")
    expect(page.get_by_test_id("summary-retry")).to_be_hidden()

    page.goto(_summary_url(live, "no-such-patient", dead_id))
    expect(panel).to_have_attribute("data-state", "dead")
    expect(status).to_contain_text(f"[{dead['error_code']}]")
    expect(status).to_contain_text(dead["error_message"])
    expect(page.get_by_test_id("summary-text")).to_have_text("")
    expect(page.get_by_test_id("summary-disclaimer")).to_be_hidden()

    page.goto(f"{live.base_url}/ui/?summary=not-a-job-id")  # refused in the page, no request made
    expect(panel).to_have_attribute("data-state", "invalid")
    expect(status).to_contain_text("does not name a summary")
    expect(page.get_by_test_id("current-patient")).to_have_text("No patient selected.")

    # an auditor may not read summary text: the panel gives the service's role message
    page.get_by_test_id("api-key").fill(auditor_key)
    page.goto(_summary_url(live, "no-such-patient", dead_id))
    expect(panel).to_have_attribute("data-state", "forbidden")
    expect(status).to_contain_text("You may not read this summary: this needs the role clinician or service")

    statuses = sorted(re.sub(r".*status of (\d+).*", r"\1", e) for e in page.console_errors)
    assert statuses == ["403", "404"], page.console_errors
