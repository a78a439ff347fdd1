"""Real Synthea R4 records through the live FHIR engine and through a bundle folder: the same record, the same run.

Where it sits: issue 13 ("real records"), point 5. The shared Synthea bundles
(``../shared/data/synthea-r4``, read in place) are transactions of ``POST`` entries linked by
``urn:uuid:`` references. ``load_fhir_bundles`` (tests/support/servers.py) stores them in the test
FHIR engine under their own ids; the bundle folder source (agent/sources/fhir_bundle_dir.py) reads
the same files through a folder of symlinks. Here both must hold the same resources for every
history type the agent reads, and ``run_ask`` (and ``medagent ask``) must put the same sources and
the same context text in front of the model whichever of the two it reads.

The records are chosen by what they hold, never by name: the smallest bundle with an
ImagingStudy, the smallest bundle of all, and the largest (to time loading). The engine is this
module's own: the session's engine is compared with ``fixtures/fhir`` by other tests, which must
not see these patients.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.audit.reader import load_run
from agent.config import get_settings
from agent.domain.answer import AskResult
from agent.domain.events import NullObserver
from agent.graph.state import HISTORY_TYPES
from agent.runner import AgentRuntime, run_ask
from agent.sources.fhir_bundle_dir import BundleDirFhirSource
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.protocols import FhirSource
from tests.e2e.cli import json_out, run_cli
from tests.support.plugin_servers import skip_or_fail_missing
from tests.support.servers import (
    REPO_ROOT,
    FhirServerHandle,
    ServerError,
    ServerToolMissingError,
    load_fhir_bundles,
    start_fhir_server,
)
from tests.support.shared_data import SYNTHEA_DIR, synthea_dir_or_skip

pytestmark = pytest.mark.servers


#: Every type the agent reads per patient, by ``Type?patient=``.
PATIENT_TYPES = HISTORY_TYPES
#: The R4 element that points at the patient, where it is not ``subject``.
PATIENT_FIELD = {
    "AllergyIntolerance": "patient",
    "Device": "patient",
    "FamilyMemberHistory": "patient",
    "Immunization": "patient",
}

#: A lab value, medications, allergies, vaccines: the kinds of question the parity is checked on.
QUESTIONS = (
    "What is the most recent hemoglobin A1c result?",
    "What medications is the patient currently taking?",
    "Does the patient have any allergies?",
    "Which vaccines has the patient received?",
)
#: One reference date for both sides, so relative ages in the context text agree.
AS_OF = datetime(2021, 1, 1, tzinfo=UTC)
#: Loading a few MB should take seconds; this only catches a fall back to minutes on a busy machine.
LOAD_LIMIT_S = 60.0

_RESOURCE_TYPE = re.compile(rb'"resourceType"\s*:\s*"ImagingStudy"')


@dataclass
class RealRecord:
    """One Synthea bundle: its file, its patient and the ids it holds per resource type."""

    path: Path
    patient_id: str
    ids: dict[str, set[str]] = field(default_factory=dict)
    load_s: float = 0.0


@dataclass
class RealRecords:
    """The chosen records, loaded into this module's engine and linked into a folder."""

    by_role: dict[str, RealRecord]
    server: FhirServerHandle
    folder: Path


def _read_record(path: Path) -> RealRecord:
    bundle = json.loads(path.read_text(encoding="utf-8"))
    ids: dict[str, set[str]] = {}
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        ids.setdefault(resource.get("resourceType", ""), set()).add(resource.get("id", ""))
    (patient_id,) = ids["Patient"]
    return RealRecord(path=path, patient_id=patient_id, ids=ids)


def choose_records(folder: Path) -> dict[str, Path]:
    """Pick the bundles by content: the smallest with an ImagingStudy, the smallest, the largest.

    Raises:
        LookupError: the folder holds no bundle with an ImagingStudy.
    """
    files = sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_size, p.name))
    # A byte scan is enough to know whether a study is there; only the chosen files are parsed.
    with_imaging = next((p for p in files if _RESOURCE_TYPE.search(p.read_bytes())), None)
    if with_imaging is None:
        raise LookupError(f"no bundle in {folder} holds an ImagingStudy")
    return {"imaging": with_imaging, "small": files[0], "large": files[-1]}


