"""Run limits: the step budget and per-call model timeouts, with their specific errors.

Where it sits: every model call of the graph goes through :func:`call_with_timeout`; the runner
maps LangGraph's recursion limit to :class:`StepLimitError`. Both errors (defined in
:mod:`agent.errors`) end the run cleanly with status ``failed`` and their own code in the trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from agent.errors import ModelTimeoutError, StepLimitError

__all__ = ["ModelTimeoutError", "StepLimitError", "call_with_timeout"]

T = TypeVar("T")


async def call_with_timeout(
    fn: Callable[[], T], timeout_s: float, what: str, on_abandon: Callable[[], None] | None = None
) -> T:
    """Run a blocking model call in a worker thread, giving up after ``timeout_s``.

    The worker thread cannot be killed; ``on_abandon`` (called on timeout or cancellation) lets a
    call that can stop early (a token stream) do so, else it finishes in the background and its
    result is dropped. The run, which is what the user waits for, ends now.

    Raises:
        ModelTimeoutError: the call did not finish in time.
    """
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout=timeout_s)
    except asyncio.CancelledError:
        if on_abandon is not None:
            on_abandon()
        raise
    except TimeoutError as exc:
        if on_abandon is not None:
            on_abandon()
        raise ModelTimeoutError(
            f"{what} took longer than {timeout_s:g} s (models.call_timeout_s)",
            details={"timeout_s": timeout_s, "call": what},
        ) from exc
