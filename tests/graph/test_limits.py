"""Limits end a run cleanly, each with its status and code in the trace: steps, call timeouts, cancellation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.audit.reader import load_run
from agent.errors import ModelTimeoutError, RunCancelledError, StepLimitError
from agent.runner import run_ask
from tests.graph.scripted import PlanningReasoner
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, _runtime

NOIMG = PATIENTS["noimg"]["patient_id"]


async def test_too_many_steps_fail_with_the_step_limit(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), PlanningReasoner())
    runtime.settings.agent.max_steps = 3
    with pytest.raises(StepLimitError, match="more than 3 steps") as caught:
        await run_ask(runtime, patient_id=NOIMG, question="Status?")
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    assert trace.run.status == "failed"
    assert trace.events[-1].meta["error"]["code"] == "step_limit"
    assert "reason" not in [e.name for e in trace.events]  # stopped before the model was asked


async def test_a_model_call_past_its_timeout_fails_the_run_with_a_timeout_code(tmp_path: Path) -> None:
    release = threading.Event()
    reasoner = PlanningReasoner(block=release)
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.models.call_timeout_s = 0.2
    try:
        with pytest.raises(ModelTimeoutError, match=r"longer than 0\.2 s") as caught:
            await run_ask(runtime, patient_id=NOIMG, question="Status?")
    finally:
        release.set()
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    end = trace.events[-1]
    assert trace.run.status == "failed" and end.meta["failing_step"] == "reason"
    assert end.meta["error"]["code"] == "model_timeout"
    failed_call = next(e for e in trace.events if e.kind == "model_call")
    assert failed_call.status == "failed" and failed_call.meta["error"]["code"] == "model_timeout"


async def test_a_cancelled_run_is_recorded_as_cancelled(tmp_path: Path) -> None:
    release = threading.Event()
    reasoner = PlanningReasoner(block=release)
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    task = asyncio.create_task(run_ask(runtime, patient_id=NOIMG, question="Status?"))
    try:
        while not reasoner.requests:  # wait until the model call is under way
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()
    runs = load_run(runtime.engine, _only_run_id(runtime))
    assert runs.run.status == "cancelled"
    assert runs.events[-1].meta["error"]["code"] == RunCancelledError.code
    assert runs.events[-1].meta["failing_step"] == "reason"


def _only_run_id(runtime: object) -> str:
    from sqlalchemy import text

    with runtime.engine.connect() as conn:  # type: ignore[attr-defined]
        (run_id,) = conn.execute(text("select id from audit_runs")).one()
    return str(run_id)
