"""Check fetched FHIR resources against the R4 model, without changing or dropping them.

Where it sits: after "fetch history" the graph passes what a source returned through
:func:`flag_invalid`; resources that do not validate are still used (a real server's data is
what the clinician's record says), but their problems are recorded in the trace so an auditor
can see which facts rested on malformed resources. Validation uses ``fhir.resources.R4B``, the
closest published model set to R4.

Problem messages name the field path and pydantic's reason, never the offending value, so they
carry no PHI beyond the resource's type and id.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import FHIRAbstractModel, get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

# A resource with a thousand broken fields still gets a readable list.
_MAX_PROBLEMS = 20


@lru_cache(maxsize=256)
def _model_class(resource_type: str) -> type[FHIRAbstractModel] | None:
    """Return the R4B model class for a resource type, or None when there is no such resource."""
    try:
        cls = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError):
        return None
    # get_fhir_model_class also knows data types (HumanName, Quantity...), which are not resources.
    if not issubclass(cls, Resource) or cls.get_resource_type() != resource_type:
        return None
    return cls


def _location(loc: tuple[int | str, ...]) -> str:
    """Return a pydantic error location as a FHIR-style path, e.g. ``name[0].given``."""
    path = ""
    for part in loc:
        if part == "root":
            # pydantic's name for a RootModel's value; FHIR paths have no such step.
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(resource)"


def validate_resource(raw: dict[str, Any]) -> list[str]:
    """Return human-readable problems of one resource, or an empty list when it is valid R4(B).

    Never raises: anything unexpected while validating becomes a problem in the list.

    Args:
        raw: the resource as JSON, exactly as the source returned it (not modified).
    """
    if not isinstance(raw, dict):
        return [f"not a JSON object but {type(raw).__name__}"]
    resource_type = raw.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return ["resourceType is missing"]
    cls = _model_class(resource_type)
    if cls is None:
        return [f"unknown resourceType {resource_type!r} (not a FHIR R4 resource)"]
    try:
        # Validation must never turn into a failing run: warnings the models emit are not errors here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors(include_input=False)]
        if len(problems) > _MAX_PROBLEMS:
            extra = len(problems) - _MAX_PROBLEMS
            problems = [*problems[:_MAX_PROBLEMS], f"... and {extra} more problems"]
        return problems
    except Exception as exc:  # the models' own validators can raise anything; report, never crash
        return [f"validation failed: {type(exc).__name__}"]
    return []


def flag_invalid(resources: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Validate each resource and return them unchanged with the problems of the invalid ones.

    Args:
        resources: resources as JSON.

    Returns:
        The same list (same objects, raw JSON kept) and a map ``"Type/id"`` -> problems holding
        only resources that have problems. A resource without an id is keyed by its position,
        ``"Type/#3"``.
    """
    flags: dict[str, list[str]] = {}
    for index, resource in enumerate(resources):
        problems = validate_resource(resource)
        if not problems:
            continue
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        rid = resource.get("id") if isinstance(resource, dict) else None
        key = f"{rtype or 'Unknown'}/{rid if isinstance(rid, str) and rid else f'#{index}'}"
        flags.setdefault(key, []).extend(problems)
    return resources, flags
