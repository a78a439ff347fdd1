"""``medagent patient ...``: look patients up before asking about one.

Where it sits: a typer sub-app that :mod:`agent.cli` registers as ``patient``. ``find`` runs the
same search as the flow's "resolve patient" step (:mod:`agent.sources.patient_resolution`) and
lists every candidate, so a user can pick the id to pass to ``medagent ask --patient``. Data goes
through :func:`agent.sources.factory.make_fhir_source`, like every run.

:mod:`agent.cli` imports this module at its top, so this module imports :mod:`agent.cli` only
inside the command: a top-level import would be circular.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agent.errors import ConfigError, MedagentError, PatientNotFoundError

if TYPE_CHECKING:
    from agent.config import Settings
    from agent.sources.patient_resolution import Candidate, PatientQuery

patient_app = typer.Typer(help="Find patients on the configured FHIR source.", no_args_is_help=True)

# Same flags as agent.cli's FhirOpt/FhirDirOpt/JsonOpt; repeated here because using those would
# need agent.cli at import time (see the module docstring).
_FhirOpt = Annotated[str | None, typer.Option("--fhir", help="FHIR R4 base URL.")]
_FhirDirOpt = Annotated[Path | None, typer.Option("--fhir-dir", help="Folder of FHIR bundles.")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON list of candidates.")]


@patient_app.callback()
def _group() -> None:
    """Find patients on the configured FHIR source."""
    # A callback keeps ``patient`` a command group even while ``find`` is its only command, so
    # ``medagent patient find ...`` works the same whether or not more commands are added.


_COLUMNS = ("ID", "NAME", "BIRTH DATE", "GENDER", "IDENTIFIERS")


def _query(identifier: str | None, name: str | None, birthdate: str | None) -> PatientQuery:
    """Return the query the flags ask for; the flags' rules raise ConfigError (exit 2)."""
    from agent.sources.patient_resolution import PatientQuery

    if (identifier is None) == (name is None):
        raise ConfigError("give exactly one of --identifier or --name")
    if identifier is not None:
        if birthdate is not None:
            raise ConfigError("--birthdate goes with --name, not with --identifier")
        return PatientQuery.by_identifier(identifier)
    if birthdate is None:
        raise ConfigError("--name needs --birthdate YYYY-MM-DD")
    assert name is not None  # checked above; narrows the type for mypy
    return PatientQuery.by_name(name, birthdate)


async def _find(settings: Settings, query: PatientQuery) -> list[Candidate]:
    from agent.domain.events import NullObserver
    from agent.sources.factory import make_fhir_source
    from agent.sources.patient_resolution import find_patients

    # A lookup is not a run: nothing is traced, so the observer keeps nothing.
    fhir = make_fhir_source(settings.fhir, NullObserver())
    try:
        return await find_patients(fhir, query)
    finally:
        await fhir.aclose()


def _table(candidates: list[Candidate]) -> str:
    """Return the candidates as a plain, aligned text table."""
    rows = [
        (c.id, c.name or "-", c.birth_date or "-", c.gender or "-", ", ".join(c.identifiers) or "-") for c in candidates
    ]
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(_COLUMNS)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, *rows]
    ]
    return "\n".join(lines)


@patient_app.command("find")
def find(
    identifier: Annotated[
        str | None, typer.Option("--identifier", help="SYSTEM|VALUE (e.g. an MRN), or a bare VALUE.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help='"Given Family" (or "Family, Given").')] = None,
    birthdate: Annotated[str | None, typer.Option("--birthdate", help="YYYY-MM-DD; required with --name.")] = None,
    fhir: _FhirOpt = None,
    fhir_dir: _FhirDirOpt = None,
    as_json: _JsonOpt = False,
) -> None:
    """List the patients matching an identifier, or a name and birth date; exit 3 when none."""
    from agent.cli import _fail, _settings

    try:
        query = _query(identifier, name, birthdate)
        settings = _settings(fhir=fhir, fhir_dir=fhir_dir)
        candidates = asyncio.run(_find(settings, query))
        if not candidates:
            raise PatientNotFoundError(f"no patient found with {query.describe()}")
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(json.dumps([c.model_dump(mode="json") for c in candidates]))
        return
    typer.echo(_table(candidates))
    typer.echo(f"\n{len(candidates)} patient(s) found. Ask about one with: medagent ask --patient ID ...")
