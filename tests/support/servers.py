"""Start the real servers the tests talk to, and load data into them.

Where it sits: the pytest plugin (``tests/support/plugin_servers.py``) starts one FHIR engine and
one Orthanc per test session through this module; ``tools/load_fixtures.py`` uses the loaders to
fill servers someone started by hand. Nothing here imports pytest, so tools can use it.

- FHIR: ``tools/fhir_server/server.mjs`` (``@medplum/fhir-router`` 4.5.2, in memory) under Node.
  ``npm ci`` runs first when ``node_modules`` is missing.
- DICOMweb: Debian's ``Orthanc`` 1.10 with ``libOrthancDicomWeb.so``, authentication on, DICOM
  port off. Orthanc 1.10 cannot choose its bind address, so ``tools/bind_localhost.c`` is
  preloaded to turn its wildcard bind into 127.0.0.1; the launcher then checks the listening
  socket and refuses to continue if it is reachable from outside.

Every process is stopped by the PID it was started with, never by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
FHIR_SERVER_DIR = REPO_ROOT / "tools" / "fhir_server"
SHIM_SOURCE = REPO_ROOT / "tools" / "bind_localhost.c"
BUILD_DIR = REPO_ROOT / ".medagent" / "build"
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: The engine refuses transactions with more update entries than this (its ``maxUpdates``).
MEDPLUM_MAX_TRANSACTION_UPDATES = 50
_URN_UUID = "urn:uuid:"


class ServerError(RuntimeError):
    """A test server could not be started or did not accept data."""


class ServerToolMissingError(ServerError):
    """A program a test server needs (node, npm, Orthanc, gcc, the DICOMweb plugin) is not installed."""


# -- process plumbing ----------------------------------------------------------------------------


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Terminate exactly this process (by its PID), then kill it if it does not exit."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _decode_proc_address(hex_address: str) -> str:
    """Turn a /proc/net/tcp{,6} address (little-endian hex words) into dotted or colon form."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # IPv6 is stored as four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_addresses(port: int) -> list[str]:
    """Return the local addresses with a TCP socket in LISTEN state on ``port`` (from /proc/net).

    Linux only. An empty list means nothing listens on that port.
    """
    found: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A is TCP_LISTEN
                continue
            address, _, port_hex = fields[1].rpartition(":")
            if int(port_hex, 16) == port:
                found.append(_decode_proc_address(address))
    return found


def is_loopback(address: str) -> bool:
    """Return True for 127.0.0.0/8 and ::1 (and IPv4-mapped loopback)."""
    if address.startswith("::ffff:"):
        address = address.removeprefix("::ffff:")
    return address.startswith("127.") or address == "::1"


def _check_loopback_only(port: int, name: str) -> None:
    addresses = listening_addresses(port)
    if not addresses:
        # /proc may be unavailable (non-Linux); the caller already reached it on 127.0.0.1.
        return
    exposed = [a for a in addresses if not is_loopback(a)]
    if exposed:
        raise ServerError(f"{name} listens on {exposed} (port {port}), not only on loopback; stopped it")


# -- FHIR engine ---------------------------------------------------------------------------------


