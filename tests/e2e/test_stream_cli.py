"""``medagent ask --stream`` as a user runs it: progress on stderr, tokens then the checked answer on stdout.

Real: the console script, the tiny random-weight MedGemma and MedSigLIP (their token stream), the
embedded FHIR and DICOM fixtures and the SQLite trace.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import DEFAULT_FIXTURES
from tests.e2e.cli import run_cli

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
NOIMG = next(p for p in MANIFEST["patients"] if p["key"] == "noimg")


def test_ask_stream_prints_progress_then_the_answer(test_models_dir: Path, tmp_path: Path) -> None:
    env = {"MEDAGENT_MODELS__TEST_MODELS_DIR": str(test_models_dir), "MEDAGENT_MODELS__MAX_NEW_TOKENS": "8"}
    result = run_cli(
        ["ask", "--patient", NOIMG["patient_id"], "--test-models", "--stream", "Diabetes control?"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.endswith((" started]", " failed]"))]
    assert progress[:3] == ["[resolve_patient started]", "[plan started]", "[access_check started]"]
    assert "[reason started]" in progress and "[check_citations started]" in progress
    assert "run id" in result.stdout.lower() or "run_id" in result.stdout.lower()

    failed = run_cli(["ask", "--patient", "no-such-patient", "--test-models", "--stream", "?"], cwd=tmp_path, env=env)
    assert failed.returncode == 3 and "error [patient_not_found]" in failed.stderr
