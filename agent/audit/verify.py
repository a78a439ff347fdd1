"""Verify the trace: hash chain, content hashes, run rows, per-run Merkle roots, signed checkpoints.

Verification reads the database as an auditor would and names every broken record: an edited
field, a deleted or inserted row, a reordered run, swapped content, a forged run row, or a tail
truncated below a signed checkpoint. It streams the chain in batches, so it runs over millions
of records in bounded memory (bounded by the runs still open while reading).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from agent.audit.chain import GENESIS_HASH, event_hash, merkle_root, sha256_hex
from agent.audit.keys import UNSIGNED, CheckpointSigner
from agent.audit.recorder import RUN_FIELDS, RUN_FINISHED, RUN_STARTED, checkpoint_message
from agent.audit.tables import AuditCheckpoint, AuditContent, AuditEvent, AuditRun
from agent.errors import AuditError, RunNotFoundError


class IntegrityProblem(BaseModel):
    """One broken thing, named precisely enough to find it in the database."""

    code: str
    where: str
    message: str


class VerifyReport(BaseModel):
    """The outcome of a verification."""

    ok: bool
    scope: str = Field(description="'all' or 'run <id>'")
    records: int = 0
    runs: int = 0
    checkpoints: int = 0
    problems: list[IntegrityProblem] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    head: dict[str, Any] | None = Field(
        None, description="The chain's last record and newest checkpoint: anchor these outside the database."
    )


def _where(event: Any) -> str:
    return f"record chain_seq={event.chain_seq} (run {event.run_id} seq {event.seq}, {event.kind} {event.name})"


class _Checker:
    def __init__(self, verifiers: dict[str, CheckpointSigner]) -> None:
        self.verifiers = verifiers
        self.problems: list[IntegrityProblem] = []
        self.warnings: list[str] = []

    def problem(self, code: str, where: str, message: str) -> None:
        self.problems.append(IntegrityProblem(code=code, where=where, message=message))

    def check_record(self, event: Any, body: str | None, content_run: str | None) -> None:
        """Recompute the record's hash and check its content."""
        expected = event_hash(
            chain_seq=event.chain_seq,
            prev_hash=event.prev_hash,
            run_id=event.run_id,
            seq=event.seq,
            kind=event.kind,
            name=event.name,
            at=event.at,
            duration_ms=event.duration_ms,
            status=event.status,
            meta=event.meta if isinstance(event.meta, dict) else json.loads(event.meta or "{}"),
            content_hash=event.content_hash,
        )
        if expected != event.hash:
            self.problem("record_altered", _where(event), "the record's fields do not match its hash")
        if event.content_id is None:
            if event.content_hash is not None:
                self.problem("content_missing", _where(event), "the record names content but links none")
            return
        if body is None:
            self.problem("content_missing", _where(event), f"content row {event.content_id} is gone")
        elif sha256_hex(body) != event.content_hash:
            self.problem("content_altered", _where(event), f"content row {event.content_id} was changed or swapped")
        if content_run is not None and content_run != event.run_id:
            self.problem("content_altered", _where(event), f"content row {event.content_id} belongs to another run")

    def check_run_row(self, run: AuditRun | None, started: Any, run_id: str) -> None:
        """Check the run row against the fields its chained start record commits to."""
        if run is None:
            self.problem("run_row_missing", f"run {run_id}", "records exist but the run row is gone")
            return
        if started is None:
            self.problem("run_forged", f"run {run_id}", "the run row has no chained run_started record")
            return
        if "run" not in (started.meta or {}):
            self.warnings.append(f"run {run_id} predates run-row commitment (schema 0001): its row is not checked")
            return
        committed = started.meta["run"]
        changed = [name for name in RUN_FIELDS if committed.get(name) != getattr(run, name)]
        if changed:
            self.problem("run_altered", f"run {run_id}", f"run row fields changed: {', '.join(changed)}")

    def check_seqs(self, run_id: str, seqs: list[int]) -> None:
        """A run's records are numbered 1..n without gaps."""
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, (max(seqs) if seqs else 0) + 1)) - set(seqs))
            detail = f"missing seq {missing}" if missing else f"seq out of order: {seqs}"
            self.problem("run_records_missing", f"run {run_id}", detail)

    def check_merkle(self, finished: Any, leaves: list[str]) -> None:
        """The run's final record commits to a Merkle root over the records before it."""
        meta = finished.meta or {}
        if "merkle_root" not in meta:
            return
        if meta.get("merkle_leaves") != len(leaves) or merkle_root(leaves) != meta["merkle_root"]:
            self.problem(
                "merkle_mismatch",
                _where(finished),
                f"the run's records no longer match its Merkle root ({len(leaves)} records now, "
                f"{meta.get('merkle_leaves')} when it finished)",
            )

    def check_finish_signed(self, finished: Any, has_checkpoint: bool) -> None:
        """Every run's final record is checkpointed in the same transaction: a forged ending is not."""
        if "merkle_root" not in (finished.meta or {}):
            self.warnings.append(f"run {finished.run_id} predates Merkle roots (schema 0001): its end is unsigned")
        elif not has_checkpoint:
            self.problem("finish_unsigned", _where(finished), "the run's final record has no signed checkpoint")

    def check_checkpoint(self, checkpoint: AuditCheckpoint, head: Any, last_chain_seq: int) -> None:
        """A checkpoint is validly signed and still agrees with the chain."""
        where = f"checkpoint id={checkpoint.id} at chain_seq={checkpoint.chain_seq}"
        verifier = self.verifiers.get(checkpoint.algorithm)
        message = checkpoint_message(checkpoint.chain_seq, checkpoint.head_hash)
        if verifier is None:
            self.warnings.append(f"{where}: signed with {checkpoint.algorithm}, but no key to verify it is configured")
        elif verifier.key_id != checkpoint.key_id and checkpoint.algorithm != UNSIGNED:
            self.problem(
                "checkpoint_key_unknown", where, f"signed with key {checkpoint.key_id}, not the configured key"
            )
        elif not verifier.verify(message, checkpoint.signature):
            self.problem("checkpoint_forged", where, "the signature does not verify")
        if checkpoint.chain_seq > last_chain_seq:
            self.problem(
                "tail_truncated",
                where,
                f"the chain ends at chain_seq={last_chain_seq}, but this checkpoint covers {checkpoint.chain_seq}",
            )
        elif head is None:
            self.problem("tail_truncated", where, f"the record at chain_seq={checkpoint.chain_seq} is gone")
        elif head.hash != checkpoint.head_hash:
            self.problem("checkpoint_mismatch", where, "the chain at this point differs from what was signed")


