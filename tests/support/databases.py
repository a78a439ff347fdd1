"""Trace databases for tests: a fresh SQLite file, and a fresh database on the local PostgreSQL.

PostgreSQL runs on 127.0.0.1:5432 on this kind of machine (trust auth). Outside CI its absence
skips the PostgreSQL variants loudly; in CI (CI=true) it fails them, so they can never be
silently skipped there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine

PG_ADMIN_URL = os.environ.get("MEDAGENT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def postgres_available() -> str | None:
    """Return None when the server answers, else the reason it does not."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def require_postgres() -> None:
    """Skip (outside CI) or fail (in CI) when PostgreSQL is not reachable."""
    reason = postgres_available()
    if reason is None:
        return
    message = f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({reason})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must not skip PostgreSQL tests")
    pytest.skip(f"SKIPPING POSTGRESQL TESTS: {message}")


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database for one test (or module) and drop it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    require_postgres()
    name = f"medagent_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


EngineFactory = Callable[[str], Engine]
