"""API request and error schemas (separate from domain types and ORM tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

#: How a request names a patient: a FHIR logical id, or ``identifier=[SYSTEM|]VALUE`` in visible ASCII
#: without the characters FHIR search would misread (``,``, ``$``, ``\``), as the resolver requires.
PatientId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=r"^([A-Za-z0-9\-.]{1,64}|identifier=[!-#%-+\--\[\]-{}~]{1,200}(\|[!-#%-+\--\[\]-{}~]{1,200})?)$",
        description="A logical id, or identifier=SYSTEM|VALUE (e.g. an MRN); several matches are refused.",
        examples=["c02b6052-1523-5c41-983c-e2e4f28a22a9", "identifier=http://hospital.example.org/mrn|MRN-100001"],
    ),
]


class OmitNotNull(BaseModel):
    """A request body whose optional fields are left out, never sent as null.

    Their schema does not admit null (clients and property tests follow the schema), so the model
    refuses an explicit null instead of quietly accepting what the schema says is invalid.
    """

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [key for key in cls.model_fields if key in data and data[key] is None]
            if nulls:
                raise ValueError(f"leave out rather than null: {', '.join(nulls)}")
        return data


class AskRequest(BaseModel):
    """A question about one patient."""

    patient_id: PatientId
    question: str = Field(min_length=1, max_length=4000, examples=["What are the active problems?"])
    as_of: datetime | None = Field(None, description="Reference date for relative times (default: now).")


class Problem(BaseModel):
    """An RFC 9457 problem+json body with medagent's error code and the run id when there is one."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    run_id: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
