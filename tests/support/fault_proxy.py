"""A fault-injecting HTTP proxy for resilience tests of the FHIR client.

Where it sits: tests put it on 127.0.0.1 in front of the live FHIR engine (the session's
``fhir_server``), point :class:`agent.sources.fhir_http.HttpFhirSource` at :attr:`FaultProxy.base_url`
and script what goes wrong, per request, with rules keyed by a path regex. Requests no rule
claims are forwarded untouched, so success after the faults is the real server's answer over
real HTTP.

Example::

    with FaultProxy(fhir_server.base_url) as proxy:
        proxy.add_rule(r"^Patient/", [Fault.status_code(503), Fault.status_code(503)])
        ...  # the first two Patient reads get 503, the third reaches the server
        assert proxy.actions() == ["503", "503", "forward"]
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from typing import Self
from urllib.parse import urlsplit

from tests.support.http_handlers import LoopbackServer, send


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, applied to one request.

    Build them with the class methods; ``kind`` is what :meth:`FaultProxy.actions` reports.
    """

    kind: str
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay_s: float = 0.0

    @classmethod
    def status_code(cls, status: int, *, retry_after: str | None = None, body: bytes = b"") -> Fault:
        """Answer with ``status`` (429, 500, 502, 503...), optionally with a ``Retry-After`` header."""
        headers = (("Retry-After", retry_after),) if retry_after is not None else ()
        return cls(str(status), status=status, headers=headers, body=body)

    @classmethod
    def retry_after_date(cls, status: int, when: datetime) -> Fault:
        """Answer with ``status`` and ``Retry-After`` as an HTTP-date (``when`` is an aware datetime)."""
        return cls.status_code(status, retry_after=format_datetime(when, usegmt=True))

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before forwarding, so a client with a shorter timeout gives up."""
        return cls("delay", delay_s=seconds)

    @classmethod
    def close(cls) -> Fault:
        """Close the connection without sending any response."""
        return cls("close")

    @classmethod
    def invalid_json(cls) -> Fault:
        """Answer 200 with a FHIR content type and a body that is not JSON."""
        return cls("invalid-json", status=200, body=b'{"resourceType": "Bundle", "entry": [')

    @classmethod
    def outcome(cls, status: int, *, severity: str = "error", code: str = "invalid", diagnostics: str = "") -> Fault:
        """Answer ``status`` with an OperationOutcome body carrying one issue."""
        issue = {"severity": severity, "code": code, **({"diagnostics": diagnostics} if diagnostics else {})}
        body = json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()
        return cls(f"outcome-{status}", status=status, body=body)

    @classmethod
    def corrupt(cls) -> Fault:
        """Forward, then break the first resource of the answer (or of its Bundle) so it fails validation.

        The resource keeps its type and id; ``meta`` becomes a string, which no FHIR model accepts.
        """
        return cls("corrupt")

    @classmethod
    def forward(cls) -> Fault:
        """Forward untouched (a placeholder in a script, e.g. fail, pass, fail)."""
        return cls("forward")


@dataclass
class Record:
    """What the proxy did with one request."""

    method: str
    path: str
    action: str
    upstream_status: int | None = None


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    faults: deque[Fault] = field(default_factory=deque)


class FaultProxy(LoopbackServer):
    """A threaded HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and injects scripted faults.

    Rules are tried in the order they were added; a request whose path (relative to the upstream
    base, query included, e.g. ``"Patient/p1"`` or ``"Condition?patient=p1"``) matches a rule with
    faults left takes the next one. Exhausted rules stay but no longer match.

    Args:
        upstream: the upstream FHIR base URL (``http://`` only; tests run on loopback).
        timeout_s: how long to wait on the upstream for one forwarded request.
    """

    thread_name = "fault-proxy"

    def __init__(self, upstream: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(upstream.rstrip("/"))
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy forwards to plain http only, not {upstream!r}")
        super().__init__(parts.hostname, parts.port or 80, timeout_s)
        self._prefix = parts.path  # e.g. "" or "/fhir"
        self._rules: list[_Rule] = []
        self._records: list[Record] = []
        self._lock = threading.Lock()
        # Set on stop so handlers sleeping in a delay fault return at once.
        self._stopping = threading.Event()
        self.base_url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start listening on a free 127.0.0.1 port and serving in a daemon thread."""
        super().start()
        self.base_url = f"{self.origin}{self._prefix}"
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (this proxy only)."""
        self._stopping.set()
        super().stop()

    # -- script and record ---------------------------------------------------------------------

    def add_rule(self, path_regex: str, faults: list[Fault]) -> None:
        """Apply ``faults`` one per request, in order, to requests whose relative path matches."""
        with self._lock:
            self._rules.append(_Rule(re.compile(path_regex), deque(faults)))

    def clear(self) -> None:
        """Drop every rule and record."""
        with self._lock:
            self._rules.clear()
            self._records.clear()

    @property
    def records(self) -> list[Record]:
        """Return a copy of what was done with each request so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def actions(self) -> list[str]:
        """Return just the action of each request (a fault's kind, or ``"forward"``)."""
        return [r.action for r in self.records]

    def _next_fault(self, relative: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.faults and rule.pattern.search(relative):
                    return rule.faults.popleft()
        return None

    def _record(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    # -- request handling (runs in the server's threads) --------------------------------------

    def _relative(self, raw_path: str) -> str:
        path = raw_path
        if self._prefix and path.startswith(self._prefix):
            path = path[len(self._prefix) :]
        return path.lstrip("/")

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Serve one request: apply the next matching fault, else forward it."""
        relative = self._relative(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        fault = self._next_fault(relative)
        record = Record(handler.command, relative, fault.kind if fault else "forward")
        self._record(record)
        if fault is None or fault.kind == "forward":
            status, headers, payload = self.forward(handler, body)
            record.upstream_status = status
            send(handler, status, headers, payload)
        elif fault.kind == "close":
            # Drop the socket without a byte of response; the client sees a protocol error.
            handler.close_connection = True
        elif fault.kind == "delay":
            if self._stopping.wait(fault.delay_s):
                return
            status, headers, payload = self.forward(handler, body)
            record.upstream_status = status
            send(handler, status, headers, payload)
        elif fault.kind == "corrupt":
            status, headers, payload = self.forward(handler, body)
            record.upstream_status = status
            send(handler, status, headers, _corrupt(payload))
        else:
            headers = [("Content-Type", "application/fhir+json"), *fault.headers]
            send(handler, fault.status, headers, fault.body)


def _corrupt(payload: bytes) -> bytes:
    """Return the body with its first resource (or first Bundle entry's) made invalid."""
    data = json.loads(payload)
    target = data
    if data.get("resourceType") == "Bundle" and data.get("entry"):
        target = data["entry"][0]["resource"]
    target["meta"] = "corrupted-by-fault-proxy"
    return json.dumps(data).encode()
