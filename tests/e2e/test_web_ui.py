"""The web UI end to end in headless Chromium: ask, read the cited answer, open a citation, audit the run.

Real: the app under uvicorn on 127.0.0.1 (threads over SSE, records, audit endpoints), bundle-folder
FHIR, DICOM-folder imaging, pixel preparation, the SQL trace, API keys, and Debian's chromium driven
by Playwright (no browser download). Scripted: the models (tests/graph/test_ask_flow.py), so the
answer cites one real record and one made-up one. Screenshots go under the test's tmp_path only.

Plain (non-async) tests: Playwright's sync API refuses to run inside an event loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from agent.audit.reader import list_runs, load_run
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


@pytest.fixture
def runtime(tmp_path: Path) -> AgentRuntime:
    return _runtime(tmp_path, FakeScorer(), ScriptedReasoner())


@pytest.fixture
def api_key(runtime: AgentRuntime) -> str:
    """A key for one person who is both clinician and auditor (the UI needs no key in an open dev process)."""
    key, spec = new_api_key("dr-quinn", ["clinician", "auditor"], "e2e key")
    runtime.settings.service.api_keys.append(spec)
    return key


@pytest.fixture
def live(runtime: AgentRuntime, api_key: str) -> Iterator[LiveServer]:
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
