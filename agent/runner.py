"""Run one ``ask`` end to end: open the trace, load models, build sources, run the graph.

This is the single entry point the CLI, the demo and the API share. The trace is opened first
and fails closed: if it cannot be written, nothing is read from any source. Whatever happens
afterwards, the run ends with a ``run_finished`` record (ok, failed or cancelled) naming the
failing step and error code, and the error is re-raised for the caller to map (exit code, HTTP
status) with ``details["run_id"]`` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from agent.audit.db import ensure_schema, make_engine
from agent.audit.keys import CheckpointSigner, ContentCipher, signer_from_settings
from agent.audit.recorder import MODEL_LOAD, TraceRecorder, settings_fingerprint
from agent.audit.recovery import mark_interrupted_runs
from agent.config import Settings
from agent.domain.answer import AskResult
from agent.errors import InternalError, MedagentError, RunCancelledError
from agent.graph.builder import build_ask_graph
from agent.graph.state import RunContext
from agent.inference.factory import LoadedModels, load_models
from agent.inference.labels import LABEL_SETS_BY_MODALITY
from agent.sources.factory import make_dicom_source, make_fhir_source

log = logging.getLogger(__name__)

ModelLoader = Callable[[Settings], LoadedModels]


def _default_loader(settings: Settings) -> LoadedModels:
    return load_models(settings.models)


@dataclass
class ModelCache:
    """Loaded models kept for the life of a process (the service loads them once, not per request)."""

    loader: ModelLoader = _default_loader
    _loaded: dict[str, LoadedModels] = field(default_factory=dict)

    def get(self, settings: Settings) -> tuple[LoadedModels, bool]:
        """Return the models for these settings and whether they were loaded just now."""
        key = settings.models.model_dump_json()
        if key in self._loaded:
            return self._loaded[key], False
        loaded = self.loader(settings)
        self._loaded[key] = loaded
        return loaded, True


@dataclass
class AgentRuntime:
    """What a process keeps between runs: the trace engine, trace keys and loaded models."""

    settings: Settings
    models: ModelCache = field(default_factory=ModelCache)
    _engine: Engine | None = None
    _schema_checked: bool = False
    _signer: CheckpointSigner | None = None
    _cipher: ContentCipher | None = None

    @property
    def signer(self) -> CheckpointSigner:
        """Return the checkpoint signer the settings describe."""
        if self._signer is None:
            audit = self.settings.audit
            self._signer = signer_from_settings(
                audit.hmac_key.get_secret_value() if audit.hmac_key else None,
                audit.ed25519_private_key_file,
                audit.ed25519_public_key_file,
            )
        return self._signer

    @property
    def cipher(self) -> ContentCipher | None:
        """Return the content cipher, when a content key is configured."""
        key = self.settings.audit.content_key
        if self._cipher is None and key is not None:
            self._cipher = ContentCipher(key.get_secret_value())
        return self._cipher

    def recorder_options(self) -> dict[str, Any]:
        """Return the keyword arguments every TraceRecorder of this process gets."""
        return {
            "signer": self.signer,
            "cipher": self.cipher,
            "checkpoint_every": self.settings.audit.checkpoint_every,
        }

    def new_recorder(self) -> TraceRecorder:
        """Return a recorder for a new run."""
        return TraceRecorder(self.engine, **self.recorder_options())

    @property
    def engine(self) -> Engine:
        """Return the trace database engine (created on first use)."""
        if self._engine is None:
            self._engine = make_engine(self.settings.db.url.get_secret_value())
        return self._engine

    def ensure_schema(self) -> None:
        """Check (and in dev, apply) migrations once per process, then close runs of dead processes."""
        if not self._schema_checked:
            ensure_schema(self.engine, auto_migrate=self.settings.db.auto_migrate)
            interrupted = mark_interrupted_runs(self.engine, **self.recorder_options())
            if interrupted:
                log.warning("marked %d run(s) of ended processes as interrupted", len(interrupted))
            self._schema_checked = True


async def run_ask(
    runtime: AgentRuntime,
    *,
    patient_id: str,
    question: str,
    trigger: str = "cli",
    user_id: str | None = None,
    user_role: str | None = None,
    purpose_of_use: str | None = None,
    thread_id: str | None = None,
    as_of: datetime | None = None,
) -> AskResult:
    """Answer a question about a patient, recording every step.

    Raises:
        MedagentError: any failure, after it has been recorded; ``details["run_id"]`` names the run
            (absent only when the trace itself could not be opened).
    """
    settings = runtime.settings
    runtime.ensure_schema()
    recorder = runtime.new_recorder()
    recorder.start_run(
        kind="ask",
        trigger=trigger,
        patient_ref=f"Patient/{patient_id}",
        settings_fingerprint=settings_fingerprint(settings.masked()),
        user_id=user_id,
        user_role=user_role,
        purpose_of_use=purpose_of_use,
        thread_id=thread_id,
        request={"question": question, "patient_id": patient_id},
    )
    fhir = make_fhir_source(settings.fhir, recorder)
    dicom = make_dicom_source(settings.dicom, recorder)
    try:
        loaded = _load_models(runtime, recorder)
        context = RunContext(
            fhir=fhir,
            dicom=dicom,
            scorer=loaded.scorer,
            reasoner=loaded.reasoner,
            recorder=recorder,
            settings=settings,
            label_sets=LABEL_SETS_BY_MODALITY,
            as_of=as_of,
        )
        state = await build_ask_graph().ainvoke({"patient_id": patient_id, "question": question}, context=context)
        recorder.current_node = None
        recorder.finish_run("ok")
        return AskResult(
            run_id=recorder.run_id,
            status="ok",
            answer=state.get("answer", ""),
            sources=state.get("sources", []),
            citations=state.get("citations", []),
            findings=[f.model_dump(mode="json") for f in state.get("findings", [])],
            models={"reasoner": loaded.reasoner.identity.model_id, "scorer": loaded.scorer.identity.model_id},
            test_models=loaded.used_test_models,
            warnings=[f"image skipped: {e['message']}" for e in state.get("image_errors", [])],
        )
    except MedagentError as exc:
        _finish_failed(recorder, exc)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        _finish_failed(recorder, RunCancelledError("the run was cancelled"))
        raise
    except Exception as exc:
        log.exception("internal error in run %s", recorder.run_id)
        error = InternalError(f"internal error ({type(exc).__name__}); see the service log")
        _finish_failed(recorder, error)
        raise error from exc
    finally:
        await fhir.aclose()
        await dicom.aclose()


def _finish_failed(recorder: TraceRecorder, error: MedagentError) -> None:
    error.details.setdefault("run_id", recorder.run_id)
    if recorder.finished_status is None:
        recorder.finish_run("cancelled" if isinstance(error, RunCancelledError) else "failed", error=error)


def _load_models(runtime: AgentRuntime, recorder: TraceRecorder) -> LoadedModels:
    """Load (or reuse) the models inside a traced step so a missing checkpoint is recorded."""
    with recorder.node("load_models"):
        started = time.perf_counter()
        loaded, fresh = runtime.models.get(runtime.settings)
        elapsed = (time.perf_counter() - started) * 1000
        for role, model in (("scorer", loaded.scorer), ("reasoner", loaded.reasoner)):
            recorder.event(
                MODEL_LOAD,
                role,
                status="ok",
                duration_ms=elapsed if fresh else 0.0,
                meta={**model.identity.model_dump(), "cached": not fresh},
            )
        return loaded
