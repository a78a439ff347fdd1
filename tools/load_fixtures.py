"""Load the project's fixtures, or any FHIR bundles, into running servers: FHIR bundles and DICOM files.

Where it sits: a developer (or docker-compose set-up) starts a FHIR server and a DICOMweb server,
then runs this once so ``medagent`` pointed at those servers sees the same synthetic patients the
embedded defaults serve from ``fixtures/``. The loaders are the ones the test session uses
(``tests/support/servers.py``).

Usage::

    python tools/load_fixtures.py --fhir http://127.0.0.1:8080/fhir \\
        --dicomweb http://127.0.0.1:8042/dicom-web --user orthanc --password orthanc

    # other bundles instead of fixtures/fhir: files, or folders (every *.json below them)
    python tools/load_fixtures.py --fhir http://127.0.0.1:8080/fhir --bundles ../shared/data/synthea-r4

With ``--bundles`` the FHIR server gets those bundles and not ``fixtures/fhir``. Any bundle type
or single resource loads; resource ids are kept (a transaction's ``POST`` entries with an id or a
``urn:uuid:`` fullUrl, as Synthea writes them, are stored under that id), so ``medagent --fhir URL``
names the same resources as ``medagent --fhir-dir`` over the same files.

The DICOMweb password may also come from the environment variable ``DICOMWEB_PASSWORD`` (keeps it
out of the process list). Exit status: 0 when everything loaded, 1 on a load error, 2 on usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Run as a script from anywhere: the loaders live in the repository's tests/support package.
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.servers import (  # noqa: E402 - needs the sys.path entry above
    ServerError,
    fixture_dicom_files,
    fixture_fhir_files,
    load_fhir_bundles,
    stow_dicom,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fhir", metavar="URL", help="FHIR R4 base URL to load fixtures/fhir/*.json (or --bundles) into"
    )
    parser.add_argument(
        "--bundles",
        metavar="PATH",
        nargs="+",
        type=Path,
        help="FHIR bundle files or folders (every *.json below them) to load instead of fixtures/fhir",
    )
    parser.add_argument("--dicomweb", metavar="URL", help="DICOMweb root to STOW fixtures/dicom/**.dcm into")
    parser.add_argument("--user", help="basic-auth user for the DICOMweb server")
    parser.add_argument("--password", help="basic-auth password (or set DICOMWEB_PASSWORD)")
    parser.add_argument(
        "--fixtures", type=Path, default=REPO_ROOT / "fixtures", help="fixtures folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not args.fhir and not args.dicomweb:
        parser.error("give --fhir and/or --dicomweb")
    if args.bundles and not args.fhir:
        parser.error("--bundles needs --fhir")
    return args


def bundle_files(paths: list[Path]) -> list[Path]:
    """Return the JSON files named, and every ``*.json`` below the folders named, in order.

    Folders are walked as the bundle folder source walks them (recursively, sorted by path).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def main(argv: list[str] | None = None) -> int:
    """Load the fixtures (or the --bundles given); return the process exit status."""
    args = parse_args(argv)
    try:
        if args.fhir:
            files = bundle_files(args.bundles) if args.bundles else fixture_fhir_files(args.fixtures)
            if not files:
                where = " ".join(map(str, args.bundles)) if args.bundles else args.fixtures / "fhir"
                print(f"no FHIR bundles under {where}", file=sys.stderr)
                return 1
            started = time.perf_counter()
            count = load_fhir_bundles(args.fhir, files)
            elapsed = time.perf_counter() - started
            print(f"FHIR: {count} entries from {len(files)} bundle(s) loaded into {args.fhir} in {elapsed:.1f} s")
        if args.dicomweb:
            files = fixture_dicom_files(args.fixtures)
            if not files:
                print(f"no DICOM files under {args.fixtures / 'dicom'}", file=sys.stderr)
                return 1
            password = args.password or os.environ.get("DICOMWEB_PASSWORD")
            auth = (args.user, password or "") if args.user else None
            count = stow_dicom(args.dicomweb, auth, files)
            print(f"DICOMweb: {count} instance(s) from {len(files)} file(s) stored into {args.dicomweb}")
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, httpx.HTTPError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
