"""What a run returns: the answer, the sources the model saw and the citations it made."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Citation(BaseModel):
    """One ``[Type/id]`` the model wrote, and whether it names a resource fetched in this run."""

    reference: str
    valid: bool


class AskResult(BaseModel):
    """The outcome of one ``ask`` run, as printed by the CLI and returned by the API."""

    run_id: str
    status: str = Field(description="'ok', 'failed', or 'interrupted' (a thread waits for the user's answer)")
    answer: str = Field("", description="The answer shown to the user, dangling citations removed.")
    sources: list[str] = Field(default_factory=list, description="'Type/id' of each resource in the context")
    citations: list[Citation] = Field(default_factory=list)
    findings: list[dict[str, object]] = Field(
        default_factory=list, description="Per image and source (zero-shot label set or classifier): label scores"
    )
    similar_cases: list[dict[str, object]] = Field(
        default_factory=list, description="Other patients' studies most similar to this study's images"
    )
    models: dict[str, str] = Field(default_factory=dict, description="Role -> model id actually used")
    test_models: bool = Field(False, description="True when tiny random-weight models were used.")
    warnings: list[str] = Field(default_factory=list, description="Non-fatal problems, e.g. a skipped image.")
    error: dict[str, object] | None = None
    thread_id: str | None = Field(None, description="The conversation thread, for runs in one")
    interrupt: dict[str, Any] | None = Field(
        None, description="When interrupted: what the graph asks (kind, question, candidates or types)"
    )
