"""The auditor's CLI on a real run made with the tiny real-class models: export, replay, re-run and diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.e2e.cli import json_out, run_cli


@pytest.mark.slow
def test_export_replay_and_rerun_of_a_demo_run(test_models_dir: Path, tmp_path: Path) -> None:
    env = {"MEDAGENT_MODELS__TEST_MODELS_DIR": str(test_models_dir)}
    demo = run_cli(["demo", "--test-models", "--json"], cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stderr
    run = json_out(demo)

    fhir = run_cli(["audit", "export", run["run_id"], "--format", "fhir"], cwd=tmp_path)
    assert fhir.returncode == 0, fhir.stderr
    bundle = Bundle.model_validate(json.loads(fhir.stdout))
    types = [entry.resource.__resource_type__ for entry in bundle.entry or []]
    assert types.count("Provenance") == 1 and types.count("AuditEvent") >= 10

    otel = json.loads(run_cli(["audit", "export", run["run_id"], "--format", "otel"], cwd=tmp_path).stdout)
    names = [span["name"] for span in otel["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    assert any(name.startswith("chat ") for name in names)

    replayed = run_cli(["audit", "replay", run["run_id"], "--json"], cwd=tmp_path)
    assert json.loads(replayed.stdout)["original"]["answer"] == run["answer"]

    # same data, same deterministic (greedy) models: the re-run must match the original
    rerun = run_cli(["audit", "replay", run["run_id"], "--rerun", "--test-models"], cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "No differences." in rerun.stdout

    verified = run_cli(["audit", "verify"], cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("INTACT: all")
    bad = run_cli(["audit", "export", run["run_id"], "--format", "pdf"], cwd=tmp_path)
    assert bad.returncode == 2 and "--format must be fhir, otel or json" in bad.stderr
