"""`medagent serve` as a real HTTP server process: ask over HTTP, then read the run's trace."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from agent.config import DEFAULT_FIXTURES
from tests.e2e.cli import MEDAGENT

CXR = next(p for p in json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())["patients"] if p["key"] == "cxr")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_serve_answers_and_exposes_the_trace(test_models_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDAGENT_")}
    env.update(
        HF_HUB_OFFLINE="1",
        MEDAGENT_MODELS__TEST_MODELS_DIR=str(test_models_dir),
        MEDAGENT_DB__URL=f"sqlite:///{tmp_path / 'trace.db'}",
    )
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [MEDAGENT, "serve", "--port", str(port), "--test-models"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        reply = httpx.post(
            f"{base}/v1/ask", json={"patient_id": CXR["patient_id"], "question": "Current medications?"}, timeout=120
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "ok" and f"Patient/{CXR['patient_id']}" in body["sources"]
        trace = httpx.get(f"{base}/v1/runs/{body['run_id']}", timeout=10).json()
        assert [e["kind"] for e in trace["events"]].count("model_call") == 3  # embed, zero-shot, generate
        assert trace["run"]["trigger"] == "api"
        # bound to loopback only (the settings' default host)
        assert "127.0.0.1" in (tmp_path / "serve.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