@dataclass
class FhirServerHandle:
    """A running test FHIR server."""

    base_url: str
    port: int
    pid: int
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    startup_s: float = 0.0

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server's log."""
        return _tail(self.log_path, lines)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server process (this PID only)."""
        _stop_process(self.process, timeout_s)


def _node_modules_ready() -> bool:
    return (FHIR_SERVER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json").is_file() and (
        FHIR_SERVER_DIR / "node_modules" / ".package-lock.json"
    ).is_file()


def ensure_fhir_server_installed(log_path: Path, *, timeout_s: float = 300.0) -> None:
    """Run ``npm ci`` in tools/fhir_server when its node_modules is missing.

    A lock file under .medagent/build keeps concurrent test sessions from running npm ci on the
    same folder at once.

    Raises:
        ServerToolMissingError: npm is not installed.
        ServerError: npm ci failed (its output tail is in the message).
    """
    if _node_modules_ready():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise ServerToolMissingError("npm is not on PATH (needed once to install tools/fhir_server)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / "npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _node_modules_ready():
            return
        with open(log_path, "wb") as log:
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=FHIR_SERVER_DIR,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        if result.returncode != 0:
            raise ServerError(f"npm ci in {FHIR_SERVER_DIR} failed (exit {result.returncode}):\n{_tail(log_path)}")


def start_fhir_server(workdir: Path, *, timeout_s: float = 60.0) -> FhirServerHandle:
    """Start the test FHIR engine on a free 127.0.0.1 port and wait until it answers.

    Args:
        workdir: where the server's log (and npm's, when it installs) are written.
        timeout_s: how long to wait for the server to be ready.

    Raises:
        ServerToolMissingError: node (or npm, when node_modules is missing) is not installed.
        ServerError: the server did not start; the message holds its log tail.
    """
    node = shutil.which("node")
    if node is None:
        raise ServerToolMissingError("node is not on PATH (the test FHIR server needs Node 20+)")
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_fhir_server_installed(workdir / "npm-ci.log")

    log_path = workdir / "fhir-server.log"
    started = time.perf_counter()
    # The child inherits its own copy of the log descriptor; ours can close at once.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [node, "server.mjs", "0"],
            cwd=FHIR_SERVER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    deadline = started + timeout_s
    port: int | None = None
    try:
        while port is None:
            if process.poll() is not None:
                raise ServerError(f"the FHIR server exited with {process.returncode}:\n{_tail(log_path)}")
            if time.perf_counter() > deadline:
                raise ServerError(f"the FHIR server did not start within {timeout_s:g}s:\n{_tail(log_path)}")
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("LISTENING "):
                    port = int(line.split()[1])
                    break
            else:
                time.sleep(0.05)
        base_url = f"http://127.0.0.1:{port}"
        _wait_http(f"{base_url}/metadata", None, deadline, process, log_path, "FHIR server")
        _check_loopback_only(port, "the FHIR server")
    except BaseException:
        _stop_process(process, 5.0)
        raise
    return FhirServerHandle(
        base_url=base_url,
        port=port,
        pid=process.pid,
        log_path=log_path,
        process=process,
        startup_s=time.perf_counter() - started,
    )


def _wait_http(
    url: str,
    auth: tuple[str, str] | None,
    deadline: float,
    process: subprocess.Popen[bytes],
    log_path: Path,
    name: str,
) -> None:
    last_error = "no answer yet"
    while True:
        if process.poll() is not None:
            raise ServerError(f"{name} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            response = httpx.get(url, auth=auth, timeout=2.0)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.perf_counter() > deadline:
            raise ServerError(f"{name} not ready at {url} ({last_error}):\n{_tail(log_path)}")
        time.sleep(0.05)


# -- Orthanc -------------------------------------------------------------------------------------


@dataclass
class OrthancHandle:
    """A running Orthanc with the DICOMweb plugin."""

    rest_url: str
    dicomweb_url: str
    username: str
    password: str
    port: int
    pid: int
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    startup_s: float = 0.0

    @property
    def auth(self) -> tuple[str, str]:
        """Return (username, password) for httpx."""
        return (self.username, self.password)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of Orthanc's log."""
        return _tail(self.log_path, lines)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop Orthanc (this PID only)."""
        _stop_process(self.process, timeout_s)


def _find_orthanc() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)


def build_bind_shim() -> Path:
    """Compile tools/bind_localhost.c into .medagent/build when missing or older than the source.

    Raises:
        ServerToolMissingError: gcc is not installed and the library is not built yet.
        ServerError: compilation failed.
    """
    target = BUILD_DIR / "bind_localhost.so"
    if target.is_file() and target.stat().st_mtime >= SHIM_SOURCE.stat().st_mtime:
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ServerToolMissingError("gcc is not on PATH (needed to build tools/bind_localhost.c)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent sessions never load a half-written file.
    partial = BUILD_DIR / f".bind_localhost.{os.getpid()}.{uuid.uuid4().hex}.so"
    result = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(partial), str(SHIM_SOURCE), "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ServerError(f"building {SHIM_SOURCE} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
    return target


def orthanc_config(workdir: Path, port: int, username: str, password: str) -> dict[str, Any]:
    """Return the Orthanc configuration used for tests (storage under ``workdir``)."""
    return {
        "Name": "medagent-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "DicomServerEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
        # Without Host, RetrieveURL in STOW/QIDO answers loses the port.
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{port}"},
    }


def start_orthanc(
    workdir: Path, username: str, password: str, *, timeout_s: float = 30.0, attempts: int = 3
) -> OrthancHandle:
    """Start Orthanc + DICOMweb on a free 127.0.0.1 port, with basic auth, and wait until ready.

    Args:
        workdir: holds the config, storage, index and log.
        username: the one registered user.
        password: that user's password.
        timeout_s: how long to wait for readiness (per attempt).
        attempts: tries with a new port when the chosen one was taken in the meantime.

    Raises:
        ServerToolMissingError: Orthanc, its DICOMweb plugin or gcc (for the shim) is missing.
        ServerError: Orthanc did not start, or listens beyond loopback; the message holds its log tail.
    """
    orthanc = _find_orthanc()
    if orthanc is None:
        raise ServerToolMissingError("Orthanc is not installed (Debian packages: orthanc orthanc-dicomweb)")
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        raise ServerToolMissingError(
            f"the Orthanc DICOMweb plugin is missing at {ORTHANC_DICOMWEB_PLUGIN} (package orthanc-dicomweb)"
        )
    shim = build_bind_shim()
    workdir.mkdir(parents=True, exist_ok=True)

    last_error: ServerError | None = None
    for attempt in range(1, attempts + 1):
        port = free_port()
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(orthanc_config(workdir, port, username, password), indent=2))
        log_path = workdir / f"orthanc-{attempt}.log"
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(p for p in (str(shim), env.get("LD_PRELOAD", "")) if p)
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [orthanc, str(config_path)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        rest_url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(
                f"{rest_url}/system",
                (username, password),
                started + timeout_s,
                process,
                log_path,
                "Orthanc",
            )
            _check_loopback_only(port, "Orthanc")
        except ServerError as exc:
            _stop_process(process, 10.0)
            last_error = exc
            continue
        except BaseException:
            _stop_process(process, 10.0)
            raise
        return OrthancHandle(
            rest_url=rest_url,
            dicomweb_url=f"{rest_url}/dicom-web",
            username=username,
            password=password,
            port=port,
            pid=process.pid,
            log_path=log_path,
            process=process,
            startup_s=time.perf_counter() - started,
        )
    assert last_error is not None
    raise last_error


# -- loaders -------------------------------------------------------------------------------------


def _rewrite_urn_references(node: Any, placeholders: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                placeholders.get(v, v)
                if k == "reference" and isinstance(v, str)
                else _rewrite_urn_references(v, placeholders)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_urn_references(item, placeholders) for item in node]
    return node


def _fhir_post(client: httpx.Client, base_url: str, bundle: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """Send one batch/transaction Bundle; return its response entries, all of them 2xx.

    Raises:
        ServerError: the server refused the bundle or any entry in it.
    """
    response = client.post(
        base_url.rstrip("/") + "/",
        json=bundle,
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
    )
    if response.status_code >= 300:
        raise ServerError(
            f"loading {source} into {base_url} failed: HTTP {response.status_code}: {response.text[:1000]}"
        )
    answered: list[dict[str, Any]] = [e for e in response.json().get("entry") or [] if isinstance(e, dict)]
    for index, entry in enumerate(answered):
        status = str((entry.get("response") or {}).get("status", ""))
        if not status.startswith("2"):
            raise ServerError(f"loading {source}: entry {index} answered {status!r}: {entry}")
    return answered


def _entry_id(entry: dict[str, Any]) -> str | None:
    """Return the id a bundle entry's resource has, or that its ``urn:uuid:`` fullUrl gives it.

    The same rule the bundle folder source (``agent/sources/fhir_bundle_dir.py``) applies, so a
    loaded server and the folder name every resource alike.
    """
    resource = entry.get("resource")
    rid = resource.get("id") if isinstance(resource, dict) else None
    if isinstance(rid, str) and rid:
        return rid
    full_url = entry.get("fullUrl")
    if isinstance(full_url, str) and full_url.startswith(_URN_UUID):
        return full_url.removeprefix(_URN_UUID)
    return None


def _keeping_id(entry: dict[str, Any]) -> dict[str, Any]:
    """Return a transaction entry, its plain ``POST Type`` turned into ``PUT Type/<id>`` when the id is known."""
    raw_request = entry.get("request")
    request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
    resource = entry.get("resource")
    rid = _entry_id(entry)
    if not isinstance(resource, dict) or not rid:
        return entry
    rtype = resource.get("resourceType")
    plain_create = (
        str(request.get("method", "")).upper() == "POST"
        and request.get("url") == rtype
        and not request.get("ifNoneExist")
    )
    if not plain_create:
        return entry
    return {**entry, "resource": {**resource, "id": rid}, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}


def _as_transaction_entries(data: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """Return PUT/POST entries for a bundle of any type or a single resource.

    Entries of a transaction or batch keep their request, except that a plain ``POST Type`` whose
    resource has an id (in the resource, or as the uuid of a ``urn:uuid:`` fullUrl, as Synthea
    writes them) becomes ``PUT Type/<id>``: a server assigns new ids on POST, so the loaded record
    would no longer match the same bundle read from a folder. Conditional creates (``ifNoneExist``)
    are left as they are; :func:`load_fhir_bundles` resolves them first.
    """
    if data.get("resourceType") != "Bundle":
        items = [{"resource": data}]
    elif data.get("type") in ("transaction", "batch"):
        return [_keeping_id(e) for e in data.get("entry") or [] if isinstance(e, dict)]
    else:
        items = [e for e in data.get("entry") or [] if isinstance(e, dict) and "resource" in e]
    entries = []
    for item in items:
        resource = item["resource"]
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not rtype:
            raise ServerError(f"{source}: an entry has no resourceType")
        entry: dict[str, Any] = {"resource": resource}
        if item.get("fullUrl"):
            entry["fullUrl"] = item["fullUrl"]
        # With an id, PUT keeps it (update-as-create); without one the server assigns it.
        entry["request"] = {"method": "PUT", "url": f"{rtype}/{rid}"} if rid else {"method": "POST", "url": rtype}
        entries.append(entry)
    return entries


def _is_conditional_create(entry: dict[str, Any]) -> bool:
    request = entry.get("request") or {}
    return str(request.get("method", "")).upper() == "POST" and bool(request.get("ifNoneExist"))


def _resolve_conditional_creates(
    client: httpx.Client, base_url: str, entries: list[dict[str, Any]], source: Path
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Resolve ``POST`` + ``ifNoneExist`` entries before the rest of their bundle is sent.

    The engine runs a transaction holding a conditional create under strict isolation and then
    refuses more than 8 entries, and a matched conditional create points its fullUrl at a
    resource whose id only the server knows. So each one is resolved here, in bundle order: an
    existing match (exactly one) is reused and the entry dropped; with no match the entry becomes a
    ``PUT`` under its own id (kept, as for plain creates), or, without an id, is created on its
    own so the server's id can be read back. A second entry with the same criteria reuses the
    first one's resource, as it would inside one transaction. A reused match is the one case where
    the server and a bundle folder name a resource differently: the folder keeps the bundle's copy.

    Returns:
        The entries left to send, and ``fullUrl -> Type/id`` for every resolved entry that has one.

    Raises:
        ServerError: a search for the criteria failed or matched more than one resource (HTTP 412
            in FHIR's terms), or the server refused a create.
    """
    remaining: list[dict[str, Any]] = []
    resolved: dict[str, str] = {}
    by_criteria: dict[tuple[str, str], str] = {}
    for entry in entries:
        if not _is_conditional_create(entry):
            remaining.append(entry)
            continue
        request = entry["request"]
        rtype, criteria = str(request["url"]), str(request["ifNoneExist"])
        full_url = entry.get("fullUrl")
        reference = by_criteria.get((rtype, criteria))
        if reference is None:
            response = client.get(
                f"{base_url.rstrip('/')}/{rtype}?{criteria}", headers={"Accept": "application/fhir+json"}
            )
            if response.status_code != 200:
                raise ServerError(
                    f"loading {source}: search {rtype}?{criteria} for a conditional create answered "
                    f"HTTP {response.status_code}: {response.text[:500]}"
                )
            matches = [e["resource"] for e in response.json().get("entry") or [] if isinstance(e.get("resource"), dict)]
            if len(matches) > 1:
                raise ServerError(
                    f"loading {source}: conditional create {rtype}?{criteria} matches {len(matches)} resources"
                )
            rid = _entry_id(entry)
            if matches:
                reference = f"{rtype}/{matches[0]['id']}"
            elif rid:
                reference = f"{rtype}/{rid}"
                remaining.append(
                    {
                        **entry,
                        "resource": {**entry["resource"], "id": rid},
                        "request": {"method": "PUT", "url": reference},
                    }
                )
            else:
                answered = _fhir_post(
                    client, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, source
                )
                location = str((answered[0].get("response") or {}).get("location", "")) if answered else ""
                # Location is Type/id[/_history/v], possibly absolute.
                parts = location.split("/_history/")[0].rstrip("/").split("/")
                if len(parts) < 2:
                    raise ServerError(f"loading {source}: no location for the created {rtype}: {answered}")
                reference = f"{parts[-2]}/{parts[-1]}"
            by_criteria[(rtype, criteria)] = reference
        if isinstance(full_url, str) and full_url:
            resolved[full_url] = reference
    return remaining, resolved


