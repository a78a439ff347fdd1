"""Chat threads over HTTP: open a thread on a patient, post messages, read the answers as they stream.

Where it sits: the API face of :func:`agent.streaming.stream_ask`. A thread is a row in
``chat_threads`` (patient, owner); its conversation state lives in the LangGraph checkpointer and
every turn is a traced run linked by ``thread_id``. A message's reply is a server-sent event stream
of typed events (progress, token, citation, finding, interrupt, final, error) ending in
``data: [DONE]``. A client that goes away mid-stream cancels its run, which the trace records.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import Engine, insert, select

from agent.audit.reader import load_run
from agent.audit.replay import replay
from agent.audit.tables import AuditRun, utcnow
from agent.domain.answer import Citation
from agent.errors import MedagentError
from agent.graph.builder import build_ask_graph
from agent.graph.threads import open_checkpointer
from agent.jobs.tables import ChatThread
from agent.runtime import AgentRuntime
from agent.service.auth import Principal, PrincipalDep, require
from agent.service.deps import ERROR_RESPONSES, RuntimeDep
from agent.service.schemas import OmitNotNull, PatientId
from agent.service.sse import sse_frames
from agent.streaming import stream_ask

router = APIRouter(prefix="/v1/threads", tags=["threads"])

#: Seconds of silence after which the stream sends an SSE comment, so proxies keep it open.
KEEPALIVE_S = 15.0


class ThreadNotFoundError(MedagentError):
    """No thread with this id belongs to the caller."""

    code = "thread_not_found"
    exit_code = 2
    http_status = 404


class ThreadBusyError(MedagentError):
    """A message of this thread is still being answered."""

    code = "thread_busy"
    exit_code = 2
    http_status = 409


class ThreadCreate(BaseModel):
    """Open a thread about one patient."""

    patient_id: PatientId


class ThreadInfo(BaseModel):
    """A thread: its patient and owner."""

    thread_id: str
    patient_id: str
    created_at: datetime
    created_by: str


class ThreadTurn(BaseModel):
    """One turn of a thread as its trace shows it."""

    run_id: str
    started_at: datetime
    status: str = Field(description="ok, failed, cancelled, interrupted, or running")
    question: str | None = Field(None, description="None for a turn that answered an interrupt")
    answer: str = ""
    citations: list[Citation] = Field(default_factory=list)
    error: dict[str, Any] | None = None


class ThreadView(ThreadInfo):
    """A thread with its turns, oldest first, and the question it waits on, if any."""

    turns: list[ThreadTurn] = Field(default_factory=list)
    pending_interrupt: dict[str, Any] | None = Field(
        None, description="What the thread asks before it can go on (kind, question, candidates or types)"
    )


class MessageRequest(OmitNotNull):
    """A new question, or the answer to the thread's pending interrupt (exactly one)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["question"]}, {"required": ["resume"]}]})

    question: str | SkipJsonSchema[None] = Field(
        None, min_length=1, max_length=4000, examples=["What is the latest BNP?"]
    )
    resume: dict[str, Any] | SkipJsonSchema[None] = Field(
        None,
        description='The answer to an interrupt: {"patient_id": ...} for an ambiguous patient, '
        '{"confirm": true, "purpose": "..."} for restricted record types.',
        examples=[{"patient_id": "c02b6052-1523-5c41-983c-e2e4f28a22a9"}],
    )
    as_of: datetime | SkipJsonSchema[None] = Field(
        None, description="Reference date for relative times (default: now)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> MessageRequest:
        if (self.question is None) == (self.resume is None):
            raise ValueError("give either question or resume")
        return self


SSE_DESCRIPTION = (
    "A `text/event-stream`: one event per line pair `event: <type>` / `data: <StreamEvent JSON>` with type "
    "progress (per graph node), token (answer text), citation, finding (MedSigLIP scores), interrupt (the "
    "thread waits for an answer: resume it with another message), final (data = the AskResult) or error "
    "(code, message, run_id); then `data: [DONE]`."
)


@router.post("", status_code=201, response_model=ThreadInfo, responses=ERROR_RESPONSES)
async def create_thread(body: ThreadCreate, runtime: RuntimeDep, principal: PrincipalDep) -> ThreadInfo:
    """Open a conversation about a patient (clinician). Its turns keep the context of earlier ones."""
    require(principal, "clinician")
    runtime.ensure_schema()
    info = ThreadInfo(
        thread_id=str(uuid.uuid4()), patient_id=body.patient_id, created_at=utcnow(), created_by=principal.user
    )
    with runtime.engine.begin() as conn:
        conn.execute(
            insert(ChatThread).values(
                id=info.thread_id, patient_id=info.patient_id, created_by=info.created_by, created_at=info.created_at
            )
        )
    return info


@router.get("/{thread_id}", response_model=ThreadView, responses=ERROR_RESPONSES)
async def read_thread(thread_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> ThreadView:
    """Return a thread's turns (questions, answers, citations, statuses) and any pending question (owner)."""
    info = _owned_thread(runtime, thread_id, principal)
    turns = await asyncio.to_thread(_turns, runtime, thread_id)
    pending = await _pending_interrupt(runtime, thread_id) if turns and turns[-1].status == "interrupted" else None
    return ThreadView(**info.model_dump(), turns=turns, pending_interrupt=pending)


@router.post(
    "/{thread_id}/messages",
    response_class=StreamingResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"description": SSE_DESCRIPTION, "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        409: ERROR_RESPONSES[404] | {"description": "The thread is still answering a message"},
    },
)
async def post_message(
    thread_id: str,
    body: Annotated[MessageRequest, Body()],
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """Ask a question in the thread (or answer its pending interrupt) and stream the run (owner, clinician).

    The caller and purpose of use reach the trace. Closing the connection cancels the run; the trace
    then records it as cancelled.
    """
    require(principal, "clinician")
    info = _owned_thread(runtime, thread_id, principal)
    lock = _thread_lock(request, thread_id)
    if lock.locked():
        raise ThreadBusyError("this thread is still answering a message; wait for its final event")
    who: dict[str, Any] = {
        "thread_id": thread_id,
        "user_id": principal.user,
        "user_role": "clinician",
        "purpose_of_use": principal.purpose_of_use or "TREAT",
        "as_of": body.as_of,
    }
    if body.resume is not None:
        events = stream_ask(runtime, resume=body.resume, trigger="chat", **who)
    else:
        events = stream_ask(runtime, patient_id=info.patient_id, question=body.question, trigger="chat", **who)
    return StreamingResponse(
        _locked(sse_frames(events, keepalive_s=KEEPALIVE_S), lock),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _locked(frames: AsyncGenerator[str, None], lock: asyncio.Lock) -> AsyncIterator[str]:
    """Hold the thread's lock while its reply streams."""
    async with lock:
        try:
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()


def _thread_lock(request: Request, thread_id: str) -> asyncio.Lock:
    """Return the per-thread lock: one message at a time, or the checkpoints would interleave.

    The registry holds its locks weakly: a lock lives while a reply (its streaming generator)
    references it and then disappears, so a long-running service does not keep one per thread
    ever answered.
    """
    locks: weakref.WeakValueDictionary[str, asyncio.Lock] = request.app.state.__dict__.setdefault(
        "thread_locks", weakref.WeakValueDictionary()
    )
    lock = locks.get(thread_id)
    if lock is None:
        lock = locks[thread_id] = asyncio.Lock()
    return lock


def _owned_thread(runtime: AgentRuntime, thread_id: str, principal: Principal) -> ThreadInfo:
    """Return the thread when the caller owns it (admins see all); otherwise it does not exist for them."""
    runtime.ensure_schema()
    with runtime.engine.connect() as conn:
        row = conn.execute(select(ChatThread).where(ChatThread.id == thread_id)).first()
    if row is None or not (row.created_by == principal.user or principal.has("admin")):
        raise ThreadNotFoundError(f"no thread {thread_id!r} of yours")
    return ThreadInfo(thread_id=row.id, patient_id=row.patient_id, created_at=row.created_at, created_by=row.created_by)


def _turns(runtime: AgentRuntime, thread_id: str) -> list[ThreadTurn]:
    """Read the thread's runs from the trace, oldest first, each replayed from its records."""
    return [_turn(runtime, run_id) for run_id in _thread_run_ids(runtime.engine, thread_id)]


def _thread_run_ids(engine: Engine, thread_id: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditRun.id).where(AuditRun.thread_id == thread_id).order_by(AuditRun.created_at, AuditRun.id)
        ).all()
    return [row.id for row in rows]


def _turn(runtime: AgentRuntime, run_id: str) -> ThreadTurn:
    trace = load_run(runtime.engine, run_id, include_content=True, cipher=runtime.cipher)
    replayed = replay(trace)
    return ThreadTurn(
        run_id=run_id,
        started_at=trace.run.created_at,
        status=replayed.status,
        question=replayed.question,
        answer=replayed.answer,
        citations=replayed.citations,
        error=replayed.error,
    )


async def _pending_interrupt(runtime: AgentRuntime, thread_id: str) -> dict[str, Any] | None:
    """Return the value of the thread's pending interrupt, read from its checkpoint."""
    async with open_checkpointer(runtime.settings.agent, runtime.settings.audit.content_key) as checkpointer:
        snapshot = await build_ask_graph(checkpointer).aget_state({"configurable": {"thread_id": thread_id}})
    for interrupt in getattr(snapshot, "interrupts", ()) or ():
        value = interrupt.value
        if isinstance(value, dict):
            return json.loads(json.dumps(value, default=str))
    return None
