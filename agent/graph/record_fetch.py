"""The record half of the fetch step: the patient's history of the chosen types, as the server allows.

Where it sits: the plan node (for the manifest, when the model plans) and the fetch node call
:func:`fetch_records`; every request is in the trace through the run's FHIR source.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from agent.audit.recorder import NOTE
from agent.graph.state import RunContext
from agent.history.fhir_values import fetch_attachment_text
from agent.sources.capabilities import ServerCapabilities, discover
from agent.sources.fhir_validation import flag_invalid
from agent.sources.history_fetch import HistoryFetch
from agent.sources.history_fetch import fetch_history as fetch_patient_history

#: How :func:`fetch_attachment_text` starts the text of an attachment it could not read.
UNREAD_MARKERS = ("[not fetched:", "[not extracted:")
#: Largest attachment fetched by URL for a note (bytes).
MAX_ATTACHMENT_BYTES = 2_000_000


async def capabilities(ctx: RunContext) -> ServerCapabilities:
    """Return the FHIR server's capabilities, discovered once per process and source."""
    source = ctx.settings.fhir.base_url or str(ctx.settings.fhir.effective_bundle_dir())
    found = ctx.capabilities_cache.get(source)
    if found is None:
        found = ctx.capabilities_cache[source] = await discover(ctx.fhir)
    assert isinstance(found, ServerCapabilities)
    return found


async def fetch_records(
    ctx: RunContext, patient_id: str, types: Sequence[str], *, reference_rounds: int = 3
) -> HistoryFetch:
    """Fetch the patient's records of these types and record how (strategy, partial types, invalid ones).

    Args:
        reference_rounds: hops of references to resolve (0 for the imaging half: the studies'
            references are the record half's to fetch, and their Endpoints are resolved when opened).

    Raises:
        MedagentError: every type failed (the first type's error); a partial record is used.
    """
    if not types:
        return HistoryFetch()
    found = await capabilities(ctx)
    fetched = await fetch_patient_history(
        ctx.fhir,
        patient_id,
        types=tuple(types),
        capabilities=found,
        concurrency=ctx.settings.fhir.concurrency,
        max_reference_rounds=reference_rounds,
    )
    if fetched.missing and len(fetched.missing) == len(types):
        raise next(iter(fetched.errors.values()))
    ctx.recorder.event(
        NOTE,
        "history_fetch",
        meta={
            "types": list(types),
            "strategy": fetched.strategy,
            "fallback": fetched.fallback,
            "requests": fetched.requests,
            "unresolved": fetched.unresolved,
            "server": found.fhir_version,
        },
    )
    if fetched.missing:
        ctx.recorder.event(NOTE, "partial_history", status="failed", meta={"missing": fetched.missing})
        if len(fetched.missing) < len(types):  # when every type failed the caller decides
            for kind, code in sorted(fetched.missing.items()):
                ctx.warn(f"{kind} could not be fetched ({code}): the answer does not reflect it", reason="type_failed")
    # Validation is CPU work (about 0.3 ms a resource): off the event loop, so other runs go on.
    _, invalid = await asyncio.to_thread(flag_invalid, fetched.resources)
    if invalid:
        # kept as received (raw JSON) and used; the flags tell the auditor which ones were off-spec
        ctx.recorder.event(NOTE, "invalid_resources", meta={"problems": invalid})
    return fetched


async def url_attachment_texts(ctx: RunContext, resources: list[dict[str, Any]]) -> dict[str, str]:
    """Fetch the text of notes given by URL (Binary on the same server), for the context builder."""
    texts: dict[str, str] = {}
    for resource in resources:
        if resource.get("resourceType") != "DocumentReference":
            continue
        for number, content in enumerate(resource.get("content") or []):
            attachment = content.get("attachment") if isinstance(content, dict) else None
            if isinstance(attachment, dict) and attachment.get("url") and not attachment.get("data"):
                text = await fetch_attachment_text(ctx.fhir, attachment, MAX_ATTACHMENT_BYTES)
                if text is not None:
                    texts[f"DocumentReference/{resource['id']}#{number}"] = text
                    if text.startswith(UNREAD_MARKERS):
                        # the marker says why (size, host, type, error): the answer names the note
                        ctx.warn(
                            f"DocumentReference/{resource['id']}: attachment {number} not read: {text.strip('[]')}",
                            reason="attachment_unread",
                        )
    return texts


def of_types(
    resources: list[dict[str, Any]], types: Sequence[str], history_types: Sequence[str]
) -> list[dict[str, Any]]:
    """Return the resources of these types plus those pulled in as references (of no history type)."""
    return [r for r in resources if r.get("resourceType") in types or r.get("resourceType") not in history_types]
