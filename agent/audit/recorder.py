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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text
from sqlalchemy.orm import Session

from agent import __version__
from agent.audit.chain import GENESIS_HASH, canonical_json, event_hash, sha256_hex
from agent.audit.keys import CheckpointSigner, ContentCipher, DigestSigner
from agent.audit.tables import AuditEvent, AuditRun, Base, utcnow
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
# Statements built once and executed with parameters: building a new INSERT per record costs
# SQLAlchemy more time than SQLite needs to commit it.
_SELECT_HEAD = select(AuditEvent.chain_seq, AuditEvent.hash).order_by(AuditEvent.chain_seq.desc()).limit(1)
_INSERT_EVENT = insert(Base.metadata.tables["audit_events"])
_INSERT_CONTENT = insert(Base.metadata.tables["audit_content"])
_INSERT_CHECKPOINT = insert(Base.metadata.tables["audit_checkpoints"])

#: PostgreSQL advisory lock key serialising appends to the one global chain.
CHAIN_LOCK_KEY = 0x6D656461  # "meda"


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
        try:
            with Session(self.engine) as session, session.begin():
                session.add(AuditRun(id=self.run_id, created_at=utcnow(), **fields))
        except Exception as exc:
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
                conn = self._connection()
                with conn.begin():
                    self._append(
                        conn,
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
            except Exception as exc:
                self.close()  # a broken connection is not reused; the next write opens a new one
                raise AuditError(f"cannot write to the trace ({kind}): {type(exc).__name__}") from exc
            self._seq = seq
            if kind == RUN_FINISHED:
                self.close()
            return seq

    def _connection(self) -> Connection:
        """Return this recorder's connection (one per run, not one per record: checkout costs)."""
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def close(self) -> None:
        """Return the connection to the pool (done automatically when the run finishes)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _append(
        self,
        conn: Connection,
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
        lock_chain(conn)
        last = conn.execute(_SELECT_HEAD).first()
        chain_seq = last.chain_seq + 1 if last else 1
        prev_hash = last.hash if last else GENESIS_HASH
        content_id = content_hash = None
        if content is not None:
            body = canonical_json(content)
            media_type = "application/json"
            if self.cipher is not None:
                body, media_type = self.cipher.encrypt(body), self.cipher.media_type
            inserted = conn.execute(_INSERT_CONTENT, {"run_id": self.run_id, "media_type": media_type, "body": body})
            key = inserted.inserted_primary_key
            assert key is not None  # an INSERT always reports its primary key
            content_id, content_hash = key[0], sha256_hex(body)
        if with_merkle_root:
            from agent.audit.chain import merkle_root

            hashes = conn.scalars(
                select(AuditEvent.hash).where(AuditEvent.run_id == self.run_id).order_by(AuditEvent.seq)
            ).all()
            meta = {**meta, "merkle_root": merkle_root(list(hashes)), "merkle_leaves": len(hashes)}
        # Stored exactly as hashed: the JSON round-trip makes meta what the database gives back.
        meta = json.loads(canonical_json(meta))
        at = utcnow()
        duration = round(duration_ms, 3) if duration_ms is not None else None
        digest = event_hash(
            chain_seq=chain_seq,
            prev_hash=prev_hash,
            run_id=self.run_id,
            seq=seq,
            kind=kind,
            name=name[:200],
            at=at,
            duration_ms=duration,
            status=status,
            meta=meta,
            content_hash=content_hash,
        )
        conn.execute(
            _INSERT_EVENT,
            {
                "run_id": self.run_id,
                "seq": seq,
                "chain_seq": chain_seq,
                "prev_hash": prev_hash,
                "hash": digest,
                "content_hash": content_hash,
                "kind": kind,
                "name": name[:200],
                "at": at,
                "duration_ms": duration,
                "status": status,
                "meta": meta,
                "content_id": content_id,
            },
        )
        if checkpoint or chain_seq % self.checkpoint_every == 0:
            conn.execute(
                _INSERT_CHECKPOINT,
                {
                    "created_at": at,
                    "chain_seq": chain_seq,
                    "head_hash": digest,
                    "algorithm": self.signer.algorithm,
                    "key_id": self.signer.key_id,
                    "signature": self.signer.sign(checkpoint_message(chain_seq, digest)),
                },
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


def lock_chain(conn: Connection) -> None:
    """Serialise appends to the global chain for the rest of this transaction.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: the engine opens every transaction
    with ``BEGIN IMMEDIATE`` (agent/audit/db.py), which already holds the database's write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