def _batches(session: Session, batch_size: int) -> Iterator[list[Any]]:
    """Yield the chain in order, as plain rows: building ORM objects would cost a third of the time."""
    events = AuditEvent.__table__
    last = 0
    while True:
        rows = session.execute(
            select(events).where(events.c.chain_seq > last).order_by(events.c.chain_seq).limit(batch_size)
        ).all()
        if not rows:
            return
        yield list(rows)
        last = rows[-1].chain_seq


def _contents(session: Session, ids: list[int]) -> dict[int, tuple[str, str]]:
    if not ids:
        return {}
    rows = session.execute(
        select(AuditContent.id, AuditContent.body, AuditContent.run_id).where(AuditContent.id.in_(ids))
    ).all()
    return {row.id: (row.body, row.run_id) for row in rows}


def verify_trace(
    engine: Engine, *, verifiers: dict[str, CheckpointSigner], run_id: str | None = None, batch_size: int = 5000
) -> VerifyReport:
    """Verify the whole trace, or one run, and return every problem found.

    Raises:
        RunNotFoundError: ``run_id`` names no run and no record.
        AuditError: the database cannot be read.
    """
    try:
        with Session(engine) as session:
            if run_id is not None:
                return _verify_run(session, run_id, verifiers)
            return _verify_all(session, verifiers, batch_size)
    except (RunNotFoundError, AuditError):
        raise
    except Exception as exc:
        raise AuditError(f"cannot read the trace database: {type(exc).__name__}") from exc


def _verify_all(session: Session, verifiers: dict[str, CheckpointSigner], batch_size: int) -> VerifyReport:
    checker = _Checker(verifiers)
    prev_hash, prev_seq, records = GENESIS_HASH, 0, 0
    open_runs: dict[str, tuple[list[int], list[str]]] = {}
    started: dict[str, Any] = {}
    referenced: set[int] = set()
    finished: set[str] = set()
    checkpoint_heads = set(session.scalars(select(AuditCheckpoint.chain_seq)).all())
    heads: dict[int, Any] = {}
    for batch in _batches(session, batch_size):
        contents = _contents(session, [e.content_id for e in batch if e.content_id is not None])
        for event in batch:
            records += 1
            if event.chain_seq != prev_seq + 1:
                checker.problem(
                    "records_missing",
                    _where(event),
                    f"chain_seq jumps from {prev_seq} to {event.chain_seq}: records deleted or renumbered",
                )
            if event.prev_hash != prev_hash:
                checker.problem("chain_broken", _where(event), "does not link to the record before it")
            body, content_run = contents.get(event.content_id, (None, None)) if event.content_id else (None, None)
            checker.check_record(event, body, content_run)
            if event.content_id is not None:
                referenced.add(event.content_id)
            seqs, leaves = open_runs.setdefault(event.run_id, ([], []))
            if event.run_id in finished:
                checker.problem("record_after_finish", _where(event), "a record was added after the run finished")
            if event.kind == RUN_STARTED:
                started[event.run_id] = event
            if event.kind == RUN_FINISHED:
                checker.check_merkle(event, leaves)
                finished.add(event.run_id)
                checker.check_finish_signed(event, event.chain_seq in checkpoint_heads)
            seqs.append(event.seq)
            leaves.append(event.hash)
            if event.chain_seq in checkpoint_heads:
                heads[event.chain_seq] = event
            prev_hash, prev_seq = event.hash, event.chain_seq
    runs = {run.id: run for run in session.scalars(select(AuditRun))}
    for run_id in sorted(set(runs) | set(open_runs)):
        checker.check_run_row(runs.get(run_id), started.get(run_id), run_id)
        checker.check_seqs(run_id, sorted(open_runs.get(run_id, ([], []))[0]))
    orphans = set(session.scalars(select(AuditContent.id)).all()) - referenced
    for content_id in sorted(orphans):
        checker.problem("content_unreferenced", f"content row id={content_id}", "no chained record refers to it")
    checkpoints = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.chain_seq)).all()
    for checkpoint in checkpoints:
        checker.check_checkpoint(checkpoint, heads.get(checkpoint.chain_seq), prev_seq)
    if checkpoints and all(c.algorithm == UNSIGNED for c in checkpoints):
        checker.warnings.append(
            "checkpoints are unsigned digests: set MEDAGENT_AUDIT__HMAC_KEY or an Ed25519 key to detect forgery"
        )
    newest = checkpoints[-1] if checkpoints else None
    head = {
        "chain_seq": prev_seq,
        "hash": prev_hash,
        "checkpoint": None
        if newest is None
        else {
            "chain_seq": newest.chain_seq,
            "head_hash": newest.head_hash,
            "algorithm": newest.algorithm,
            "key_id": newest.key_id,
            "signature": newest.signature,
        },
    }
    return VerifyReport(
        head=head,
        ok=not checker.problems,
        scope="all",
        records=records,
        runs=len(runs),
        checkpoints=len(checkpoints),
        problems=checker.problems,
        warnings=checker.warnings,
    )


