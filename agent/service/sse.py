"""Server-sent events, both ways: frame a run's stream events, and read such a stream back.

Where it sits: ``POST /v1/threads/{id}/messages`` frames with :func:`sse_frames`; the service
benchmark and the tests read with :func:`read_sse`. The stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

from agent.graph.events import StreamEvent

DONE = "[DONE]"


async def sse_frames(events: AsyncIterator[StreamEvent], *, keepalive_s: float) -> AsyncGenerator[str, None]:
    """Frame stream events as SSE; send a keep-alive comment after each quiet spell of ``keepalive_s``.

    The pending ``__anext__`` is never cancelled by the keep-alive wait (that would end the run);
    only leaving this generator (the client went away) closes the event stream, which cancels the run.
    """
    iterator = aiter(events)
    pending: asyncio.Future[StreamEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            yield f"event: {event.type}\ndata: {event.model_dump_json(exclude_none=True)}\n\n"
        yield f"data: {DONE}\n\n"
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        closer = getattr(events, "aclose", None)
        if closer is not None:
            await closer()


def read_sse(lines: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse SSE lines into ``(event type, data)`` pairs; data is JSON-decoded, ``[DONE]`` kept as text."""
    return list(_parse(lines))


def _parse(lines: Iterable[str]) -> Iterable[tuple[str, Any]]:
    event, data = "message", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                yield event, text if text == DONE else json.loads(text)
            event, data = "message", list[str]()
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        text = "\n".join(data)
        yield event, text if text == DONE else json.loads(text)
