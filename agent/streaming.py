"""Stream a run: node progress, answer tokens, findings and citations as they happen, then the outcome.

Where it sits: beside :func:`agent.runner.run_ask`, for the CLI (``medagent ask --stream``) and the
API (server-sent events). The run itself is the same; only a listener is attached, and the last
event is ``final`` (ok, with the result), ``interrupt`` (a thread waits for the user) or ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from agent.errors import MedagentError
from agent.graph.events import StreamEvent
from agent.runner import AgentRuntime, resume_ask, run_ask

_DONE = object()


async def stream_ask(runtime: AgentRuntime, *, resume: Any = None, **ask: Any) -> AsyncIterator[StreamEvent]:
    """Run :func:`run_ask` (or :func:`resume_ask` when ``resume`` is given) and yield its events.

    Args:
        resume: the answer to an interrupted thread's question (needs ``thread_id`` in ``ask``).
        **ask: the keyword arguments of :func:`run_ask` (or of :func:`resume_ask`).

    A failure is yielded as an ``error`` event (code, message, run id), not raised, so a client
    reading the stream always sees how it ended. Closing the generator early cancels the run,
    which is then recorded as cancelled.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def listen(event: StreamEvent) -> None:
        # nodes emit from worker threads too (token streams): hand over to the loop's thread
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def work() -> None:
        try:
            if resume is not None:
                result = await resume_ask(runtime, resume=resume, listener=listen, **ask)
            else:
                result = await run_ask(runtime, listener=listen, **ask)
            if result.status == "interrupted":
                data = {"run_id": result.run_id, "thread_id": result.thread_id, **(result.interrupt or {})}
                loop.call_soon_threadsafe(queue.put_nowait, StreamEvent(type="interrupt", data=data))
            else:
                final = StreamEvent(type="final", status=result.status, data=result.model_dump(mode="json"))
                loop.call_soon_threadsafe(queue.put_nowait, final)
        except MedagentError as exc:
            data = {**exc.to_dict(), "exit_code": exc.exit_code, "http_status": exc.http_status}
            loop.call_soon_threadsafe(queue.put_nowait, StreamEvent(type="error", data=data))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    task = asyncio.create_task(work())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            yield item
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
