"""The audit benchmark on small sizes: every figure the issue names is there and consistent."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from agent.audit.chain import canonical_json
from agent.audit.reader import TraceEvent
from agent.bench.audit import chain_floor, run_benchmark
from agent.cli import app
from tests.support.databases import fresh_postgres_database

ISSUE_KEYS = {"recording_overhead_share", "append_per_s_sqlite", "append_per_s_postgres", "verify_per_s"}


@pytest.mark.postgres
@pytest.mark.slow
def test_small_benchmark_reports_every_figure_on_both_databases() -> None:
    lines: list[str] = []
    with fresh_postgres_database() as pg_url:
        results = run_benchmark(verify_records=300, appends=30, repeats=2, pg_url=pg_url, echo=lines.append)
    assert results.keys() >= ISSUE_KEYS
    assert results["append_per_s_sqlite"] > 0 and results["append_per_s_postgres"] > 0
    assert results["verify_records"] >= 300 and results["verify_per_s"] > 0
    # an ask run records its steps, data accesses and model calls: dozens of records
    assert results["records_per_run"] >= 20
    # the floor is part of the traced run's time, so it is a fraction of it
    assert 0 < results["chain_floor_ms"] < results["run_median_ms"]
    assert results["chain_floor_share"] == pytest.approx(results["chain_floor_ms"] / results["run_median_ms"], 0.01)
    assert any(line.startswith("  floor: serialising and chain-hashing") for line in lines)


def test_chain_floor_grows_with_the_records_it_hashes() -> None:
    def events(count: int, size: int) -> list[TraceEvent]:
        meta = {"path": "x" * size, "ids": list(range(size // 10))}
        return [
            TraceEvent(
                seq=i,
                chain_seq=i,
                hash="0" * 64,
                kind="note",
                name="n",
                at=datetime.now(UTC),
                duration_ms=1.0,
                status="ok",
                meta=meta,
                content={"text": "y" * size},
            )
            for i in range(1, count + 1)
        ]

    assert len(canonical_json(events(1, 2000)[0].meta)) > 2000
    small, large = chain_floor(events(5, 10), rounds=5), chain_floor(events(200, 2000), rounds=5)
    assert 0 < small < large


@pytest.mark.slow
def test_cli_prints_the_figures_as_its_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.bench.audit.LOCAL_PG_ADMIN", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["bench", "audit", "--records", "200", "--appends", "20", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures.keys() >= ISSUE_KEYS
    assert figures["append_per_s_postgres"] is None  # no server at that address: said, not faked
