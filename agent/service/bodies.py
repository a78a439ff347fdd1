"""Reading request bodies with a size limit, for the routes that parse raw bodies themselves.

Why: CDS Hooks and FHIR notification bodies are read before any schema applies, from callers
that are other systems; streaming with a running count refuses an oversized body (declared or
not) without holding it all in memory first.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request


async def read_limited_body(
    request: Request, limit: int, too_large: Callable[[str], Exception], *, what: str = "request"
) -> bytes:
    """Return the request body, or raise ``too_large(message)`` once it exceeds ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before anything is read; ``what`` names the
    body in the message.
    """
    message = f"the {what} is larger than {limit} bytes"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(message)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(message)
        chunks.append(chunk)
    return b"".join(chunks)
