"""Threads on a checkpointer (SQLite and PostgreSQL): multi-turn prompts from state, and human in the loop.

Real: the LangGraph checkpointers (AsyncSqliteSaver, AsyncPostgresSaver on the local server), the
graph, the bundle-folder FHIR source and the SQL trace. Scripted: the models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from agent.audit.reader import load_run
from agent.graph.threads import checkpointer_location
from agent.runner import AgentRuntime, resume_ask, run_ask
from tests.graph.scripted import PlanningReasoner
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, _runtime, bundles_with_twins

NOIMG = PATIENTS["noimg"]["patient_id"]


MakeRuntime = Callable[[PlanningReasoner], AgentRuntime]


@pytest.fixture
def thread_runtime(tmp_path: Path, db_url: str) -> Iterator[MakeRuntime]:
    """Make runtimes whose trace and thread store are the test's database (SQLite, then PostgreSQL)."""
    made: list[AgentRuntime] = []

    def make(reasoner: PlanningReasoner) -> AgentRuntime:
        runtime = _runtime(tmp_path, FakeScorer(), reasoner)
        runtime.settings.db.url = SecretStr(db_url)
        store = db_url if db_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'threads.db'}"
        runtime.settings.agent.checkpointer_url = SecretStr(store)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.engine.dispose()


async def test_a_thread_remembers_earlier_turns_without_replaying_chat(thread_runtime: MakeRuntime) -> None:
    reasoner = PlanningReasoner()
    runtime = thread_runtime(reasoner)
    first = await run_ask(runtime, patient_id=NOIMG, question="Diabetes control?", thread_id="t-1")
    second = await run_ask(runtime, patient_id=NOIMG, question="And the medications?", thread_id="t-1")
    assert second.status == "ok" and second.thread_id == "t-1"

    prompt_one, prompt_two = (r.user_text for r in reasoner.answer_requests())
    assert "<conversation" not in prompt_one
    earlier = prompt_two.split("<conversation")[1].split("</conversation>")[0]
    assert "Q1: Diabetes control?" in earlier and f"A1: {first.answer[:40]}" in earlier
    cited = [c.reference for c in first.citations if c.valid]
    assert cited and f"Facts cited in A1: {', '.join(cited)}" in earlier
    assert "And the medications?" not in earlier  # the new question is asked once, at the end
    assert prompt_two.rstrip().endswith("Question: And the medications?")
    # per-turn state starts afresh: the second turn's sources are its own fetch, not an accumulation
    assert len(second.sources) == len(set(second.sources))

    third = await run_ask(runtime, patient_id=NOIMG, question="Allergies?", thread_id="t-2")
    assert third.status == "ok" and "<conversation" not in reasoner.answer_requests()[-1].user_text
    runs = [load_run(runtime.engine, r.run_id).run for r in (first, second, third)]
    assert [r.thread_id for r in runs] == ["t-1", "t-1", "t-2"]


async def test_an_ambiguous_patient_interrupts_and_resumes_with_the_choice(
    tmp_path: Path, thread_runtime: MakeRuntime
) -> None:
    bundles = bundles_with_twins(tmp_path)
    reasoner = PlanningReasoner()
    runtime = thread_runtime(reasoner)
    runtime.settings.fhir.bundle_dir = bundles

    asked = await run_ask(runtime, patient_id="identifier=urn:test:mrn|DUP-1", question="Status?", thread_id="t-9")
    assert asked.status == "interrupted"
    assert asked.interrupt is not None and asked.interrupt["kind"] == "ambiguous_patient"
    assert [c["id"] for c in asked.interrupt["candidates"]] == ["twin-1", "twin-2"]
    assert reasoner.requests == []  # nothing was asked of the model before the user chose
    paused = load_run(runtime.engine, asked.run_id)
    assert paused.run.status == "interrupted" and "ambiguous_patient" in paused.events[-1].meta["reason"]
    assert "Twin" not in json.dumps([e.meta for e in paused.events])  # names only in content

    # an answer that names no candidate is asked again, and a valid one then resumes the run
    again = await resume_ask(runtime, thread_id="t-9", resume={"patient_id": "someone-else"})
    assert again.status == "interrupted" and again.interrupt is not None
    assert again.interrupt["question"].startswith("That is not one of the candidates")
    resumed = await resume_ask(runtime, thread_id="t-9", resume={"patient_id": "twin-2"})
    assert resumed.status == "ok" and "Patient/twin-2" in resumed.sources
    assert "Patient/twin-1" not in resumed.sources
    trace = load_run(runtime.engine, resumed.run_id)
    assert trace.run.status == "ok" and trace.run.thread_id == "t-9" and trace.run.trigger == "resume"
    assert next(e for e in trace.events if e.name == "resumed").meta["patient"] == "Patient/twin-2"


