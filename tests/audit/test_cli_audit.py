"""The auditor's command line: verify (exit 0 intact, 1 broken, naming the record), filtered list."""

from __future__ import annotations

import json
from pathlib import Path

from agent.audit.db import upgrade
from tests.audit.trace_builder import SIGNER, record_run, tamper
from tests.e2e.cli import json_out, run_cli
from tests.support.databases import EngineFactory

KEY_ENV = {"MEDAGENT_AUDIT__HMAC_KEY": "test-signing-key-0123456789abcdef"}


def test_verify_exit_codes_and_named_records(db_url: str, new_engine: EngineFactory, tmp_path: Path) -> None:
    upgrade(db_url)
    engine = new_engine(db_url)
    first = record_run(engine, "a")
    record_run(engine, "b")
    assert SIGNER.key_id  # the CLI's key is the same secret as the recorder's

    intact = run_cli(["audit", "verify", "--db", db_url], cwd=tmp_path, env=KEY_ENV)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.startswith("INTACT: all, 14 records, 2 run(s)")

    tamper(engine, "UPDATE audit_events SET name = 'innocent' WHERE chain_seq = 4")
    broken = run_cli(["audit", "verify", "--db", db_url], cwd=tmp_path, env=KEY_ENV)
    assert broken.returncode == 1
    assert "BROKEN record_altered: record chain_seq=4" in broken.stdout
    one = run_cli(["audit", "verify", "--run", first.run_id, "--db", db_url, "--json"], cwd=tmp_path, env=KEY_ENV)
    assert one.returncode == 1 and json_out(one)["problems"][0]["code"] == "record_altered"

    wrong_key = run_cli(["audit", "verify", "--db", db_url], cwd=tmp_path, env={"MEDAGENT_AUDIT__HMAC_KEY": "x" * 32})
    assert wrong_key.returncode == 1 and "checkpoint_key_unknown" in wrong_key.stdout


def test_list_filters(tmp_path: Path, new_engine: EngineFactory) -> None:
    url = f"sqlite:///{tmp_path / 'trace.db'}"
    upgrade(url)
    engine = new_engine(url)
    record_run(engine, "a")
    open_run = record_run(engine, "b", finish=False)
    listed = run_cli(["audit", "list", "--db", url, "--json", "--status", "running"], cwd=tmp_path)
    # the open run belongs to this (live) test process, so it is not marked interrupted
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [open_run.run_id]
    by_user = run_cli(["audit", "list", "--db", url, "--json", "--user", "dr-who", "--trigger", "test"], cwd=tmp_path)
    assert len(json.loads(by_user.stdout)) == 2
    none = run_cli(["audit", "list", "--db", url, "--json", "--since", "2999-01-01"], cwd=tmp_path)
    assert json.loads(none.stdout) == []
    bad = run_cli(["audit", "list", "--db", url, "--since", "yesterday"], cwd=tmp_path)
    assert bad.returncode == 2 and "--since must be an ISO date" in bad.stderr
