"""Alembic environment: the trace tables' metadata and the URL from the caller's config.

``medagent db upgrade`` builds the config in code (agent/audit/db.py); running ``alembic``
directly works too with ``-x url=...`` or MEDAGENT_DB__URL.
"""

from __future__ import annotations

from alembic import context

from agent.audit.db import make_engine
from agent.audit.tables import Base
from agent.jobs import tables as _service_tables  # noqa: F401  (registers the service tables)

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from agent.config import get_settings

        url = get_settings().db.url.get_secret_value()
    return url


def run_migrations_offline() -> None:
    """Emit SQL without a connection."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations over a connection."""
    engine = make_engine(_url())
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
