"""Where the tests find the real public data of ``../shared/data`` (read in place, never copied).

A user's clone may not have ``../shared`` beside it: the tests that need it then skip, saying why.
CI always runs with it beside the clone, so there its absence fails the test instead of hiding it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT

SYNTHEA_DIR = REPO_ROOT.parent / "shared" / "data" / "synthea-r4"


def synthea_dir_or_skip() -> Path:
    """Return the Synthea bundle folder; skip (outside CI) or fail (CI set) when it holds no bundle."""
    if not any(SYNTHEA_DIR.glob("*.json")):
        message = f"no Synthea bundles in {SYNTHEA_DIR} (../shared/data/synthea-r4 beside the clone)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must not skip the real-record tests", pytrace=False)
        pytest.skip(f"SKIPPING REAL-RECORD TEST: {message}")
    return SYNTHEA_DIR
