"""Close runs whose process died: on start, a run left open by a killed process is marked interrupted.

Every committed record of such a run stays as it was; the interruption is a new record (the trace
is append-only), so the chain still verifies. Runs of processes that are still alive, or that
ran on another host, are left alone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from agent.audit.recorder import RUN_FINISHED, RUN_STARTED, TraceRecorder, process_alive
from agent.audit.tables import AuditEvent


def open_runs(engine: Engine) -> dict[str, dict[str, Any]]:
    """Return run id -> the process identity recorded at its start, for runs with no final record."""
    with Session(engine) as session:
        finished = set(session.scalars(select(AuditEvent.run_id).where(AuditEvent.kind == RUN_FINISHED)))
        starts = session.execute(select(AuditEvent.run_id, AuditEvent.meta).where(AuditEvent.kind == RUN_STARTED))
        return {row.run_id: (row.meta or {}).get("process", {}) for row in starts if row.run_id not in finished}


def mark_interrupted_runs(engine: Engine, **recorder_options: Any) -> list[str]:
    """Append an ``interrupted`` final record to every open run whose process is gone; return their ids."""
    marked = []
    for run_id, process in open_runs(engine).items():
        if process_alive(process):
            continue
        recorder = TraceRecorder.resume(engine, run_id, **recorder_options)
        recorder.finish_run(
            "interrupted", reason="the process running it ended without finishing it (killed or crashed)"
        )
        marked.append(run_id)
    return marked
