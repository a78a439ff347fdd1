"""A throwaway PostgreSQL 16 with pgvector, for the pgvector backend's tests and benchmark.

The system PostgreSQL of these machines has no vector extension; the ``pgserver`` wheel (a dev
dependency) bundles PostgreSQL 16 with pgvector, and its binaries run in place. PostgreSQL
refuses to run as root, so as root the binaries run as the ``postgres`` user (``runuser``) on a
data folder that user owns. The server listens on 127.0.0.1 only, on a free port, with trust
auth and fsync off (scratch data), and is stopped with ``pg_ctl stop`` on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class ScratchServerError(RuntimeError):
    """The scratch server could not be started (the message says which step failed and why)."""


@dataclass(frozen=True)
class ScratchPgVector:
    """A running scratch server: its SQLAlchemy URL and its data folder."""

    url: str
    port: int
    data_dir: Path


def pgserver_bin_dir() -> Path:
    """Return the folder of the PostgreSQL binaries bundled by the ``pgserver`` wheel.

    Raises:
        ScratchServerError: ``pgserver`` is not installed (``pip install -e .[dev]``).
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ScratchServerError(
            "the pgserver package (PostgreSQL 16 + pgvector) is not installed: pip install pgserver"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").exists():
        raise ScratchServerError(f"pgserver is installed but has no binaries at {bin_dir}")
    return bin_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(args: list[str]) -> list[str]:
    # PostgreSQL refuses root; any other user runs the binaries directly.
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise ScratchServerError("running as root needs `runuser` to start PostgreSQL as the postgres user")
        return ["runuser", "-u", "postgres", "--", *args]
    return args


def _run(args: list[str], what: str, timeout: float = 60) -> None:
    try:
        result = subprocess.run(_as_server_user(args), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ScratchServerError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        raise ScratchServerError(
            f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}"
        )


@contextlib.contextmanager
def scratch_pgvector(*, database: str = "postgres") -> Iterator[ScratchPgVector]:
    """Start a scratch PostgreSQL with the vector extension created; stop and delete it on exit.

    Raises:
        ScratchServerError: pgserver is missing, or initdb / start / CREATE EXTENSION failed.
    """
    bin_dir = pgserver_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="medagent-pgvector-"))
    started = False
    try:
        # mkdtemp makes 0700 folders; the server user must be able to enter and own it.
        base.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(base, user="postgres", group="postgres")
        data_dir = base / "data"
        _run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
            "initdb",
        )
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off"
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data_dir),
                "-o",
                options,
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            "pg_ctl start",
            timeout=90,
        )
        started = True
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
        _create_extension(port, database)
        yield ScratchPgVector(url=url, port=port, data_dir=data_dir)
    finally:
        if started:
            with contextlib.suppress(ScratchServerError):
                _run([str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        shutil.rmtree(base, ignore_errors=True)


def _create_extension(port: int, database: str) -> None:
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=database, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        raise ScratchServerError(f"CREATE EXTENSION vector failed: {exc}") from exc
