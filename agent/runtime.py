"""What one process keeps between runs: the trace engine, the trace's keys, and loaded models.

Kept apart from the graph and the model code so that audit commands (list, show, verify) start
without importing torch or LangGraph.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from agent.audit.db import ensure_schema, make_engine
from agent.audit.keys import CheckpointSigner, ContentCipher, signer_from_settings
from agent.audit.recorder import TraceRecorder
from agent.audit.recovery import mark_interrupted_runs
from agent.config import Settings
from agent.errors import MedagentError

if TYPE_CHECKING:
    from agent.inference.factory import LoadedModels

log = logging.getLogger(__name__)

ModelLoader = Callable[[Settings], "LoadedModels"]


def _default_loader(settings: Settings) -> LoadedModels:
    from agent.inference.factory import load_models  # torch and transformers load here, on first use

    return load_models(settings.models)


@dataclass
class ModelCache:
    """Loaded models kept for the life of a process (the service loads them once, not per request)."""

    loader: ModelLoader = _default_loader
    _loaded: dict[str, LoadedModels] = field(default_factory=dict)

    def is_loaded(self, settings: Settings) -> bool:
        """Return whether the models for these settings are loaded already."""
        return settings.models.model_dump_json() in self._loaded

    def get(self, settings: Settings) -> tuple[LoadedModels, bool]:
        """Return the models for these settings and whether they were loaded just now."""
        key = settings.models.model_dump_json()
        if key in self._loaded:
            return self._loaded[key], False
        loaded = self.loader(settings)
        self._loaded[key] = loaded
        return loaded, True


@dataclass
class ImagingExtras:
    """The optional finding sources beyond zero-shot labels."""

    classifier: Any | None = None
    index: Any | None = None
    index_problem: str | None = None


def load_imaging_extras(settings: Settings) -> ImagingExtras:
    """Load the configured linear probe and open the similar-case index (when similar cases are wanted)."""
    extras = ImagingExtras()
    imaging = settings.imaging
    if imaging.classifier_path is not None:
        from agent.inference.classifier import LinearProbe

        extras.classifier = LinearProbe.load(imaging.classifier_path)
    if imaging.similar_cases > 0:
        from agent.retrieval.factory import open_index

        try:
            extras.index = open_index(imaging, create=False)
        except MedagentError as exc:
            extras.index_problem = f"{exc.code}: {exc}"
    return extras


@dataclass
class AgentRuntime:
    """What a process keeps between runs: the trace engine, trace keys and loaded models."""

    settings: Settings
    models: ModelCache = field(default_factory=ModelCache)
    _engine: Engine | None = None
    _schema_checked: bool = False
    #: held while the schema is checked or migrated: API requests and the job worker start together
    _schema_lock: threading.Lock = field(default_factory=threading.Lock)
    #: per event loop (tests run several): how many runs may record at once
    _run_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _signer: CheckpointSigner | None = None
    _cipher: ContentCipher | None = None
    #: the compiled ask graph (stateless: compiled once per process, not per run)
    graph: Any = None
    #: FHIR server capabilities by source, discovered once per process (``/metadata`` rarely changes)
    fhir_capabilities: dict[str, Any] = field(default_factory=dict)
    #: the imaging extras (classifier, similar-case index) by the imaging settings they came from
    _imaging: dict[str, ImagingExtras] = field(default_factory=dict)

    def imaging_extras(self, settings: Settings) -> ImagingExtras:
        """Return the configured classifier and similar-case index, loaded once per process.

        A configured classifier that cannot be loaded raises (the user asked for it); a missing
        or unreadable index only leaves a reason, since similar cases are optional context.

        Raises:
            ConfigError: the classifier file is missing or invalid.
        """
        key = settings.imaging.model_dump_json()
        if key not in self._imaging:
            self._imaging[key] = load_imaging_extras(settings)
        return self._imaging[key]

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
            # headroom beyond the runs: readiness checks, API reads and short audited views
            pool_size = self.settings.db.max_concurrent_runs + 4
            self._engine = make_engine(self.settings.db.url.get_secret_value(), pool_size=pool_size)
        return self._engine

    @asynccontextmanager
    async def run_slot(self) -> AsyncIterator[None]:
        """Wait (without blocking the event loop) for one of ``db.max_concurrent_runs`` slots.

        A run holds a pooled trace connection from start to end; unbounded, the run past the pool's
        size would block the event loop in the pool's checkout while the runs holding connections
        wait for that loop: every stream stalls. Waiting here instead queues runs fairly.
        """
        loop = asyncio.get_running_loop()
        slots = self._run_slots.get(loop)
        if slots is None:
            slots = self._run_slots[loop] = asyncio.Semaphore(self.settings.db.max_concurrent_runs)
        async with slots:
            yield

    def ensure_schema(self) -> None:
        """Check (and in dev, apply) migrations once per process, then close runs of dead processes."""
        if self._schema_checked:
            return
        with self._schema_lock:
            if self._schema_checked:
                return
            ensure_schema(self.engine, auto_migrate=self.settings.db.auto_migrate)
            interrupted = mark_interrupted_runs(self.engine, **self.recorder_options())
            if interrupted:
                log.warning("marked %d run(s) of ended processes as interrupted", len(interrupted))
            self._schema_checked = True
