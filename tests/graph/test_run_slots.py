"""Run slots: at most ``db.max_concurrent_runs`` runs record at once; the rest wait without blocking the loop."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from agent.audit.reader import load_run
from agent.runner import run_ask
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime


async def test_runs_beyond_the_limit_wait_their_turn(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    runtime.settings.db.max_concurrent_runs = 1
    patient = PATIENTS["noimg"]["patient_id"]
    results = await asyncio.gather(*(run_ask(runtime, patient_id=patient, question=f"Q{n}?") for n in range(3)))
    assert [r.status for r in results] == ["ok"] * 3
    spans = sorted(
        (trace.events[0].at, trace.events[-1].at) for trace in (load_run(runtime.engine, r.run_id) for r in results)
    )
    # one at a time: each run starts after the previous one finished
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))


async def test_without_a_limit_of_one_runs_overlap(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    runtime.settings.db.max_concurrent_runs = 4
    patient = PATIENTS["noimg"]["patient_id"]
    results = await asyncio.gather(*(run_ask(runtime, patient_id=patient, question=f"Q{n}?") for n in range(3)))
    spans = sorted(
        (trace.events[0].at, trace.events[-1].at) for trace in (load_run(runtime.engine, r.run_id) for r in results)
    )
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