@pytest.fixture(scope="module")
def real_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealRecords]:
    """Load the chosen Synthea bundles into a FHIR engine of this module's own and link them into a folder."""
    synthea_dir_or_skip()
    chosen = {role: _read_record(path) for role, path in choose_records(SYNTHEA_DIR).items()}
    folder = tmp_path_factory.mktemp("synthea-folder")
    for record in {r.path: r for r in chosen.values()}.values():
        (folder / record.path.name).symlink_to(record.path)

    workdir = tmp_path_factory.mktemp("synthea-fhir-server")
    try:
        server = start_fhir_server(workdir)
    except ServerToolMissingError as exc:
        skip_or_fail_missing("FHIR server", exc)
    except ServerError as exc:
        pytest.fail(f"the test FHIR server did not start (logs in {workdir}):\n{exc}", pytrace=False)
    try:
        for record in chosen.values():
            started = time.perf_counter()
            load_fhir_bundles(server.base_url, [record.path])
            record.load_s = time.perf_counter() - started
        yield RealRecords(by_role=chosen, server=server, folder=folder)
    finally:
        server.stop()


def _sources(records: RealRecords) -> dict[str, FhirSource]:
    observer = NullObserver()
    return {
        "http": HttpFhirSource(records.server.base_url, observer=observer),
        "bundle-dir": BundleDirFhirSource(records.folder, observer=observer),
    }


def test_real_bundles_load_in_seconds(real_records: RealRecords) -> None:
    for role, record in real_records.by_role.items():
        size_mb = record.path.stat().st_size / 1e6
        assert record.load_s < LOAD_LIMIT_S, f"{role} ({size_mb:.1f} MB) took {record.load_s:.1f} s to load"


@pytest.mark.parametrize("role", ["imaging", "small", "large"])
async def test_engine_and_folder_hold_the_same_resources_under_the_bundle_ids(
    real_records: RealRecords, role: str
) -> None:
    record = real_records.by_role[role]
    sources = _sources(real_records)
    try:
        for name, source in sources.items():
            patient = await source.read("Patient", record.patient_id)
            assert patient["id"] == record.patient_id, name
        for kind in PATIENT_TYPES:
            found = {
                name: {r["id"] for r in await source.search(kind, {"patient": record.patient_id})}
                for name, source in sources.items()
            }
            expected = record.ids.get(kind, set())
            assert found == {"http": expected, "bundle-dir": expected}, kind
    finally:
        for source in sources.values():
            await source.aclose()


