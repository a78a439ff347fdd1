"""The trace recorder: every stage of a run writes through it, one committed row at a time.

Each event is committed as soon as it happens, so a run that crashes or is killed leaves every
step it completed, and ``audit show`` reads a half-finished run without trouble. The recorder is
also the sources' :class:`~agent.domain.events.AccessObserver`. If the database stops accepting
writes the recorder raises :class:`~agent.errors.AuditError` and the run stops (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from agent import __version__
from agent.audit.chain import GENESIS_HASH, canonical_json, event_hash, merkle_root, sha256_hex
from agent.audit.keys import CheckpointSigner, ContentCipher, DigestSigner
from agent.audit.tables import AuditEvent, utcnow
from agent.domain.events import DicomRetrievalEvent, FhirRequestEvent
from agent.errors import AuditError, MedagentError

#: Kinds of event rows, in the vocabulary ``audit show`` renders.
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
NODE_STARTED = "node_started"
NODE_FINISHED = "node_finished"
FHIR_REQUEST = "fhir_request"
DICOM_RETRIEVAL = "dicom_retrieval"
#: a search of the similar-case index: it discloses other patients' study identifiers
INDEX_SEARCH = "index_search"
MODEL_CALL = "model_call"
MODEL_LOAD = "model_load"
NOTE = "note"

#: Run statuses a ``run_finished`` record can carry.
FINAL_STATUSES = ("ok", "failed", "cancelled", "interrupted")
#: PostgreSQL advisory lock key serialising appends to the one global chain.
CHAIN_LOCK_KEY = 0x6D656461  # "meda"

_EVENT_COLUMNS = (
    "run_id, seq, chain_seq, prev_hash, hash, content_hash, kind, name, at, duration_ms, status, meta, content_id"
)
_CHECKPOINT_COLUMNS = "created_at, chain_seq, head_hash, algorithm, key_id, signature"
#: The run row's fields after its id and created_at: bound in this order by the run INSERT, and
#: repeated in the chained ``run_started`` record, where verification compares them with the row.
RUN_FIELDS = (
    "kind",
    "trigger",
    "patient_ref",
    "user_id",
    "user_role",
    "purpose_of_use",
    "thread_id",
    "software_version",
    "settings_fingerprint",
)


class _DriverSql:
    """One dialect's append statements as driver SQL, run on the DBAPI cursor of the recorder's connection.

    Each record costs a handful of statements; through SQLAlchemy Core each one costs more Python
    time than SQLite needs to commit the whole record, so the hot path speaks to the driver directly
    (sqlite3 ``?`` placeholders, psycopg ``%s``). Timestamps go through the column type's own bind
    processor, so rows are stored exactly as SQLAlchemy would store them.
    """

    def __init__(self, dialect: Dialect) -> None:
        if dialect.name == "sqlite" and dialect.paramstyle == "qmark":
            mark, meta_mark = "?", "?"
            # The write lock is taken up front, so two processes never both read the same head.
            self.begin: str | None = "BEGIN IMMEDIATE"
            self.lock: str | None = None
            self.content_returns_id = False
        elif dialect.name == "postgresql" and dialect.paramstyle in ("format", "pyformat"):
            mark, meta_mark = "%s", "%s::json"
            self.begin = None  # the driver opens the transaction with the first statement
            # A separate statement from the head query: under READ COMMITTED the head query then
            # takes its snapshot after the lock is held, and so sees the last committed record.
            self.lock = f"SELECT pg_advisory_xact_lock({CHAIN_LOCK_KEY})"
            self.content_returns_id = True
        else:
            raise AuditError(f"the trace cannot be written to {dialect.name} ({dialect.driver})")

        def values(count: int) -> str:
            return ", ".join([mark] * count)

        columns = ", ".join(f'"{column}"' for column in ("id", "created_at", *RUN_FIELDS))  # "trigger": a keyword
        self.insert_run = f"INSERT INTO audit_runs ({columns}) VALUES ({values(2 + len(RUN_FIELDS))})"
        self.head = "SELECT chain_seq, hash FROM audit_events ORDER BY chain_seq DESC LIMIT 1"
        self.run_hashes = f"SELECT hash FROM audit_events WHERE run_id = {mark} ORDER BY seq"
        self.insert_content = f"INSERT INTO audit_content (run_id, media_type, body) VALUES ({values(3)})"
        if self.content_returns_id:
            self.insert_content += " RETURNING id"
        # meta (12th of the 13 columns) is bound as its canonical JSON text
        self.insert_event = f"INSERT INTO audit_events ({_EVENT_COLUMNS}) VALUES ({values(11)}, {meta_mark}, {mark})"
        self.insert_checkpoint = f"INSERT INTO audit_checkpoints ({_CHECKPOINT_COLUMNS}) VALUES ({values(6)})"
        at_type = AuditEvent.__table__.c.at.type
        self.time_param: Callable[[Any], Any] | None = at_type.dialect_impl(dialect).bind_processor(dialect)

    def param_time(self, value: datetime) -> Any:
        """Return a timestamp as this dialect's driver parameter."""
        return self.time_param(value) if self.time_param is not None else value


