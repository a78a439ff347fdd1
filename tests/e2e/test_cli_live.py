"""End to end through the CLI: live FHIR engine + Orthanc + tiny real-class models, SQLite and PostgreSQL.

Asserts what a user relies on: the answer's sources exist on the FHIR server, and the trace holds
every FHIR request (with the ids it returned), every DICOM retrieval and every model call.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from agent.audit.reader import load_run
from agent.config import DEFAULT_FIXTURES
from agent.graph.state import HISTORY_TYPES
from tests.e2e.cli import json_out, run_cli
from tests.support.databases import EngineFactory
from tests.support.servers import FhirServerHandle, OrthancHandle

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
CXR = next(p for p in MANIFEST["patients"] if p["key"] == "cxr")


def _env(orthanc: OrthancHandle, test_models_dir: Path) -> dict[str, str]:
    return {
        "MEDAGENT_DICOM__USERNAME": orthanc.username,
        "MEDAGENT_DICOM__PASSWORD": orthanc.password,
        "MEDAGENT_MODELS__TEST_MODELS_DIR": str(test_models_dir),
    }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_ask_against_live_servers_is_cited_and_fully_traced(
    fhir_server: FhirServerHandle,
    orthanc: OrthancHandle,
    test_models_dir: Path,
    db_url: str,
    new_engine: EngineFactory,
    tmp_path: Path,
) -> None:
    question = "What does the latest chest X-ray show?"
    args = [
        "ask",
        "--patient",
        CXR["patient_id"],
        "--fhir",
        fhir_server.base_url,
        "--dicomweb",
        orthanc.dicomweb_url,
        "--db",
        db_url,
        "--test-models",
        "--json",
        question,
    ]
    result = run_cli(args, cwd=tmp_path, env=_env(orthanc, test_models_dir))
    assert result.returncode == 0, result.stderr
    body = json_out(result)
    assert set(body) >= {"answer", "sources", "citations", "run_id", "status"}
    assert body["status"] == "ok" and body["test_models"] is True

    # every source the model was given exists on the server
    with httpx.Client(base_url=fhir_server.base_url + "/", timeout=10) as client:
        for source in body["sources"]:
            assert client.get(source).status_code == 200, source
        on_server = {f"Patient/{CXR['patient_id']}"}
        for kind in HISTORY_TYPES:
            bundle = client.get(kind, params={"patient": CXR["patient_id"]}).json()
            on_server |= {f"{kind}/{e['resource']['id']}" for e in bundle.get("entry", [])}
    assert set(body["sources"]) <= on_server
    assert f"ImagingStudy/{max(CXR['studies'], key=lambda s: s['started'])['imaging_study_id']}" in body["sources"]

    trace = load_run(new_engine(db_url), body["run_id"])
    assert trace.run.status == "ok"
    fhir = [e for e in trace.events if e.kind == "fhir_request"]
    assert {e.meta["backend"] for e in fhir} == {"http"} and all(e.meta["status"] == 200 for e in fhir)
    assert {e.meta["path"].split("?")[0] for e in fhir} == {f"Patient/{CXR['patient_id']}", "metadata", *HISTORY_TYPES}
    returned = {rid for e in fhir for rid in e.meta["resource_ids"]}
    assert returned == on_server  # the trace names every resource the server gave us

    current = max(CXR["studies"], key=lambda s: s["started"])
    dicom = [e for e in trace.events if e.kind == "dicom_retrieval"]
    assert dicom[0].meta["action"] == "search" and dicom[0].meta["study_uid"] == current["study_uid"]
    retrieved = {e.meta["sop_instance_uid"] for e in dicom if e.meta["action"] == "retrieve"}
    pa = next(i for i in current["instances"] if i["view_position"] == "PA")
    assert pa["sop_instance_uid"] in retrieved
    assert all(e.meta["bytes"] and e.meta["transfer_syntax"] for e in dicom if e.meta["action"] == "retrieve")

    calls = {e.name: e for e in trace.events if e.kind == "model_call"}
    assert set(calls) == {"medsiglip.embed_images", "medsiglip.zero_shot", "medgemma.generate"}
    generate = calls["medgemma.generate"]
    assert generate.meta["backend"] == "transformers" and generate.meta["test_model"] is True
    assert generate.meta["prompt_tokens"] > 0 and generate.meta["output_tokens"] > 0
    assert generate.meta["images"] >= 1 and pa["sop_instance_uid"] in generate.meta["image_refs"]

    shown = run_cli(["audit", "show", body["run_id"], "--db", db_url], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for expected in (
        f"GET Patient/{CXR['patient_id']} -> 200",
        f"GET Condition?patient={CXR['patient_id']}",
        f"instance={pa['sop_instance_uid']}",
        "MODEL CALL  medgemma.generate",
        f"PIXELS      {pa['sop_instance_uid']}: preset cxr; decode Explicit VR Little Endian",
        f"image {pa['sop_instance_uid']}: ",
        "NODE ✓      reason",
        "RUN END     status=ok",
    ):
        assert expected in shown.stdout, expected
    listed = run_cli(["audit", "list", "--db", db_url], cwd=tmp_path)
    assert body["run_id"] in listed.stdout and " ok " in listed.stdout


@pytest.mark.slow
def test_cli_errors_are_clear_non_zero_and_traced(
    fhir_server: FhirServerHandle, orthanc: OrthancHandle, test_models_dir: Path, tmp_path: Path
) -> None:
    env = _env(orthanc, test_models_dir)
    db = f"sqlite:///{tmp_path / 'trace.db'}"
    common = ["--dicomweb", orthanc.dicomweb_url, "--db", db, "--test-models"]

    unknown = run_cli(
        ["ask", "--patient", "does-not-exist", "--fhir", fhir_server.base_url, *common, "?"], cwd=tmp_path, env=env
    )
    assert unknown.returncode == 3
    assert "error [patient_not_found]" in unknown.stderr and "run id:" in unknown.stderr
    run_id = unknown.stderr.split("run id: ")[1].split()[0]
    shown = run_cli(["audit", "show", run_id, "--db", db], cwd=tmp_path)
    assert "RUN END     status=failed failing_step=resolve_patient error=patient_not_found" in shown.stdout

    down = f"http://127.0.0.1:{_closed_port()}/fhir"
    unreachable = run_cli(
        ["ask", "--patient", CXR["patient_id"], "--fhir", down, *common, "--json", "?"], cwd=tmp_path, env=env
    )
    assert unreachable.returncode == 4
    failed = json_out(unreachable)
    assert failed["status"] == "failed" and failed["error"]["code"] == "source_unavailable" and failed["run_id"]

    bad_auth = {**env, "MEDAGENT_DICOM__PASSWORD": "wrong"}
    denied = run_cli(
        ["ask", "--patient", CXR["patient_id"], "--fhir", fhir_server.base_url, *common, "?"],
        cwd=tmp_path,
        env=bad_auth,
    )
    # Imaging degrades, it does not end the run: the answer comes without images, with a warning.
    assert denied.returncode == 0, denied.stderr
    assert "warning: ImagingStudy/" in denied.stderr and "authentication failed" in denied.stderr.lower()


@pytest.mark.slow
def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    env = {
        "MEDAGENT_MODELS__MEDGEMMA": "google/medgemma-4b-it",
        "MEDAGENT_MODELS__MEDSIGLIP": "google/medsiglip-448",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
    }
    result = run_cli(["ask", "--patient", CXR["patient_id"], "?"], cwd=tmp_path, env=env)
    assert result.returncode == 6
    assert "error [model_unavailable]" in result.stderr
    assert "google/medsiglip-448" in result.stderr or "google/medgemma-4b-it" in result.stderr
    assert "HF_TOKEN" in result.stderr


@pytest.mark.slow
def test_demo_without_weights_shows_the_banner_and_a_full_answer(test_models_dir: Path, tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "MEDAGENT_MODELS__TEST_MODELS_DIR": str(test_models_dir)}
    result = run_cli(["demo"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("=" * 78) == 2 and "meaningless" in out  # one banner
    for section in ("Answer:", "Sources given to the model", "Citations made by the model", "Run id:"):
        assert section in out
    assert f"[Patient/{CXR['patient_id']}]" in out
    run_id = out.split("Run id: ")[1].split()[0]
    shown = run_cli(["audit", "show", run_id], cwd=tmp_path)  # default SQLite trace in ./.medagent
    assert shown.returncode == 0 and "RUN END     status=ok" in shown.stdout