def _chunks(entries: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def load_fhir_bundles(
    base_url: str,
    paths: Iterable[Path],
    *,
    auth: tuple[str, str] | None = None,
    timeout_s: float = 60.0,
) -> int:
    """POST each bundle file to the server's base as a transaction; return the entries loaded.

    Resource ids are kept, so the server holds the same ``Type/id`` the bundle folder source
    (``agent/sources/fhir_bundle_dir.py``) reads from the same files:

    - fixture bundles are transactions whose entries ``PUT`` to ``Type/<uuid>`` (Medplum accepts
      update-as-create); other bundle types and single resources become such a transaction;
    - a transaction's plain ``POST`` entries (Synthea's form: ``fullUrl: urn:uuid:<id>``, the
      resource's id equal to it) are sent as ``PUT Type/<id>`` instead;
    - conditional creates (``ifNoneExist``) are resolved first (see
      :func:`_resolve_conditional_creates`).

    ``urn:uuid:`` references are rewritten to ``Type/id``, which keeps them resolving when a
    bundle is split: Medplum refuses transactions with more than 50 update entries, so a larger
    bundle is sent in chunks. Each chunk is all-or-nothing; a failure leaves earlier chunks loaded.

    Raises:
        ServerError: a file is not JSON, or the server refused a bundle or an entry.
    """
    loaded = 0
    with httpx.Client(timeout=timeout_s, auth=auth) as client:
        for path in paths:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ServerError(f"cannot read FHIR file {path}: {exc}") from exc
            entries = _as_transaction_entries(data, Path(path))
            planned = len(entries)
            entries, placeholders = _resolve_conditional_creates(client, base_url, entries, Path(path))
            # Conditional creates matched to an existing resource, or created on their own.
            loaded += planned - len(entries)
            for entry in entries:
                url = str((entry.get("request") or {}).get("url", ""))
                full_url = str(entry.get("fullUrl", ""))
                if full_url.startswith(_URN_UUID) and "/" in url and "?" not in url:
                    placeholders[full_url] = url
            if placeholders:
                entries = [_rewrite_urn_references(e, placeholders) for e in entries]
            for chunk in _chunks(entries, MEDPLUM_MAX_TRANSACTION_UPDATES):
                _fhir_post(
                    client, base_url, {"resourceType": "Bundle", "type": "transaction", "entry": chunk}, Path(path)
                )
                loaded += len(chunk)
    return loaded


def _multipart_related(files: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"medagent-{uuid.uuid4().hex}"
    body = bytearray()
    for content in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        body += content
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode("ascii")
    return bytes(body), f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def stow_dicom(
    dicomweb_url: str,
    auth: tuple[str, str] | None,
    paths: Iterable[Path],
    *,
    batch_size: int = 20,
    timeout_s: float = 120.0,
) -> int:
    """Store DICOM Part 10 files with STOW-RS (``POST {dicomweb}/studies``); return how many were stored.

    Raises:
        ServerError: the server refused the request or reported failed instances.
    """
    stored = 0
    files = [Path(p) for p in paths]
    with httpx.Client(timeout=timeout_s, auth=auth) as client:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            body, content_type = _multipart_related([p.read_bytes() for p in batch])
            response = client.post(
                dicomweb_url.rstrip("/") + "/studies",
                content=body,
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            )
            if response.status_code in (401, 403):
                raise ServerError(f"STOW-RS to {dicomweb_url}: authentication failed (HTTP {response.status_code})")
            if response.status_code != 200:
                raise ServerError(
                    f"STOW-RS to {dicomweb_url} failed: HTTP {response.status_code}: {response.text[:1000]}"
                )
            answer = response.json()
            failed = (answer.get("00081198") or {}).get("Value") if isinstance(answer, dict) else None
            if failed:
                raise ServerError(f"STOW-RS to {dicomweb_url}: {len(failed)} instance(s) failed: {failed}")
            referenced = (answer.get("00081199") or {}).get("Value") or []
            stored += len(referenced)
    return stored


def fixture_fhir_files(fixtures_dir: Path) -> list[Path]:
    """Return the fixture FHIR bundles, sorted."""
    return sorted((fixtures_dir / "fhir").glob("*.json"))


def fixture_dicom_files(fixtures_dir: Path) -> list[Path]:
    """Return every ``*.dcm`` below the fixture DICOM folder, sorted."""
    return sorted((fixtures_dir / "dicom").rglob("*.dcm"))
