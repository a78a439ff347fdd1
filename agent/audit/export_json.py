"""Export one run's trace as plain JSON (``medagent audit export --format json``).

This sits at the end of the flow, after the trace is read back by
:func:`agent.audit.reader.load_run`: it turns the :class:`~agent.audit.reader.RunTrace` into a
self-describing JSON document. It also holds the small rule every exporter shares for telling
readable content from content that was not read or could not be decrypted.
"""

from __future__ import annotations

from typing import Any

from agent.audit.reader import RunTrace, TraceEvent

#: Name of the document format, so a consumer can recognise a medagent trace export.
SCHEMA = "medagent.trace"

#: Bumped whenever a field is removed or changes meaning (added fields do not bump it).
SCHEMA_VERSION = 1


def readable_content(event: TraceEvent) -> dict[str, Any] | None:
    """Return the event's content when it was read and decrypted, else None.

    The reader hands back ``None`` for metadata-only reads and ``{"encrypted": true}`` for
    encrypted content read without its key; neither is content an exporter may present as
    what the run saw or said.
    """
    content = event.content
    if not isinstance(content, dict):
        return None
    if content.get("encrypted") is True and len(content) == 1:
        return None
    return content


def export_json(trace: RunTrace) -> dict[str, Any]:
    """Return the whole trace as JSON-ready data, with its schema name and version.

    Every field the reader returns is kept, including the hash-chain fields and, when they were
    read, the PHI-bearing contents; ``content_included`` says whether any content is readable.
    """
    body = trace.model_dump(mode="json")
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "content_included": any(readable_content(event) is not None for event in trace.events),
        **body,
    }
