"""``medagent bench service`` end to end on a few chats: the real serve process, the JSON it ends with."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.cli import run_cli


def test_bench_service_reports_errors_latency_and_memory(tmp_path: Path) -> None:
    done = run_cli(
        ["bench", "service", "--chats", "6", "--sequential", "2", "--notifications", "10"], cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["concurrent_chats"] == 6 and result["errors"] == 0 and result["sequential_errors"] == 0
    assert 0 <= result["p50_added_ms"] <= result["p99_added_ms"]
    assert result["p50_total_ms"] >= result["p50_added_ms"]
    assert result["peak_rss_mb"] >= result["idle_rss_mb"] > 50
    assert "one at a time" in done.stdout
    # 10 notifications, 7 distinct events: each summarized by exactly one job and one run
    assert (result["notifications"], result["distinct_events"], result["notification_errors"]) == (10, 7, 0)
    assert result["subscription_jobs"] == result["summaries_done"] == result["summary_runs"] == 7
    assert result["each_event_summarized_once"] is True
