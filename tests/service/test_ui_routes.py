"""The web UI's files as the app serves them: redirect, page, static files, CSP, and no inline script.

The browser-driven behaviour is in tests/e2e/test_web_ui.py; these checks are the fast ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.service.routes_ui import STATIC_TYPES, WEB_DIR
from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner, _runtime
from tests.service.test_records_api import make_app


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return TestClient(make_app(_runtime(tmp_path, FakeScorer(), ScriptedReasoner())), follow_redirects=False)


def test_root_redirects_to_the_ui_page(client: TestClient) -> None:
    for path in ("/", "/ui"):
        reply = client.get(path)
        assert reply.status_code == 307 and reply.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "img-src 'self' data:" in csp and "unsafe-inline" not in csp
    assert 'src="/ui/static/app.js"' in page.text and 'href="/ui/static/style.css"' in page.text


def test_static_files_are_served_by_name_only(client: TestClient) -> None:
    script = client.get("/ui/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/static/style.css").headers["content-type"].startswith("text/css")
    for name in ("index.html", "nope.js", "%2e%2e", "..%2Froutes_ui.py", "..%2F..%2Fconfig.py"):
        assert client.get(f"/ui/static/{name}").status_code == 404, name
    assert client.get("/ui/static/routes_ui.py").json()["code"] == "ui_file_not_found"
    assert "/ui/" not in client.get("/openapi.json").json()["paths"]


def test_every_ui_file_ships_and_none_runs_inline_code() -> None:
    assert {p.name for p in WEB_DIR.iterdir()} == {"index.html", *STATIC_TYPES}
    page = (WEB_DIR / "index.html").read_text()
    # the CSP would block them anyway; keeping them out keeps the page working under it
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page)
    assert not re.search(r"\son[a-z]+\s*=", page)
    assert "style=" not in page
    script = (WEB_DIR / "app.js").read_text()
    # clinical text is data: it never goes through an HTML parser
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


def test_every_element_the_script_looks_up_is_on_the_page() -> None:
    # a typo'd id only shows in a browser as a TypeError on null, in whichever path uses it
    page_ids = set(re.findall(r'\sid="([^"]+)"', (WEB_DIR / "index.html").read_text()))
    wanted = set(re.findall(r'\$\("([^"]+)"\)', (WEB_DIR / "app.js").read_text()))
    assert {"summary-panel", "summary-text", "summary-retry", "answer"} <= wanted  # the pattern still matches
    assert wanted - page_ids == set()
