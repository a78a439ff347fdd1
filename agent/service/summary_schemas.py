"""API schemas of the summaries endpoints (kept apart from the job store's record and the ORM table)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agent.domain.answer import Citation
from agent.jobs.store import JobRecord

JobStatus = Literal["queued", "running", "done", "dead"]

#: An idempotency key as clients send it (body or ``Idempotency-Key`` header).
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:\-]{1,100}$"


class SummaryRequest(BaseModel):
    """Options of a summary request; the body may be omitted altogether."""

    write_back: bool | None = Field(
        None,
        description=(
            "Write the finished summary to the FHIR server as a DocumentReference with a Provenance "
            "(default: the jobs.write_back setting). Needs an HTTP FHIR server."
        ),
        examples=[True],
    )
    idempotency_key: str | None = Field(
        None,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description=(
            "Repeat a request safely: the same key (per caller) returns the job it first created instead of "
            "queueing another. The Idempotency-Key header does the same; if both are sent they must match."
        ),
        examples=["ehr-order-8841"],
    )

    model_config = {
        "json_schema_extra": {"examples": [{"write_back": True, "idempotency_key": "ehr-order-8841"}]},
    }


class SummaryJobView(JobRecord):
    """A summary job, and once it is done, the summary itself with its citations and models."""

    summary: str | None = Field(
        None,
        description="The summary (the run's answer; decision support, not a diagnosis). Present when done.",
        examples=["Heart failure with reduced ejection fraction [Condition/4f2e...], on furosemide ..."],
    )
    citations: list[Citation] = Field(
        default_factory=list, description="Each [Type/id] the summary cites; valid=True when the run fetched it"
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Role -> model id of the run that wrote the summary",
        examples=[{"reasoner": "google/medgemma-4b-it", "scorer": "google/medsiglip-448"}],
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the run could not read and went on without (a study, a record type, an attachment)",
    )
    summary_readable: bool | None = Field(
        None,
        description="False when the trace holds the summary encrypted and this server has no content key for it",
    )