async def test_restricted_types_ask_for_a_purpose_in_a_thread_and_are_dropped_otherwise(
    thread_runtime: MakeRuntime,
) -> None:
    reasoner = PlanningReasoner()
    runtime = thread_runtime(reasoner)
    asked = await run_ask(runtime, patient_id=NOIMG, question="Status?", thread_id="t-a", user_role="auditor")
    assert asked.status == "interrupted"
    assert asked.interrupt is not None and asked.interrupt["kind"] == "restricted_types"
    assert "Condition" in asked.interrupt["types"]
    confirmed = await resume_ask(
        runtime, thread_id="t-a", resume={"confirm": True, "purpose": "quality review"}, user_role="auditor"
    )
    assert confirmed.status == "ok" and any(s.startswith("Condition/") for s in confirmed.sources)
    trace = load_run(runtime.engine, confirmed.run_id)
    assert next(e for e in trace.events if e.name == "access_confirmed").meta["purpose"] == "quality review"

    # without a thread nobody can answer: the restricted types are dropped and the result says so
    plain = await run_ask(runtime, patient_id=NOIMG, question="Status?", user_role="auditor")
    assert plain.status == "ok" and not any(s.startswith("Condition/") for s in plain.sources)
    assert "not read (role): Condition" in plain.warnings
    trace = load_run(runtime.engine, plain.run_id)
    searched = {e.meta["path"].split("?")[0] for e in trace.events if e.kind == "fhir_request"}
    assert "Condition" not in searched and "Observation" not in searched


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, ("sqlite", ".medagent/threads.db")),
        ("sqlite:///x/t.db", ("sqlite", "x/t.db")),
        ("postgresql+psycopg://u:p@h:5432/d", ("postgres", "postgresql://u:p@h:5432/d")),
    ],
)
def test_checkpointer_location_follows_the_settings(url: str | None, expected: tuple[str, str]) -> None:
    from agent.config import get_settings

    settings = get_settings(agent={"checkpointer_url": url})
    assert checkpointer_location(settings.agent) == expected
    assert "u:p" not in json.dumps(settings.masked())


async def test_thread_checkpoints_are_encrypted_with_the_content_key(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    from agent.errors import AuditError

    reasoner = PlanningReasoner()
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    store = tmp_path / "threads.db"
    runtime.settings.agent.checkpointer_url = SecretStr(f"sqlite:///{store}")
    runtime.settings.audit.content_key = SecretStr(Fernet.generate_key().decode())
    question = "Is the zzyzx-marker diabetes controlled?"
    await run_ask(runtime, patient_id=NOIMG, question=question, thread_id="t-enc")
    second = await run_ask(runtime, patient_id=NOIMG, question="And now?", thread_id="t-enc")
    assert second.status == "ok"
    assert f"Q1: {question}" in reasoner.answer_requests()[-1].user_text  # read back through the cipher
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("threads.db*"))
    assert b"zzyzx-marker" not in raw and b"Condition/" not in raw

    runtime.settings.audit.content_key = SecretStr(Fernet.generate_key().decode())
    with pytest.raises(AuditError, match="cannot be decrypted"):
        await run_ask(runtime, patient_id=NOIMG, question="Again?", thread_id="t-enc")
