"""Where conversation threads live: a LangGraph checkpointer chosen by settings (SQLite or PostgreSQL).

Where it sits: :func:`agent.runner.run_ask` opens one around a run that has a ``thread_id``, and
compiles the graph with it; the thread's state (earlier turns, pending interrupts) is kept there.
The serializer is told exactly which of our types the state holds, so nothing else is revived
from a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from agent.config import DEFAULT_DATA_DIR, AgentSettings
from agent.domain.answer import Citation
from agent.domain.imaging import Finding, LabelScore
from agent.domain.plan import Plan
from agent.domain.refs import InstanceRef
from agent.domain.similar import SimilarCase
from agent.errors import ConfigError

#: The default thread store beside the trace database.
DEFAULT_THREADS_PATH = DEFAULT_DATA_DIR / "threads.db"
_STATE_TYPES = (Plan, Finding, LabelScore, InstanceRef, SimilarCase, Citation)


def serializer() -> JsonPlusSerializer:
    """Return the checkpoint serializer, allowing exactly the domain types the graph state holds."""
    return JsonPlusSerializer(allowed_msgpack_modules=list(_STATE_TYPES))


def checkpointer_location(settings: AgentSettings) -> tuple[str, str]:
    """Return ``("postgres", conninfo)`` or ``("sqlite", path)`` for the configured thread store.

    Raises:
        ConfigError: a URL of another database kind.
    """
    url = settings.checkpointer_url.get_secret_value() if settings.checkpointer_url else None
    if not url:
        return "sqlite", str(DEFAULT_THREADS_PATH)
    if re.match(r"^postgres(ql)?(\+\w+)?://", url):
        # psycopg takes a libpq URL: drop SQLAlchemy's driver suffix
        return "postgres", re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
    if url.startswith("sqlite:///"):
        return "sqlite", url.removeprefix("sqlite:///")
    if "://" in url:
        raise ConfigError("agent.checkpointer_url must be a SQLite path, a sqlite:/// URL or a postgresql:// URL")
    return "sqlite", url


@asynccontextmanager
async def open_checkpointer(settings: AgentSettings) -> AsyncIterator[Any]:
    """Open the thread store for one run (tables created on first use) and close it afterwards."""
    kind, where = checkpointer_location(settings)
    if kind == "postgres":
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        async with AsyncPostgresSaver.from_conn_string(where, serde=serializer()) as saver:
            await saver.setup()
            yield saver
        return
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    Path(where).parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(where) as conn:
        lite = AsyncSqliteSaver(conn, serde=serializer())
        await lite.setup()
        yield lite
