"""Run the real ``medagent`` console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MEDAGENT = str(Path(sys.executable).with_name("medagent"))


def run_cli(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``medagent ARGS`` with a clean MEDAGENT_* environment plus ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDAGENT_")}
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.update(env or {})
    return subprocess.run(
        [MEDAGENT, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def json_out(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Parse the single JSON object a ``--json`` command prints."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line, got: {result.stdout!r} / stderr {result.stderr!r}"
    value: dict[str, Any] = json.loads(lines[0])
    return value
