"""Typed events a run streams while it works: node progress, answer tokens, findings, citations.

Where it sits: nodes emit these through ``RunContext.emit`` (a no-op unless someone listens);
:func:`agent.streaming.stream_ask` turns them into an async stream the CLI prints and the API
can send as server-sent events. Events carry references and counts, plus the answer's own text;
never record content (that is in the access-controlled trace).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

EventType = Literal["progress", "token", "citation", "finding", "interrupt", "final", "error"]


class StreamEvent(BaseModel):
    """One thing that happened in a run, in the order it happened."""

    type: EventType
    node: str | None = Field(None, description="The graph node (progress events)")
    status: str | None = Field(None, description="progress: started/finished/failed; final: the run's status")
    text: str | None = Field(None, description="token: the answer delta")
    data: dict[str, Any] = Field(default_factory=dict, description="citation, finding, interrupt, final, error")
