"""``medagent patient find`` through typer's CliRunner, over the live FHIR engine and the bundle folder.

The sub-app is mounted under ``patient`` on a throwaway root app, as :mod:`agent.cli` mounts it,
so the command line tested here is the one users type.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from agent.cli_patient import patient_app
from agent.config import DEFAULT_FIXTURES
from tests.sources.test_patient_resolution import CXR, CXR_MRN, TWIN_BIRTHDATE, LookAlikes, make_look_alikes
from tests.support.servers import FhirServerHandle, free_port, load_fhir_bundles

root_app = typer.Typer()
root_app.add_typer(patient_app, name="patient")

FIXTURE_FHIR = str(DEFAULT_FIXTURES / "fhir")


def find(*args: str) -> Result:
    """Run ``medagent patient find ARGS`` in-process."""
    return CliRunner().invoke(root_app, ["patient", "find", *args])


@pytest.fixture(params=[pytest.param("http", marks=pytest.mark.servers), "bundle-dir"])
def source_flags(request: pytest.FixtureRequest) -> list[str]:
    """Return the flags pointing ``find`` at each FHIR source holding the fixtures."""
    if request.param == "http":
        server: FhirServerHandle = request.getfixturevalue("fhir_server")
        return ["--fhir", server.base_url]
    return ["--fhir-dir", FIXTURE_FHIR]


def test_find_by_identifier_prints_a_table(source_flags: list[str]) -> None:
    result = find("--identifier", CXR_MRN, *source_flags)
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == ["ID", "NAME", "BIRTH", "DATE", "GENDER", "IDENTIFIERS"]
    assert row.split() == [CXR["patient_id"], *CXR["name"].split(), CXR["birth_date"], CXR["gender"], CXR_MRN]
    assert "1 patient(s) found" in result.stdout


def test_find_by_name_prints_json(source_flags: list[str]) -> None:
    result = find("--name", CXR["name"], "--birthdate", CXR["birth_date"], "--json", *source_flags)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {
            "id": CXR["patient_id"],
            "name": CXR["name"],
            "birth_date": CXR["birth_date"],
            "gender": CXR["gender"],
            "identifiers": [CXR_MRN],
        }
    ]


def test_find_none_exits_3(source_flags: list[str]) -> None:
    result = find("--identifier", f"{CXR['mrn_system']}|MRN-NOPE", *source_flags)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert f"error [patient_not_found]: no patient found with identifier {CXR['mrn_system']}|MRN-NOPE" in (
        result.stderr
    )


def test_find_none_with_json_prints_the_error_object(source_flags: list[str]) -> None:
    result = find("--name", "Nobody Quill", "--birthdate", CXR["birth_date"], "--json", *source_flags)
    assert result.exit_code == 3
    payload = json.loads(result.stdout)
    assert payload["status"] == "failed"
    assert payload["error"]["code"] == "patient_not_found"


@pytest.mark.servers
def test_find_lists_every_look_alike_from_the_server(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    look_alikes: LookAlikes = make_look_alikes(tmp_path)
    load_fhir_bundles(fhir_server.base_url, [look_alikes.bundle])
    result = find("--name", look_alikes.family, "--birthdate", TWIN_BIRTHDATE, "--json", "--fhir", fhir_server.base_url)
    assert result.exit_code == 0, result.output
    ids = sorted(c["id"] for c in json.loads(result.stdout))
    assert ids == sorted([*look_alikes.twin_ids, look_alikes.near_id])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --identifier or --name"),
        (["--identifier", CXR_MRN, "--name", "Arthur Quill"], "give exactly one of --identifier or --name"),
        (["--name", "Arthur Quill"], "--name needs --birthdate"),
        (["--identifier", CXR_MRN, "--birthdate", "1959-03-11"], "--birthdate goes with --name"),
        (["--name", "Arthur Quill", "--birthdate", "11/03/1959"], "YYYY-MM-DD"),
        (["--identifier", "a,b"], "FHIR search would misread"),
        (["--identifier", CXR_MRN, "--fhir", "http://127.0.0.1:9", "--fhir-dir", FIXTURE_FHIR], "not both"),
    ],
)
def test_find_refuses_bad_flags_with_exit_2(args: list[str], message: str) -> None:
    result = find(*args)
    assert result.exit_code == 2
    # the values the user typed are refused as input; flag combinations as usage (config)
    assert re.search(r"error \[(invalid_patient_query|config_invalid)\]", result.stderr)
    assert message in result.stderr


def test_find_unreachable_server_exits_4() -> None:
    # A port just found free: nothing listens there, so the connection is refused.
    result = find("--identifier", CXR_MRN, "--fhir", f"http://127.0.0.1:{free_port()}/fhir")
    assert result.exit_code == 4
    assert "error [source_unavailable]" in result.stderr
