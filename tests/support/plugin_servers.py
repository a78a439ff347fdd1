"""Pytest plugin: one live FHIR engine and one Orthanc per test session, loaded with fixtures/.

Where it sits: ``tests/conftest.py`` loads this plugin; tests that ask for ``fhir_server`` or
``orthanc`` get real servers on 127.0.0.1 (started by :mod:`tests.support.servers`) and are
marked ``servers`` automatically, so ``-m "not servers"`` leaves them out.

When node or Orthanc is not installed, the tests that need them are skipped with a loud reason;
with ``CI`` set in the environment they fail instead, so CI can never pass by skipping them.
A server that is installed but fails to start always fails, with the tail of its log.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.support.servers import (
    REPO_ROOT,
    FhirServerHandle,
    OrthancHandle,
    ServerError,
    ServerToolMissingError,
    fixture_dicom_files,
    fixture_fhir_files,
    load_fhir_bundles,
    start_fhir_server,
    start_orthanc,
    stow_dicom,
)

FIXTURES_DIR = REPO_ROOT / "fixtures"


def skip_or_fail_missing(what: str, exc: ServerToolMissingError) -> NoReturn:
    """Skip the test loudly (outside CI) or fail it (CI set) because a tool is not installed."""
    message = f"{what} cannot run: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must not skip live-server tests", pytrace=False)
    pytest.skip(f"SKIPPING LIVE {what.upper()} TESTS: {message}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a live server with ``servers``."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "fhir_server" in names or "orthanc" in names:
            item.add_marker(pytest.mark.servers)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServerHandle]:
    """Yield the session's test FHIR server, loaded with every bundle in fixtures/fhir."""
    workdir = tmp_path_factory.mktemp("fhir-server")
    try:
        handle = start_fhir_server(workdir)
    except ServerToolMissingError as exc:
        skip_or_fail_missing("FHIR server", exc)
    except ServerError as exc:
        pytest.fail(f"the test FHIR server did not start (logs in {workdir}):\n{exc}", pytrace=False)
    try:
        load_fhir_bundles(handle.base_url, fixture_fhir_files(FIXTURES_DIR))
    except ServerError as exc:
        handle.stop()
        pytest.fail(f"loading fixtures/fhir failed:\n{exc}\n--- server log ---\n{handle.log_tail()}", pytrace=False)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancHandle]:
    """Yield the session's Orthanc (auth on), loaded with every ``*.dcm`` under fixtures/dicom."""
    workdir = tmp_path_factory.mktemp("orthanc")
    # A fresh password per session: nothing guessable listens, even on loopback.
    password = secrets.token_urlsafe(16)
    try:
        handle = start_orthanc(workdir, "medagent", password)
    except ServerToolMissingError as exc:
        skip_or_fail_missing("Orthanc", exc)
    except ServerError as exc:
        pytest.fail(f"Orthanc did not start (logs in {workdir}):\n{exc}", pytrace=False)
    try:
        stow_dicom(handle.dicomweb_url, handle.auth, fixture_dicom_files(FIXTURES_DIR))
    except ServerError as exc:
        handle.stop()
        pytest.fail(f"loading fixtures/dicom failed:\n{exc}\n--- Orthanc log ---\n{handle.log_tail()}", pytrace=False)
    try:
        yield handle
    finally:
        handle.stop()
