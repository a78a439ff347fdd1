"""What every ``medagent`` command shares: settings from flags over env, and one way to fail.

Each command group (ask/demo, classify, index, eval) lays its flags over the settings from the
environment and ``.env`` the same way, and reports a :class:`~agent.errors.MedagentError` the
same way (one ``error [code]: message`` line or a JSON object, then the error's exit code), so
scripts can rely on both whichever command they call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer

from agent.config import Settings, get_settings
from agent.errors import ConfigError, MedagentError


def source_groups(
    *,
    fhir: str | None = None,
    fhir_dir: Path | None = None,
    dicomweb: str | None = None,
    dicom_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Return the ``fhir`` and ``dicom`` groups the source flags ask for: a server URL or a folder.

    Raises:
        ConfigError: both a server and a folder were given for the same kind of source.
    """
    if fhir and fhir_dir:
        raise ConfigError("give either --fhir or --fhir-dir, not both")
    if dicomweb and dicom_dir:
        raise ConfigError("give either --dicomweb or --dicom-dir, not both")
    groups: dict[str, dict[str, Any]] = {}
    if fhir:
        groups["fhir"] = {"base_url": fhir}
    elif fhir_dir:
        groups["fhir"] = {"bundle_dir": fhir_dir, "base_url": None}
    if dicomweb:
        groups["dicom"] = {"dicomweb_url": dicomweb}
    elif dicom_dir:
        groups["dicom"] = {"dicom_dir": dicom_dir, "dicomweb_url": None}
    return groups


def settings_with(groups: dict[str, dict[str, Any]]) -> Settings:
    """Return the settings from env/.env with the command line's values laid over, group by group.

    Unlike :func:`~agent.config.get_settings` overrides, a ``None`` here is kept: a folder flag
    must unset a server URL configured in the environment.

    Raises:
        ConfigError: the result is invalid.
    """
    merged = get_settings().model_dump()
    for group, values in groups.items():
        merged.setdefault(group, {}).update(values)
    try:
        return Settings.model_validate(merged)
    except Exception as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


def fail(exc: MedagentError, *, as_json: bool) -> NoReturn:
    """Report an error (with the run id when a run was started) and exit with its exit code."""
    run_id = exc.details.get("run_id")
    if as_json:
        typer.echo(json.dumps({"status": "failed", "run_id": run_id, "error": exc.to_dict()}))
    else:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        if run_id:
            typer.echo(f"run id: {run_id}   (see: medagent audit show {run_id})", err=True)
    raise typer.Exit(exc.exit_code)