_DRIVER_SQL: dict[tuple[str, str, str], _DriverSql] = {}


def _driver_sql(dialect: Dialect) -> _DriverSql:
    """Return the statements for this dialect (built once per dialect, driver and paramstyle)."""
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    sql = _DRIVER_SQL.get(key)
    if sql is None:
        sql = _DRIVER_SQL[key] = _DriverSql(dialect)
    return sql


def checkpoint_message(chain_seq: int, head_hash: str) -> bytes:
    """Return the exact bytes a checkpoint signs."""
    return f"medagent-checkpoint:v1:{chain_seq}:{head_hash}".encode()


def process_identity() -> dict[str, Any]:
    """Return host, pid and the process start tick, so a later process can tell if this one died."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    # Field 22 of /proc/<pid>/stat is the start time in clock ticks since boot: with the pid it
    # identifies a process even after the pid is reused.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(identity: dict[str, Any]) -> bool:
    """Return whether the process described by :func:`process_identity` still runs here."""
    if identity.get("host") != socket.gethostname():
        return True  # another host's process: not ours to judge
    pid = identity.get("pid")
    if not isinstance(pid, int):
        return False
    start = _process_start(pid)
    return start is not None and start == identity.get("pid_start")


def settings_fingerprint(masked_settings: dict[str, Any]) -> str:
    """Hash the (secret-masked) effective settings, so runs can be grouped by configuration."""
    canonical = json.dumps(masked_settings, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class TraceRecorder:
    """Append-only writer of one run's trace."""

    def __init__(
        self,
        engine: Engine,
        run_id: str | None = None,
        *,
        signer: CheckpointSigner | None = None,
        cipher: ContentCipher | None = None,
        checkpoint_every: int = 100,
        next_seq: int = 1,
    ) -> None:
        self.engine = engine
        self.run_id = run_id or str(uuid.uuid4())
        self.signer = signer or DigestSigner()
        self.cipher = cipher
        self.checkpoint_every = checkpoint_every
        self._seq = next_seq - 1
        self._lock = threading.Lock()
        self.current_node: str | None = None
        self.finished_status: str | None = None
        self._conn: Connection | None = None
        self._driver: tuple[Any, Any] | None = None
        self._sql: _DriverSql

    @classmethod
    def resume(cls, engine: Engine, run_id: str, **kwargs: Any) -> TraceRecorder:
        """Return a recorder that appends to an existing run (e.g. to mark it interrupted)."""
        with Session(engine) as session:
            last = session.scalar(select(func.max(AuditEvent.seq)).where(AuditEvent.run_id == run_id)) or 0
        return cls(engine, run_id, next_seq=last + 1, **kwargs)

    # -- run lifecycle -------------------------------------------------------------------------
    def start_run(
        self,
        *,
        kind: str,
        trigger: str,
        patient_ref: str | None,
        settings_fingerprint: str,
        user_id: str | None = None,
        user_role: str | None = None,
        purpose_of_use: str | None = None,
        thread_id: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        """Write the run row and its ``run_started`` record (the request text stored as content).

        The run row's fields are repeated in the chained ``run_started`` record, so a changed
        run row is detected by verification.
        """
        fields = {
            "kind": kind,
            "trigger": trigger,
            "patient_ref": patient_ref,
            "user_id": user_id,
            "user_role": user_role,
            "purpose_of_use": purpose_of_use,
            "thread_id": thread_id,
            "software_version": __version__,
            "settings_fingerprint": settings_fingerprint,
        }
        created_at = utcnow()

        def insert_run(cursor: Any) -> None:
            values = (self.run_id, self._sql.param_time(created_at), *(fields[column] for column in RUN_FIELDS))
            cursor.execute(self._sql.insert_run, values)

        try:
            with self._lock:
                self._transaction(insert_run)
        except Exception as exc:
            self.close()
            raise AuditError(f"cannot start the run's trace: {type(exc).__name__}") from exc
        self.event(RUN_STARTED, kind, meta={"run": fields, "process": process_identity()}, content=request)

    def finish_run(self, status: str, *, error: MedagentError | None = None, reason: str | None = None) -> None:
        """Append the final status with the run's Merkle root, then a signed checkpoint.

        Args:
            status: one of :data:`FINAL_STATUSES`.
            error: the failure, recorded with the failing step and its code.
            reason: why, when there is no error object (e.g. an interrupted run).
        """
        meta: dict[str, Any] = {}
        content = None
        if error is not None:
            meta = {"error": error.metadata_dict(), "failing_step": self.current_node}
            if error.message_has_phi:
                content = {"error": error.to_dict()}
        if reason:
            meta["reason"] = reason
        self.event(
            RUN_FINISHED, status, status=status, meta=meta, content=content, with_merkle_root=True, checkpoint=True
        )
        self.finished_status = status

    # -- events --------------------------------------------------------------------------------
    def event(
        self,
        kind: str,
        name: str,
        *,
        status: str | None = None,
        duration_ms: float | None = None,
        meta: dict[str, Any] | None = None,
        content: Any = None,
        with_merkle_root: bool = False,
        checkpoint: bool = False,
    ) -> int:
        """Append one chained record (and its PHI content, stored apart) and commit; return its seq.

        Raises:
            AuditError: the database did not accept the write; the run must stop.
        """
        with self._lock:
            seq = self._seq + 1
            try:
                self._transaction(
                    partial(
                        self._append,
                        seq=seq,
                        kind=kind,
                        name=name,
                        status=status,
                        duration_ms=duration_ms,
                        meta=meta or {},
                        content=content,
                        with_merkle_root=with_merkle_root,
                        checkpoint=checkpoint,
                    )
                )
            except Exception as exc:
                self.close()  # a broken connection is not reused; the next write opens a new one
                raise AuditError(f"cannot write to the trace ({kind}): {type(exc).__name__}") from exc
            self._seq = seq
            if kind == RUN_FINISHED:
                self.close()
            return seq

    def _transaction(self, write: Callable[[Any], None]) -> None:
        """Run ``write`` with the DBAPI cursor in one transaction and commit it; roll back on any failure.

        The transaction is run on the driver connection: SQLAlchemy's Connection only holds it
        (pool checkout and return, invalidation) and never has a transaction of its own open.
        """
        dbapi, cursor = self._cursor()
        try:
            if self._sql.begin:
                cursor.execute(self._sql.begin)
            write(cursor)
            dbapi.commit()
        except BaseException:
            self._rollback(dbapi)  # also on cancellation: the write lock is never kept
            raise

    def _cursor(self) -> tuple[Any, Any]:
        """Return this recorder's driver connection and cursor (one per run, not one per record)."""
        if self._conn is None:
            conn = self.engine.connect()
            try:
                self._sql = _driver_sql(conn.dialect)
                dbapi = conn.connection.driver_connection
                assert dbapi is not None  # a checked-out connection holds its driver connection
                self._driver = (dbapi, dbapi.cursor())
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        assert self._driver is not None
        return self._driver

    def _rollback(self, dbapi: Any) -> None:
        """Roll back the record's transaction; a connection that cannot is dropped from the pool."""
        try:
            dbapi.rollback()
        except Exception:
            if self._conn is not None:
                self._conn.invalidate()

    def close(self) -> None:
        """Return the connection to the pool (done automatically when the run finishes)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
                self._driver = None

    def _append(
        self,
        cursor: Any,
        *,
        seq: int,
        kind: str,
        name: str,
        status: str | None,
        duration_ms: float | None,
        meta: dict[str, Any],
        content: Any,
        with_merkle_root: bool,
        checkpoint: bool,
    ) -> None:
        sql = self._sql
        if sql.lock:
            cursor.execute(sql.lock)
        cursor.execute(sql.head)
        last = cursor.fetchone()
        chain_seq = last[0] + 1 if last else 1
        prev_hash = last[1] if last else GENESIS_HASH
        content_id = content_hash = None
        if content is not None:
            body = canonical_json(content)
            media_type = "application/json"
            if self.cipher is not None:
                body, media_type = self.cipher.encrypt(body), self.cipher.media_type
            cursor.execute(sql.insert_content, (self.run_id, media_type, body))
            content_id = cursor.fetchone()[0] if sql.content_returns_id else cursor.lastrowid
            content_hash = sha256_hex(body)
        if with_merkle_root:
            cursor.execute(sql.run_hashes, (self.run_id,))
            hashes = [row[0] for row in cursor.fetchall()]
            meta = {**meta, "merkle_root": merkle_root(hashes), "merkle_leaves": len(hashes)}
        # Stored exactly as hashed: the canonical text is what the JSON column holds, and the
        # hash is over what that text reads back as.
        meta_text = canonical_json(meta)
        meta = json.loads(meta_text)
        at = utcnow()
        # float(): an int would be hashed as "5" but read back from the REAL column as 5.0
        duration = round(float(duration_ms), 3) if duration_ms is not None else None
        name = name[:200]
        digest = event_hash(
            chain_seq=chain_seq,
            prev_hash=prev_hash,
            run_id=self.run_id,
            seq=seq,
            kind=kind,
            name=name,
            at=at,
            duration_ms=duration,
            status=status,
            meta=meta,
            content_hash=content_hash,
        )
        stored_at = sql.param_time(at)
        cursor.execute(
            sql.insert_event,
            (
                self.run_id,
                seq,
                chain_seq,
                prev_hash,
                digest,
                content_hash,
                kind,
                name,
                stored_at,
                duration,
                status,
                meta_text,
                content_id,
            ),
        )
        if checkpoint or chain_seq % self.checkpoint_every == 0:
            signature = self.signer.sign(checkpoint_message(chain_seq, digest))
            cursor.execute(
                sql.insert_checkpoint,
                (stored_at, chain_seq, digest, self.signer.algorithm, self.signer.key_id, signature),
            )

    @contextmanager
    def node(self, name: str, *, inputs: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Record a graph node's start, end, duration and failure (re-raised).

        Yields a dict the caller may fill with ``outputs`` (references and counts, never content);
        the end record also names the range of records the node produced.
        """
        self.current_node = name
        first = self.event(NODE_STARTED, name, meta={"inputs": inputs or []})
        started = time.perf_counter()
        produced: dict[str, Any] = {}
        try:
            yield produced
        except Exception as exc:
            elapsed = (time.perf_counter() - started) * 1000
            error = (
                exc.metadata_dict()
                if isinstance(exc, MedagentError)
                else {"code": "internal_error", "message": type(exc).__name__}  # no message: it may hold PHI
            )
            meta = {"error": error, "records": [first, self._seq]}
            self.event(NODE_FINISHED, name, status="failed", duration_ms=elapsed, meta=meta)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        meta = {"outputs": produced.get("outputs", {}), "records": [first, self._seq]}
        self.event(NODE_FINISHED, name, status="ok", duration_ms=elapsed, meta=meta)

    # -- AccessObserver ------------------------------------------------------------------------
    def fhir_request(self, event: FhirRequestEvent) -> None:
        """Record one FHIR interaction (metadata only: resource ids, never resource content)."""
        self._access(FHIR_REQUEST, f"{event.method} {event.path}", event)

    def dicom_retrieval(self, event: DicomRetrievalEvent) -> None:
        """Record one DICOM search or retrieval (UIDs, transfer syntax, bytes)."""
        self._access(DICOM_RETRIEVAL, f"{event.action} {event.study_uid or ''}", event)

    def _access(self, kind: str, name: str, event: FhirRequestEvent | DicomRetrievalEvent) -> None:
        self.event(
            kind,
            name,
            status="ok" if event.error is None else "failed",
            duration_ms=event.duration_ms,
            meta=event.model_dump(exclude={"duration_ms"}),
        )