def _verify_run(session: Session, run_id: str, verifiers: dict[str, CheckpointSigner]) -> VerifyReport:
    checker = _Checker(verifiers)
    events = session.scalars(select(AuditEvent).where(AuditEvent.run_id == run_id).order_by(AuditEvent.seq)).all()
    run = session.get(AuditRun, run_id)
    if run is None and not events:
        raise RunNotFoundError(f"no run with id {run_id}")
    contents = _contents(session, [e.content_id for e in events if e.content_id is not None])
    wanted = {e.chain_seq - 1 for e in events if e.chain_seq > 1}
    before = {
        row.chain_seq: row.hash
        for row in session.execute(
            select(AuditEvent.chain_seq, AuditEvent.hash).where(AuditEvent.chain_seq.in_(wanted))
        )
    }
    leaves: list[str] = []
    started = None
    finished_at: AuditEvent | None = None
    for event in events:
        expected_prev = GENESIS_HASH if event.chain_seq == 1 else before.get(event.chain_seq - 1)
        if expected_prev is None:
            checker.problem("records_missing", _where(event), f"the record at chain_seq={event.chain_seq - 1} is gone")
        elif event.prev_hash != expected_prev:
            checker.problem("chain_broken", _where(event), "does not link to the record before it")
        body, content_run = contents.get(event.content_id, (None, None)) if event.content_id else (None, None)
        checker.check_record(event, body, content_run)
        if finished_at is not None:
            checker.problem("record_after_finish", _where(event), "a record was added after the run finished")
        if event.kind == RUN_STARTED:
            started = event
        if event.kind == RUN_FINISHED:
            checker.check_merkle(event, leaves)
            finished_at = event
        leaves.append(event.hash)
    checker.check_run_row(run, started, run_id)
    checker.check_seqs(run_id, [e.seq for e in events])
    last_chain_seq = session.scalar(select(func.max(AuditEvent.chain_seq))) or 0
    chain_seqs = [e.chain_seq for e in events]
    covering: list[AuditCheckpoint] = []
    if chain_seqs:
        first = min(chain_seqs)
        covering = list(
            session.scalars(
                select(AuditCheckpoint).where(AuditCheckpoint.chain_seq >= first).order_by(AuditCheckpoint.chain_seq)
            ).all()
        )
        heads = {
            e.chain_seq: e
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.chain_seq.in_([c.chain_seq for c in covering]))
            )
        }
        for checkpoint in covering:
            checker.check_checkpoint(checkpoint, heads.get(checkpoint.chain_seq), last_chain_seq)
    if finished_at is not None:
        checker.check_finish_signed(finished_at, any(c.chain_seq == finished_at.chain_seq for c in covering))
    return VerifyReport(
        ok=not checker.problems,
        scope=f"run {run_id}",
        records=len(events),
        runs=1,
        checkpoints=len((chain_seqs and covering) or []),
        problems=checker.problems,
        warnings=checker.warnings,
    )


def report_lines(report: VerifyReport) -> list[str]:
    """Return the report as lines for the CLI: a verdict, then one line per problem and warning."""
    verdict = "INTACT" if report.ok else f"BROKEN ({len(report.problems)} problem(s))"
    lines = [
        f"{verdict}: {report.scope}, {report.records} records, {report.runs} run(s), {report.checkpoints} checkpoint(s)"
    ]
    lines += [f"  BROKEN {p.code}: {p.where}: {p.message}" for p in report.problems]
    lines += [f"  warning: {w}" for w in report.warnings]
    return lines
