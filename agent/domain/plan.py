"""What the planning step decides before anything is fetched: which record types, codes and studies.

The planner (MedGemma, validated with pydantic, one repair attempt, then a deterministic plan
from the question's terms) produces a :class:`Plan`; callers that already know what is needed
(benchmarks, evaluation with an oracle, replay) pass one in and the graph records it as given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PlanSource = Literal["model", "repair", "deterministic", "given"]


class Plan(BaseModel):
    """The record types, codes and studies a question needs."""

    model_config = ConfigDict(extra="forbid")

    resource_types: list[str] = Field(description="FHIR resource types to fetch (of the graph's history types)")
    codes: list[str] = Field(default_factory=list, description="Codes or terms of interest (LOINC, SNOMED, RxNorm)")
    studies: list[str] = Field(
        default_factory=list, description="ImagingStudy ids the question is about; empty means the newest"
    )
    needs_images: bool = Field(False, description="Whether the images themselves go to the model")
    prior_study: bool = Field(False, description="Longitudinal: compare the current study with the prior one")
    task: Literal["answer", "report"] = Field("answer", description="'report': draft findings + impression")
    source: PlanSource = Field("given", description="Who made the plan")
