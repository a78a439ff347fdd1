"""Repository-level checks: docker-compose.yml is valid Compose, the CLI's admin commands work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import PROJECT_ROOT
from tests.e2e.cli import run_cli
from tests.support.databases import fresh_postgres_database


def test_docker_compose_file_is_valid() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (tools/install_test_deps.sh installs it)")
        pytest.skip("SKIPPING: docker-compose not installed")
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": "x",
        "ORTHANC_PASSWORD": "y",
        "AUDIT_HMAC_KEY": "z" * 32,
        "API_KEYS": "[]",
        "SUBSCRIPTION_SECRET": "s" * 32,
    }
    ok = subprocess.run(
        [tool, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    config = subprocess.run(
        [tool, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", "--services"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert {"api", "worker", "redis", "postgres", "hapi", "orthanc", "vllm"} <= set(config.stdout.split())
    # secrets are required, never defaulted
    env.pop("POSTGRES_PASSWORD")
    missing = subprocess.run(
        [tool, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


@pytest.mark.postgres
def test_db_upgrade_creates_the_schema_on_postgres(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect

    with fresh_postgres_database() as url:
        result = run_cli(["db", "upgrade", "--db", url], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        engine = create_engine(url)
        try:
            assert {"audit_runs", "audit_events", "audit_content"} <= set(inspect(engine).get_table_names())
        finally:
            engine.dispose()


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    env = {"MEDAGENT_DB__URL": "postgresql+psycopg://u:hunter2@db/x", "MEDAGENT_DICOM__PASSWORD": "s3cret"}
    result = run_cli(["config", "show", "--fhir", "http://fhir.example/r4"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "s3cret" not in result.stdout
    assert '"base_url": "http://fhir.example/r4"' in result.stdout


def test_bad_flags_are_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(["ask", "--patient", "x", "--fhir", "http://a", "--fhir-dir", str(tmp_path), "?"], cwd=tmp_path)
    assert result.returncode == 2 and "either --fhir or --fhir-dir" in result.stderr
