"""``medagent worker``: run triggered-summary jobs until SIGINT or SIGTERM.

Where it sits: a command :mod:`agent.cli` registers as ``worker``. With ``jobs.backend = "saq"``
the API only enqueues jobs on Redis and one or more of these processes run them; with the
in-process backend the API runs jobs itself, and this command is an extra worker over the same
SQL table (useful to run jobs while no API is up). Either way the SQL jobs table is the source
of truth: on a signal the worker stops its running attempts and hands their jobs back, and a
worker killed outright leaves leases that another worker takes back once they expire.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from agent.cli_support import fail, settings_with, source_groups
from agent.errors import ConfigError, MedagentError

_BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="inprocess (poll the SQL table) or saq (Redis); default: settings.")
]
_ConcurrencyOpt = Annotated[int | None, typer.Option("--concurrency", help="Jobs run at once (default: settings).")]
_LeaseOpt = Annotated[
    float, typer.Option("--lease-s", help="Seconds a job stays claimed without a heartbeat before others take it.")
]
_FhirOpt = Annotated[str | None, typer.Option("--fhir", help="FHIR R4 base URL.")]
_FhirDirOpt = Annotated[Path | None, typer.Option("--fhir-dir", help="Folder of FHIR bundles.")]
_DicomWebOpt = Annotated[str | None, typer.Option("--dicomweb", help="DICOMweb root URL.")]
_DicomDirOpt = Annotated[Path | None, typer.Option("--dicom-dir", help="Folder of DICOM files.")]
_DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (SQLAlchemy) holding the jobs and traces.")]
_TestModelsOpt = Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")]


def worker_command(
    backend: _BackendOpt = None,
    concurrency: _ConcurrencyOpt = None,
    lease_s: _LeaseOpt = 30.0,
    fhir: _FhirOpt = None,
    fhir_dir: _FhirDirOpt = None,
    dicomweb: _DicomWebOpt = None,
    dicom_dir: _DicomDirOpt = None,
    db: _DbOpt = None,
    test_models: _TestModelsOpt = False,
) -> None:
    """Run summary jobs from the configured queue until SIGINT or SIGTERM."""
    from agent.runtime import AgentRuntime

    try:
        groups: dict[str, dict[str, Any]] = source_groups(
            fhir=fhir, fhir_dir=fhir_dir, dicomweb=dicomweb, dicom_dir=dicom_dir
        )
        jobs: dict[str, Any] = {}
        if backend is not None:
            jobs["backend"] = _backend(backend)
        if concurrency is not None:
            jobs["concurrency"] = concurrency
        groups["jobs"] = jobs
        if db:
            groups["db"] = {"url": db}
        if test_models:
            groups["models"] = {"use_test_models": True}
        settings = settings_with(groups)
        if lease_s <= 0:
            raise ConfigError("--lease-s must be positive")
    except MedagentError as exc:
        fail(exc, as_json=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime = AgentRuntime(settings=settings)
    typer.echo(f"medagent worker: backend {settings.jobs.backend}, concurrency {settings.jobs.concurrency}", err=True)
    try:
        asyncio.run(_run(runtime, lease_s))
    except MedagentError as exc:
        fail(exc, as_json=False)
    typer.echo("medagent worker: stopped", err=True)


def _backend(value: str) -> Literal["inprocess", "saq"]:
    if value == "inprocess":
        return "inprocess"
    if value == "saq":
        return "saq"
    raise ConfigError(f"--backend must be inprocess or saq, not {value!r}")


async def _run(runtime: Any, lease_s: float) -> None:
    """Run the worker until a signal sets the stop event."""
    from agent.jobs.lifecycle import run_worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await run_worker(runtime, stop, lease_s=lease_s)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
