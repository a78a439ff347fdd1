"""Database engines and migrations for the trace.

The schema is created only by Alembic migrations (``medagent db upgrade``); code never calls
``create_all``. Before a run, :func:`ensure_schema` either applies migrations (dev, when
``auto_migrate`` is on) or refuses to start against an out-of-date database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from agent.config import PROJECT_ROOT
from agent.errors import AuditError
from alembic import command

MIGRATIONS_DIR = PROJECT_ROOT / "alembic"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """Create an engine; for SQLite, create the file's folder and enforce foreign keys.

    Args:
        pool_size: connections kept open; a recording run holds one for its whole length, so a
            process sizes this above its number of concurrent runs.
    """
    parsed = make_url(url)
    pool: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 10}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        in_memory = not database or database == ":memory:"
        if database and not in_memory:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **({} if in_memory else pool)
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # In WAL mode NORMAL still survives a killed process (commits reach the OS at once);
            # only a power cut can lose the newest commits, which the signed checkpoints reveal.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin ...
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # ... and begin them IMMEDIATE: the write lock is taken up front, so two processes
            # appending to the hash chain are serialised instead of both reading the same head.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def alembic_config(url: str) -> Config:
    """Build an Alembic config pointing at the project's migrations and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``.

    Raises:
        AuditError: when the database cannot be reached or a migration fails.
    """
    try:
        make_engine(url).dispose()  # creates the SQLite folder
        command.upgrade(alembic_config(url), revision)
    except Exception as exc:
        raise AuditError(f"database migration failed: {type(exc).__name__}: {_safe(exc)}") from exc


def current_revision(engine: Engine) -> str | None:
    """Return the database's migration revision (None when never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """Return the newest migration revision of this code."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Make sure the trace schema is current before a run writes to it (fail closed).

    Raises:
        AuditError: database unreachable, or not migrated and auto-migration is off.
    """
    try:
        current = current_revision(engine)
    except Exception as exc:
        raise AuditError(f"trace database unreachable: {type(exc).__name__}: {_safe(exc)}") from exc
    if current == head_revision():
        return
    if not auto_migrate:
        raise AuditError(
            f"trace database is at revision {current or 'none'}, code needs {head_revision()}: "
            "run `medagent db upgrade`"
        )
    upgrade(engine.url.render_as_string(hide_password=False))


def _safe(exc: Exception) -> str:
    """Return the first line of an exception message (driver messages can be long)."""
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""


def grant_append_only(engine: Engine, role: str) -> None:
    """Give a PostgreSQL role what the service needs on the trace, and nothing that could change it.

    The role may SELECT and INSERT on the audit tables (and use their id sequences); UPDATE,
    DELETE and TRUNCATE are revoked, so even with the triggers dropped it cannot alter history.

    Raises:
        ConfigError: not PostgreSQL, or an invalid role name.
        AuditError: the grants failed.
    """
    from sqlalchemy import text

    from agent.audit.tables import AUDIT_TABLES
    from agent.errors import ConfigError

    if engine.dialect.name != "postgresql":
        raise ConfigError("role grants apply to PostgreSQL; SQLite relies on its triggers and file permissions")
    if not role.replace("_", "").isalnum():
        raise ConfigError(f"invalid role name {role!r}: letters, digits and underscores only")
    tables = ", ".join(AUDIT_TABLES)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'GRANT SELECT, INSERT ON {tables} TO "{role}"'))
            conn.execute(text(f'REVOKE UPDATE, DELETE, TRUNCATE ON {tables} FROM "{role}"'))
            conn.execute(text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    except Exception as exc:
        raise AuditError(f"granting append-only access to {role} failed: {type(exc).__name__}: {_safe(exc)}") from exc