def test_load_fixtures_tool_loads_any_folder_of_bundles(real_records: RealRecords, tmp_path: Path) -> None:
    tool = [sys.executable, str(REPO_ROOT / "tools" / "load_fixtures.py"), "--fhir", real_records.server.base_url]
    # The folder again: the same ids are updated in place, so nothing is duplicated.
    loaded = subprocess.run([*tool, "--bundles", str(real_records.folder)], capture_output=True, text=True, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert f"from {len(list(real_records.folder.glob('*.json')))} bundle(s) loaded" in loaded.stdout
    record = real_records.by_role["small"]
    with httpx.Client(base_url=real_records.server.base_url + "/", timeout=30) as client:
        found = client.get("Immunization", params={"patient": record.patient_id, "_count": "1000"}).json()
    assert found["total"] == len(record.ids.get("Immunization", set()))

    missing = subprocess.run(
        [*tool, "--bundles", str(tmp_path / "no-such-folder")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr


def _one_of_each_type(patient_id: str, other_id: str) -> dict[str, Any]:
    """Return a Synthea-form transaction: two patients, and one resource of each type per patient."""
    entries: list[dict[str, Any]] = []
    for pid in (patient_id, other_id):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{pid}",
                "resource": {"resourceType": "Patient", "id": pid},
                "request": {"method": "POST", "url": "Patient"},
            }
        )
        for kind in PATIENT_TYPES:
            rid = f"{kind.lower()}-{pid[:8]}"
            resource = {
                "resourceType": kind,
                "id": rid,
                PATIENT_FIELD.get(kind, "subject"): {"reference": f"urn:uuid:{pid}"},
            }
            entries.append(
                {"fullUrl": f"urn:uuid:{rid}", "resource": resource, "request": {"method": "POST", "url": kind}}
            )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def test_every_history_type_is_searchable_by_patient_in_both_sources(
    real_records: RealRecords, tmp_path: Path
) -> None:
    # Types the Synthea files lack (Device, FamilyMemberHistory, ServiceRequest, DocumentReference)
    # are covered here, each pointing at its patient through its own R4 element.
    patient_id, other_id = "aaaaaaaa-0000-4000-8000-000000000013", "bbbbbbbb-0000-4000-8000-000000000013"
    path = tmp_path / "one-of-each" / "bundle.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_one_of_each_type(patient_id, other_id)))
    load_fhir_bundles(real_records.server.base_url, [path])
    observer = NullObserver()
    sources: dict[str, FhirSource] = {
        "http": HttpFhirSource(real_records.server.base_url, observer=observer),
        "bundle-dir": BundleDirFhirSource(path.parent, observer=observer),
    }
    try:
        for kind in PATIENT_TYPES:
            expected = [f"{kind.lower()}-{patient_id[:8]}"]
            for name, source in sources.items():
                for value in (patient_id, f"Patient/{patient_id}"):
                    found = [r["id"] for r in await source.search(kind, {"patient": value})]
                    assert found == expected, (name, kind, value)
    finally:
        for source in sources.values():
            await source.aclose()


def _runtime(fhir: dict[str, Any], tmp_path: Path, test_models_dir: Path, name: str) -> AgentRuntime:
    settings = get_settings(
        fhir=fhir,
        db={"url": f"sqlite:///{tmp_path / f'{name}.db'}"},
        models={"use_test_models": True, "test_models_dir": test_models_dir, "device": "cpu"},
    )
    return AgentRuntime(settings=settings)


async def _ask(runtime: AgentRuntime, patient_id: str, question: str) -> tuple[AskResult, str]:
    result = await run_ask(runtime, patient_id=patient_id, question=question, as_of=AS_OF)
    trace = load_run(runtime.engine, result.run_id, include_content=True)
    context = next(e for e in trace.events if e.name == "context")
    return result, str(context.content["text"])


@pytest.mark.slow
@pytest.mark.parametrize("role", ["imaging", "small"])
async def test_ask_reads_the_same_sources_and_context_through_the_engine_and_the_folder(
    real_records: RealRecords, test_models_dir: Path, tmp_path: Path, role: str
) -> None:
    record = real_records.by_role[role]
    server = _runtime({"base_url": real_records.server.base_url}, tmp_path, test_models_dir, "server")
    folder = _runtime({"bundle_dir": real_records.folder, "base_url": None}, tmp_path, test_models_dir, "folder")
    for question in QUESTIONS:
        via_server, server_context = await _ask(server, record.patient_id, question)
        via_folder, folder_context = await _ask(folder, record.patient_id, question)
        assert via_server.status != "failed" and via_folder.status != "failed", question
        assert f"Patient/{record.patient_id}" in via_server.sources
        assert len(via_server.sources) > 1, question  # the record reached the model, not just the patient
        assert set(via_server.sources) == set(via_folder.sources), question
        assert server_context == folder_context, question
        assert via_server.warnings == via_folder.warnings, question


@pytest.mark.slow
def test_cli_ask_through_the_engine_matches_the_folder(
    real_records: RealRecords, test_models_dir: Path, tmp_path: Path
) -> None:
    record = real_records.by_role["imaging"]
    env = {"MEDAGENT_MODELS__TEST_MODELS_DIR": str(test_models_dir)}
    common = ["--patient", record.patient_id, "--as-of", AS_OF.date().isoformat(), "--test-models", "--json"]
    bodies = {}
    for name, source in (
        ("server", ["--fhir", real_records.server.base_url]),
        ("folder", ["--fhir-dir", str(real_records.folder)]),
    ):
        db = ["--db", f"sqlite:///{tmp_path / f'{name}.db'}"]
        result = run_cli(["ask", *source, *db, *common, QUESTIONS[3]], cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        bodies[name] = json_out(result)
    assert bodies["server"]["status"] != "failed"
    assert f"Patient/{record.patient_id}" in bodies["server"]["sources"]
    assert set(bodies["server"]["sources"]) == set(bodies["folder"]["sources"])
