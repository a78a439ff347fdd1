"""``medagent bench audit``: what the tamper-evident trace costs, measured.

- recording overhead: the same ask flow (bundled fixtures, fast fake models) with the real
  recorder vs a recorder that writes nothing, interleaved, medians compared;
- append throughput on SQLite and PostgreSQL (records/s through the recorder);
- verification throughput over a chain of N records (default 1,000,000), generated in bulk with
  the same hashing code and verified by ``verify_trace``.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy import Engine, insert

from agent.audit.chain import GENESIS_HASH, canonical_json, event_hash, merkle_root, sha256_hex
from agent.audit.db import make_engine, upgrade
from agent.audit.keys import HmacSigner, verifiers_for
from agent.audit.reader import TraceEvent, load_run
from agent.audit.recorder import TraceRecorder, checkpoint_message
from agent.audit.tables import AuditCheckpoint, AuditEvent, AuditRun
from agent.audit.verify import verify_trace
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.domain.imaging import LabelScore
from agent.inference.factory import LoadedModels
from agent.inference.labels import LabelSet
from agent.inference.protocols import GenerationRequest, GenerationResult, GenerationStream, ModelIdentity
from agent.runner import AgentRuntime, ModelCache, run_ask

SIGNER = HmacSigner(b"benchmark-key-0123456789abcdef!!")


class _FastScorer:
    identity = ModelIdentity(model_id="bench-scorer", backend="bench")

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        return [[LabelScore(label=label, score=0.5) for label in labels] for _ in images]

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(images), 8), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        return [[LabelScore(label=name, score=0.5) for name in label_set.names] for _ in range(len(image_embeddings))]


class _FastReasoner:
    identity = ModelIdentity(model_id="bench-reasoner", backend="bench")

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(text="Stable.", prompt_tokens=len(request.user_text) // 4, output_tokens=2, latency_s=0)

    def stream(self, request: GenerationRequest) -> GenerationStream:
        result = self.generate(request)

        def chunks() -> Generator[str, None, GenerationResult]:
            yield result.text
            return result

        return GenerationStream(chunks())


class _NullRecorder(TraceRecorder):
    """Writes nothing: the baseline for the recording overhead."""

    def start_run(self, **_: Any) -> None:
        """Skip the run row."""

    def event(self, *_: Any, **__: Any) -> int:
        """Skip the record."""
        self._seq += 1
        return self._seq


class _BenchRuntime(AgentRuntime):
    null: bool = False

    def new_recorder(self) -> TraceRecorder:
        if self.null:
            return _NullRecorder(self.engine)
        return super().new_recorder()


def _runtime(url: str, *, null: bool) -> _BenchRuntime:
    settings = get_settings(
        fhir={"bundle_dir": DEFAULT_FIXTURES / "fhir"},
        dicom={"dicom_dir": DEFAULT_FIXTURES / "dicom"},
        db={"url": url},
        audit={"hmac_key": "benchmark-key-0123456789abcdef!!"},
    )
    loaded = LoadedModels(scorer=_FastScorer(), reasoner=_FastReasoner(), used_test_models=False)
    runtime = _BenchRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))
    runtime.null = null
    return runtime


def recording_overhead(url: str, patient_id: str, repeats: int) -> dict[str, float]:
    """Return median run seconds with and without recording, and the overhead share."""
    real, null = _runtime(url, null=False), _runtime(url, null=True)
    timings: dict[str, list[float]] = {"real": [], "null": []}

    last_run: list[str] = []

    async def one(runtime: AgentRuntime) -> float:
        started = time.perf_counter()
        result = await run_ask(runtime, patient_id=patient_id, question="Summarise.", trigger="bench")
        last_run.append(result.run_id)
        return time.perf_counter() - started

    async def all_runs() -> None:
        for runtime in (real, null):  # warm-up: imports, schema, caches
            await one(runtime)
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            timings["real"].append(await one(real))
            timings["null"].append(await one(null))

    asyncio.run(all_runs())
    real_s, null_s = statistics.median(timings["real"]), statistics.median(timings["null"])
    events = load_run(real.engine, last_run[-2], include_content=True).events
    return {
        "run_median_s": real_s,
        "run_without_trace_median_s": null_s,
        "share": (real_s - null_s) / real_s,
        "records_per_run": len(events),
        "chain_floor_s": chain_floor(events),
    }


def chain_floor(events: Sequence[TraceEvent], rounds: int = 50) -> float:
    """Return the median seconds needed just to serialise and chain-hash one run's records.

    This is what any tamper-evident record of these events costs in Python before a database
    is involved: each record's metadata and content in canonical JSON (once, and read back as it
    will be stored) and the record hash that commits to its predecessor. It bounds from below
    what recording can cost a run on this machine, whatever the storage does.
    """
    timings: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        prev_hash = GENESIS_HASH
        for event in events:
            meta = json.loads(canonical_json(event.meta))
            content_hash = sha256_hex(canonical_json(event.content)) if event.content is not None else None
            prev_hash = event_hash(
                chain_seq=event.chain_seq,
                prev_hash=prev_hash,
                run_id="bench",
                seq=event.seq,
                kind=event.kind,
                name=event.name,
                at=event.at,
                duration_ms=event.duration_ms,
                status=event.status,
                meta=meta,
                content_hash=content_hash,
            )
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def append_throughput(engine: Engine, records: int) -> float:
    """Return records/s appended through the recorder (one committed, chained record each)."""
    recorder = TraceRecorder(engine, signer=SIGNER)
    recorder.start_run(kind="bench", trigger="bench", patient_ref="Patient/bench", settings_fingerprint="b" * 64)
    meta = {
        "backend": "http",
        "method": "GET",
        "path": "Observation?patient=bench",
        "status": 200,
        "resource_ids": [f"Observation/{i}" for i in range(10)],
    }
    started = time.perf_counter()
    for _ in range(records):
        recorder.event("fhir_request", "GET Observation?patient=bench", status="ok", duration_ms=1.5, meta=meta)
    elapsed = time.perf_counter() - started
    recorder.finish_run("ok")
    return records / elapsed


def build_chain(engine: Engine, records: int, per_run: int = 100) -> None:
    """Insert a valid chain of ``records`` records in bulk (runs of ``per_run``, each finished and signed)."""
    prev = GENESIS_HASH
    chain_seq = 0
    base = datetime(2026, 1, 1, tzinfo=UTC)
    batch: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []

    def flush() -> None:
        with engine.begin() as conn:
            if runs:
                conn.execute(insert(AuditRun), runs)
            if batch:
                conn.execute(insert(AuditEvent), batch)
            if checkpoints:
                conn.execute(insert(AuditCheckpoint), checkpoints)
        runs.clear()
        batch.clear()
        checkpoints.clear()

    fields = {
        "kind": "bench",
        "trigger": "bench",
        "patient_ref": "Patient/bench",
        "user_id": None,
        "user_role": None,
        "purpose_of_use": None,
        "thread_id": None,
        "software_version": "bench",
        "settings_fingerprint": "b",
    }
    while chain_seq < records:
        run_id = str(uuid.uuid4())
        runs.append({"id": run_id, "created_at": base, **fields})
        leaves: list[str] = []
        count = min(per_run, records - chain_seq)
        for seq in range(1, count + 1):
            chain_seq += 1
            at = base + timedelta(microseconds=chain_seq)
            if seq == 1:
                kind, status, meta = "run_started", None, json.loads(canonical_json({"run": fields}))
            elif seq == count:
                kind, status, meta = (
                    "run_finished",
                    "ok",
                    {"merkle_root": merkle_root(leaves), "merkle_leaves": len(leaves)},
                )
            else:
                kind, status, meta = "fhir_request", "ok", {"path": f"Observation?patient=p{seq}", "status": 200}
            digest = event_hash(
                chain_seq=chain_seq,
                prev_hash=prev,
                run_id=run_id,
                seq=seq,
                kind=kind,
                name=kind,
                at=at,
                duration_ms=1.0,
                status=status,
                meta=meta,
                content_hash=None,
            )
            batch.append(
                {
                    "run_id": run_id,
                    "seq": seq,
                    "chain_seq": chain_seq,
                    "prev_hash": prev,
                    "hash": digest,
                    "content_hash": None,
                    "kind": kind,
                    "name": kind,
                    "at": at,
                    "duration_ms": 1.0,
                    "status": status,
                    "meta": meta,
                    "content_id": None,
                }
            )
            leaves.append(digest)
            prev = digest
            if kind == "run_finished":
                checkpoints.append(
                    {
                        "created_at": at,
                        "chain_seq": chain_seq,
                        "head_hash": digest,
                        "algorithm": SIGNER.algorithm,
                        "key_id": SIGNER.key_id,
                        "signature": SIGNER.sign(checkpoint_message(chain_seq, digest)),
                    }
                )
        if len(batch) >= 20_000:
            flush()
    flush()


LOCAL_PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def scratch_postgres(url: str | None) -> Iterator[str | None]:
    """Yield ``url``; without one, a scratch database on the local server (dropped after), or None."""
    if url:
        yield url
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"medagent_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(LOCAL_PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        yield None
        return
    try:
        yield make_url(LOCAL_PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_benchmark(
    *,
    verify_records: int = 1_000_000,
    appends: int = 2000,
    repeats: int = 15,
    pg_url: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every measurement, print a line per figure, and return them."""
    manifest = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
    patient = next(p for p in manifest["patients"] if p["key"] == "cxr")["patient_id"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_url = f"sqlite:///{Path(tmp) / 'runs.db'}"
        overhead = recording_overhead(run_url, patient, repeats)
        echo(
            f"ask run, fake models: {overhead['run_median_s'] * 1000:.1f} ms with trace, "
            f"{overhead['run_without_trace_median_s'] * 1000:.1f} ms without (medians of {repeats}); "
            f"recording overhead {overhead['share'] * 100:.1f}%"
        )
        per_record_us = (
            (overhead["run_median_s"] - overhead["run_without_trace_median_s"]) * 1e6 / overhead["records_per_run"]
        )
        echo(f"  {overhead['records_per_run']} committed, chained records per run: about {per_record_us:.0f} us each")
        floor_share = overhead["chain_floor_s"] / overhead["run_median_s"]
        echo(
            f"  floor: serialising and chain-hashing those records alone, no database, takes "
            f"{overhead['chain_floor_s'] * 1000:.2f} ms per run = {floor_share * 100:.1f}% of the run"
        )
        results["chain_floor_ms"] = round(overhead["chain_floor_s"] * 1000, 3)
        results["chain_floor_share"] = round(floor_share, 4)
        results["recording_overhead_share"] = round(overhead["share"], 4)
        results["run_median_ms"] = round(overhead["run_median_s"] * 1000, 2)
        results["run_without_trace_median_ms"] = round(overhead["run_without_trace_median_s"] * 1000, 2)
        results["records_per_run"] = overhead["records_per_run"]

        sqlite_url = f"sqlite:///{Path(tmp) / 'append.db'}"
        upgrade(sqlite_url)
        engine = make_engine(sqlite_url)
        results["append_per_s_sqlite"] = round(append_throughput(engine, appends))
        engine.dispose()
        echo(f"append, SQLite: {results['append_per_s_sqlite']} records/s ({appends} records)")

        if pg_url:
            upgrade(pg_url)
            engine = make_engine(pg_url)
            results["append_per_s_postgres"] = round(append_throughput(engine, appends))
            engine.dispose()
            echo(f"append, PostgreSQL: {results['append_per_s_postgres']} records/s ({appends} records)")
        else:
            results["append_per_s_postgres"] = None
            echo("append, PostgreSQL: skipped (no --pg-url and no server on 127.0.0.1:5432)")

        verify_url = f"sqlite:///{Path(tmp) / 'verify.db'}"
        upgrade(verify_url)
        engine = make_engine(verify_url)
        started = time.perf_counter()
        build_chain(engine, verify_records)
        echo(f"built a chain of {verify_records} records in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        report = verify_trace(engine, verifiers=verifiers_for(SIGNER))
        elapsed = time.perf_counter() - started
        engine.dispose()
        if not report.ok:
            raise RuntimeError(f"benchmark chain did not verify: {report.problems[:3]}")
        results["verify_per_s"] = round(report.records / elapsed)
        results["verify_records"] = report.records
        echo(f"verify: {report.records} records in {elapsed:.1f} s = {results['verify_per_s']} records/s")
    return results
