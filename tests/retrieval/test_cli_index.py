"""``medagent index``: add, search (text, DICOM and PNG images), info, delete, rebuild with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from typer.testing import CliRunner

from agent.cli_index import index_app
from agent.config import DEFAULT_FIXTURES
from agent.domain.refs import InstanceRef
from agent.retrieval.scratch_pgvector import ScratchPgVector
from agent.sources.pixels import prepare_instance
from tests.support.servers import OrthancHandle

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
STUDIES = [s for p in MANIFEST["patients"] for s in p["studies"]]
CURRENT = max(next(p for p in MANIFEST["patients"] if p["key"] == "cxr")["studies"], key=lambda s: s["started"])
PA = next(i for i in CURRENT["instances"] if i["view_position"] == "PA")
IMAGES = sum(min(4, len(s["instances"])) for s in STUDIES)


@pytest.fixture
def invoke(test_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MEDAGENT_MODELS__TEST_MODELS_DIR", str(test_models_dir))
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(index_app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return json.loads(result.stdout.strip().splitlines()[-1]) if "--json" in args else result.output

    return run


def test_add_search_delete_rebuild_on_the_embedded_index(invoke: Any, tmp_path: Path) -> None:
    where = ["--index-path", str(tmp_path / "ix")]
    added = invoke("add", "--dir", str(DEFAULT_FIXTURES / "dicom"), "--test-models", *where, "--json")
    assert added["added"] == IMAGES and set(added["studies"]) == {s["study_uid"] for s in STUDIES}
    info = invoke("info", *where, "--json")
    assert (info["count"], info["studies"], info["backend"], info["test_model"]) == (IMAGES, 3, "file", True)

    by_text = invoke("search", "--text", "an enlarged heart", "--k", "2", "--test-models", *where, "--json")["hits"]
    assert len(by_text) == 2 and {h["study_uid"] for h in by_text} <= {s["study_uid"] for s in STUDIES}

    by_dicom = invoke("search", "--image", str(DEFAULT_FIXTURES / PA["file"]), "--test-models", *where, "--json")
    top = by_dicom["hits"][0]
    assert (top["study_uid"], top["sop_instance_uid"]) == (CURRENT["study_uid"], PA["sop_instance_uid"])
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and len(by_dicom["hits"]) == 3

    # The same picture as a PNG finds the same instance.
    ds = pydicom.dcmread(DEFAULT_FIXTURES / PA["file"])
    ref = InstanceRef(
        study_uid=CURRENT["study_uid"], series_uid=PA["series_uid"], sop_instance_uid=PA["sop_instance_uid"]
    )
    png = tmp_path / "query.png"
    prepare_instance(ds, ref).image.save(png)
    by_png = invoke("search", "--image", str(png), "--test-models", *where, "--json")["hits"][0]
    assert by_png["sop_instance_uid"] == PA["sop_instance_uid"] and by_png["score"] > 0.999

    excluded = invoke(
        "search", "--image", str(png), "--exclude-study", CURRENT["study_uid"], "--test-models", *where, "--json"
    )["hits"]
    assert CURRENT["study_uid"] not in {h["study_uid"] for h in excluded}

    assert invoke("delete", "--study", CURRENT["study_uid"], *where, "--json")["removed"] == 2
    after = invoke("search", "--image", str(png), "--test-models", *where, "--json")["hits"]
    assert CURRENT["study_uid"] not in {h["study_uid"] for h in after}
    rebuilt = invoke("rebuild", *where, "--json")
    assert (rebuilt["count"], rebuilt["deleted"]) == (IMAGES - 2, 0)

    text = invoke("search", "--text", "effusion", "--test-models", *where)
    assert "1. " in text and "best image" in text


def test_usage_errors_and_missing_index_exit_with_config_code(invoke: Any, tmp_path: Path) -> None:
    where = ["--index-path", str(tmp_path / "none")]
    missing = invoke("search", "--text", "x", "--test-models", *where, "--json", code=2)
    assert missing["error"]["code"] == "config_invalid" and "no image index" in missing["error"]["message"]
    both = invoke("add", "--dir", ".", "--imaging-study", "x", *where, "--json", code=2)
    assert "exactly one" in both["error"]["message"]
    assert not (tmp_path / "none").exists()


def test_add_from_dicomweb_one_study(
    invoke: Any, orthanc: OrthancHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDAGENT_DICOM__USERNAME", orthanc.username)
    monkeypatch.setenv("MEDAGENT_DICOM__PASSWORD", orthanc.password)
    where = ["--index-path", str(tmp_path / "ix")]
    added = invoke(
        "add", "--dicomweb", orthanc.dicomweb_url, "--study", CURRENT["study_uid"], "--test-models", *where, "--json"
    )
    assert added["added"] == 2 and added["studies"] == [CURRENT["study_uid"]]
    hit = invoke("search", "--image", str(DEFAULT_FIXTURES / PA["file"]), "--test-models", *where, "--json")["hits"][0]
    assert hit["instance_url"].startswith(orthanc.dicomweb_url.rstrip("/") + "/studies/")
    assert "@" not in hit["instance_url"]


def test_pgvector_backend_from_the_command_line(
    invoke: Any, pgvector_server: ScratchPgVector, pg_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDAGENT_IMAGING__INDEX_TABLE", pg_table)
    where = ["--backend", "pgvector", "--index-url", pgvector_server.url]
    added = invoke("add", "--dir", str(DEFAULT_FIXTURES / "dicom" / "cxr-current"), "--test-models", *where, "--json")
    assert added["added"] == 2
    hit = invoke("search", "--image", str(DEFAULT_FIXTURES / PA["file"]), "--test-models", *where, "--json")["hits"][0]
    assert hit["sop_instance_uid"] == PA["sop_instance_uid"] and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert invoke("info", *where, "--json")["count"] == 2


def test_add_from_dicomweb_by_patient_and_by_modality(
    invoke: Any, orthanc: OrthancHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDAGENT_DICOM__USERNAME", orthanc.username)
    monkeypatch.setenv("MEDAGENT_DICOM__PASSWORD", orthanc.password)
    cxr = next(p for p in MANIFEST["patients"] if p["key"] == "cxr")
    by_patient = ["--index-path", str(tmp_path / "by-patient")]
    added = invoke(
        "add", "--dicomweb", orthanc.dicomweb_url, "--patient", cxr["mrn"], "--test-models", *by_patient, "--json"
    )
    assert set(added["studies"]) == {s["study_uid"] for s in cxr["studies"]} and added["added"] == 3
    by_modality = ["--index-path", str(tmp_path / "by-modality")]
    added = invoke(
        "add", "--dicomweb", orthanc.dicomweb_url, "--modality", "CT", "--test-models", *by_modality, "--json"
    )
    ct = next(p for p in MANIFEST["patients"] if p["key"] == "ct")
    assert added["studies"] == [ct["studies"][0]["study_uid"]] and added["added"] == 4
