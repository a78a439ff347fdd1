"""Build the tiny random-weight MedSigLIP and MedGemma test models (offline, a few seconds).

Usage: ``python tools/make_test_models.py [--out DIR]`` (default ``.medagent/test-models``).
Folders that are already complete are kept; half-built ones are rebuilt. Prints the two model
folders, one a line: MedSigLIP first, then MedGemma.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, build what is missing and print the two folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(".medagent/test-models"),
        help="parent folder of the two models (default: .medagent/test-models)",
    )
    args = parser.parse_args(argv)
    # Building needs nothing from the Hub; make sure nothing tries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from agent.inference.tiny_models import ensure_test_models

    medsiglip_dir, medgemma_dir = ensure_test_models(args.out)
    print(medsiglip_dir.resolve())
    print(medgemma_dir.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
