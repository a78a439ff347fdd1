"""``medagent classify fit|predict`` through typer's CliRunner, with the tiny MedSigLIP.

The sub-app is mounted under ``classify`` on a throwaway root app, as :mod:`agent.cli` mounts it,
so the command lines tested here are the ones users type. With random weights the accuracy
figures mean nothing; the learning itself is tested on separable embeddings in
tests/inference/test_classifier.py. Here: files in, a valid probe file out, predictions back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner, Result

from agent.cli_classify import classify_app
from agent.inference.classifier import FORMAT_VERSION
from tests.inference.test_training_data import gradient, write_dicom

root_app = typer.Typer()
root_app.add_typer(classify_app, name="classify")


def classify(*args: str) -> Result:
    """Run ``medagent classify ARGS`` in-process."""
    return CliRunner().invoke(root_app, ["classify", *args])


@pytest.fixture(autouse=True)
def _tiny_models_here(monkeypatch: pytest.MonkeyPatch, test_models_dir: Path) -> None:
    """Point --test-models at the session's tiny models instead of building them again."""
    monkeypatch.setenv("MEDAGENT_MODELS__TEST_MODELS_DIR", str(test_models_dir))
    monkeypatch.setenv("MEDAGENT_MODELS__DEVICE", "cpu")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Three classes, four images each: bright and dark noise pictures, and DICOM ramps."""
    rng = np.random.default_rng(11)
    root = tmp_path / "chest-triage"
    for label, low, high in (("bright", 180, 256), ("dark", 0, 60)):
        (root / label).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(low, high, size=(40 + 8 * index, 48), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    (root / "ramp").mkdir()
    for index in range(4):
        write_dicom(root / "ramp" / f"{index}.dcm", gradient(32, 40 + 4 * index))
    return root


def fit_json(data: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = classify("fit", "--data", str(data), "--out", str(out), "--test-models", "--json", *extra)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    body: dict[str, Any] = json.loads(lines[0])
    return body


def test_fit_saves_a_probe_with_its_label_set_and_model(data_dir: Path, tmp_path: Path, test_models_dir: Path) -> None:
    out = tmp_path / "probe.json"
    body = fit_json(data_dir, out, "--folds", "3")
    assert body["status"] == "ok"
    assert body["label_set"] == "chest-triage@1"
    assert body["classes"] == ["bright", "dark", "ramp"]
    assert body["test_model"] is True
    report = body["cross_validation"]
    assert report["folds"] == 3 and report["examples"] == 12
    assert report["class_counts"] == {"bright": 4, "dark": 4, "ramp": 4}
    assert set(report["per_class_recall"]) == {"bright", "dark", "ramp"}
    assert 0.0 <= report["balanced_accuracy"] <= 1.0
    assert body["skipped"] == []

    saved = json.loads(out.read_text())
    assert saved["format"] == "medagent-linear-probe" and saved["format_version"] == FORMAT_VERSION
    assert saved["label_set"] == {"name": "chest-triage", "version": "1", "classes": ["bright", "dark", "ramp"]}
    model = saved["embedding_model"]
    assert "tiny-random-medsiglip" in model["model_id"] and str(test_models_dir) in model["model_id"]
    assert model["revision"].startswith("sha256:")
    assert len(saved["weights"]) == 3 and all(len(row) == model["embedding_dim"] for row in saved["weights"])
    assert saved["cross_validation"] == report
    assert saved["created_at"]


def test_predict_scores_pictures_and_dicom(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    fit_json(data_dir, out, "--name", "triage", "--version", "7")
    files = [str(data_dir / "bright" / "0.png"), str(data_dir / "ramp" / "1.dcm")]
    result = classify("predict", "--model", str(out), *files, "--test-models", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["label_set"] == "triage@7"
    assert [item["file"] for item in body["predictions"]] == files
    for item in body["predictions"]:
        assert [score["label"] for score in item["scores"]] == ["bright", "dark", "ramp"]
        assert sum(score["score"] for score in item["scores"]) == pytest.approx(1.0)

    text = classify("predict", "--model", str(out), *files, "--test-models")
    assert text.exit_code == 0, text.output
    assert "TEST MODELS IN USE" in text.stdout
    assert "triage@7" in text.stdout
    assert f"{files[1]}: " in text.stdout


def test_fit_prints_a_readable_report(data_dir: Path, tmp_path: Path) -> None:
    result = classify("fit", "--data", str(data_dir), "--out", str(tmp_path / "p.json"), "--test-models")
    assert result.exit_code == 0, result.output
    assert "3 classes, 12 images" in result.stdout
    assert "balanced accuracy" in result.stdout
    assert "recall ramp" in result.stdout
    assert (tmp_path / "p.json").is_file()


def test_csv_data_and_skipped_files(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}" for p in sorted(data_dir.rglob("*.*"))]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\n" + "\n".join([*rows, "broken.png,dark"]) + "\n")
    failed = classify("fit", "--data", str(csv_file), "--out", str(tmp_path / "p.json"), "--test-models", "--json")
    assert failed.exit_code == 2
    assert "broken.png" in json.loads(failed.stdout)["error"]["message"]
    assert not (tmp_path / "p.json").exists()

    body = fit_json(csv_file, tmp_path / "p.json", "--skip-unreadable")
    assert body["label_set"] == "labels@1"
    assert [Path(item["path"]).name for item in body["skipped"]] == ["broken.png"]
    assert body["cross_validation"]["examples"] == 12


def test_too_few_images_is_a_clear_error(tmp_path: Path) -> None:
    for label, count in (("a", 3), ("b", 1)):
        (tmp_path / "few" / label).mkdir(parents=True)
        for index in range(count):
            Image.new("L", (16, 16), 40 * index).save(tmp_path / "few" / label / f"{index}.png")
    result = classify("fit", "--data", str(tmp_path / "few"), "--out", str(tmp_path / "p.json"), "--test-models")
    assert result.exit_code == 2
    assert "at least 2 labelled images" in result.stderr and "b (1)" in result.stderr


def test_predict_refuses_a_probe_from_another_model(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    fit_json(data_dir, out)
    document = json.loads(out.read_text())
    document["embedding_model"]["revision"] = "sha256:" + "0" * 16
    document["embedding_model"]["model_id"] = "google/medsiglip-448"
    out.write_text(json.dumps(document))
    result = classify("predict", "--model", str(out), str(data_dir / "dark" / "0.png"), "--test-models", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "classifier_model_mismatch"
    assert "google/medsiglip-448" in error["message"]


def test_predict_names_a_missing_classifier(tmp_path: Path) -> None:
    result = classify("predict", "--model", str(tmp_path / "none.json"), str(tmp_path / "x.png"), "--test-models")
    assert result.exit_code == 2
    assert "none.json" in result.stderr
