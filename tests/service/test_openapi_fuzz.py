"""schemathesis against the app's own OpenAPI spec: no 5xx, and every response matches the spec.

Real: the app with embedded sources, the SQL trace and the job queue; scripted models. Each
operation gets generated requests (valid and invalid); the checks are schemathesis's defaults
(server errors, status codes, content types, response schema conformance). Every failing
operation is collected and reported together.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from agent.jobs.store import list_jobs
from agent.runner import AgentRuntime
from agent.service.app import create_app
from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner, _runtime

EXAMPLES_PER_OPERATION = 12


def _settle(runtime: AgentRuntime, timeout_s: float = 30.0) -> None:
    """Wait for the summary jobs a case queued: they run in the background on the app's queue, and
    their graph runs draw on the global ``random`` (checkpoint ids), which Hypothesis forbids
    inside a test case's data generation."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [job for job in list_jobs(runtime.engine, limit=1000) if job.status in ("queued", "running")]
        due = [job for job in busy if job.status == "running" or job.attempts == 0]
        if not due:
            return
        time.sleep(0.05)


def test_every_operation_answers_within_its_spec(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    runtime.settings.service.rate_limit_per_minute = 0
    app = create_app(runtime.settings, runtime)
    failures: dict[str, str] = {}
    with TestClient(app):  # the lifespan: the job queue runs, as in production
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                case.call_and_validate()
                _settle(runtime)

            try:
                check()
            except Exception as exc:  # collect, so one run names every failing operation
                failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
