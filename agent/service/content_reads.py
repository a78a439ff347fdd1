"""Reading stored clinical content is itself recorded: who read which run's content, and why.

Where it sits: the audit API (a trace with ``content=true``, a content export, a replay) and the
summaries API (a finished summary's text) call :func:`record_content_read` before answering. Each
read is a short run of kind ``content-read`` in the same append-only, chained trace, naming the
caller, role, purpose of use, the patient and the run whose content was read, so "who looked at
this patient's answers" has an answer too. Fails closed like every run: no record, no content.
"""

from __future__ import annotations

import asyncio

from agent.audit.recorder import settings_fingerprint
from agent.config import Role
from agent.runtime import AgentRuntime
from agent.service.auth import Principal

CONTENT_READ = "content-read"
#: the role a read is recorded under when the caller holds several: the one that grants content first
ROLE_ORDER: tuple[Role, ...] = ("clinician", "service", "admin", "auditor")


async def record_content_read(
    runtime: AgentRuntime, principal: Principal, *, run_id: str, patient_ref: str | None, what: str
) -> str:
    """Record that the caller read ``what`` of run ``run_id``; return the new run's id.

    Raises:
        AuditError: the trace cannot be written (the content is then not served).
    """

    def write() -> str:
        recorder = runtime.new_recorder()
        role = next((r for r in ROLE_ORDER if principal.has(r)), None)
        recorder.start_run(
            kind=CONTENT_READ,
            trigger="api",
            patient_ref=patient_ref,
            settings_fingerprint=settings_fingerprint(runtime.settings.masked()),
            user_id=principal.user,
            user_role=role,
            purpose_of_use=principal.purpose_of_use or "TREAT",
            request={"run_id": run_id, "what": what},
        )
        recorder.finish_run("ok", reason=f"{what} of run {run_id}")
        return recorder.run_id

    runtime.ensure_schema()
    return await asyncio.to_thread(write)
