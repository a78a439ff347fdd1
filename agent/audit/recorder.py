"""The trace recorder: every stage of a run writes through it, one committed row at a time.

Each event is committed as soon as it happens, so a run that crashes or is killed leaves every
step it completed, and ``audit show`` reads a half-finished run without trouble. The recorder is
also the sources' :class:`~agent.domain.events.AccessObserver`. If the database stops accepting
writes the recorder raises :class:`~agent.errors.AuditError` and the run stops (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from agent import __version__
from agent.audit.tables import AuditContent, AuditEvent, AuditRun, utcnow
from agent.domain.events import DicomRetrievalEvent, FhirRequestEvent
from agent.errors import AuditError, MedagentError

#: Kinds of event rows, in the vocabulary ``audit show`` renders.
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
NODE_STARTED = "node_started"
NODE_FINISHED = "node_finished"
FHIR_REQUEST = "fhir_request"
DICOM_RETRIEVAL = "dicom_retrieval"
MODEL_CALL = "model_call"
MODEL_LOAD = "model_load"
NOTE = "note"


def settings_fingerprint(masked_settings: dict[str, Any]) -> str:
    """Hash the (secret-masked) effective settings, so runs can be grouped by configuration."""
    canonical = json.dumps(masked_settings, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class TraceRecorder:
    """Append-only writer of one run's trace."""

    def __init__(self, engine: Engine, run_id: str | None = None) -> None:
        self.engine = engine
        self.run_id = run_id or str(uuid.uuid4())
        self._seq = 0
        self._lock = threading.Lock()
        self.current_node: str | None = None
        self.finished_status: str | None = None

    # -- run lifecycle -------------------------------------------------------------------------
    def start_run(
        self,
        *,
        kind: str,
        trigger: str,
        patient_ref: str | None,
        settings_fingerprint: str,
        user_id: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        """Write the run row and its ``run_started`` event (the request text stored as content)."""
        run = AuditRun(
            id=self.run_id,
            created_at=utcnow(),
            kind=kind,
            trigger=trigger,
            patient_ref=patient_ref,
            user_id=user_id,
            software_version=__version__,
            settings_fingerprint=settings_fingerprint,
        )
        try:
            with Session(self.engine) as session, session.begin():
                session.add(run)
        except Exception as exc:
            raise AuditError(f"cannot start the run's trace: {type(exc).__name__}") from exc
        self.event(RUN_STARTED, kind, meta={"trigger": trigger}, content=request)

    def finish_run(self, status: str, *, error: MedagentError | None = None) -> None:
        """Append the final status (``ok`` or ``failed``), with the failing step and error code."""
        meta: dict[str, Any] = {}
        if error is not None:
            meta = {"error": error.to_dict(), "failing_step": self.current_node}
        self.event(RUN_FINISHED, status, status=status, meta=meta)
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
    ) -> int:
        """Append one event (and its PHI content, stored apart) and commit; return its seq.

        Raises:
            AuditError: the database did not accept the write; the run must stop.
        """
        with self._lock:
            seq = self._seq + 1
            try:
                with Session(self.engine) as session, session.begin():
                    content_id = None
                    if content is not None:
                        row = AuditContent(run_id=self.run_id, body=json.dumps(content, default=str))
                        session.add(row)
                        session.flush()
                        content_id = row.id
                    session.add(
                        AuditEvent(
                            run_id=self.run_id,
                            seq=seq,
                            kind=kind,
                            name=name[:200],
                            at=utcnow(),
                            duration_ms=duration_ms,
                            status=status,
                            meta=meta or {},
                            content_id=content_id,
                        )
                    )
            except Exception as exc:
                raise AuditError(f"cannot write to the trace ({kind}): {type(exc).__name__}") from exc
            self._seq = seq
            return seq

    @contextmanager
    def node(self, name: str) -> Iterator[None]:
        """Record a graph node's start, end, duration and failure (re-raised)."""
        self.current_node = name
        self.event(NODE_STARTED, name)
        started = time.perf_counter()
        try:
            yield
        except MedagentError as exc:
            elapsed = (time.perf_counter() - started) * 1000
            self.event(NODE_FINISHED, name, status="failed", duration_ms=elapsed, meta={"error": exc.to_dict()})
            raise
        except Exception as exc:
            elapsed = (time.perf_counter() - started) * 1000
            err = {"code": "internal_error", "message": type(exc).__name__}
            self.event(NODE_FINISHED, name, status="failed", duration_ms=elapsed, meta={"error": err})
            raise
        elapsed = (time.perf_counter() - started) * 1000
        self.event(NODE_FINISHED, name, status="ok", duration_ms=elapsed)

    # -- AccessObserver ------------------------------------------------------------------------
    def fhir_request(self, event: FhirRequestEvent) -> None:
        """Record one FHIR interaction (metadata only: resource ids, never resource content)."""
        status = "ok" if event.error is None else "failed"
        self.event(
            FHIR_REQUEST,
            f"{event.method} {event.path}",
            status=status,
            duration_ms=event.duration_ms,
            meta=event.model_dump(exclude={"duration_ms"}),
        )

    def dicom_retrieval(self, event: DicomRetrievalEvent) -> None:
        """Record one DICOM search or retrieval (UIDs, transfer syntax, bytes)."""
        status = "ok" if event.error is None else "failed"
        self.event(
            DICOM_RETRIEVAL,
            f"{event.action} {event.study_uid or ''}",
            status=status,
            duration_ms=event.duration_ms,
            meta=event.model_dump(exclude={"duration_ms"}),
        )
