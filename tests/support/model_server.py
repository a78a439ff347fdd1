"""OpenAI-compatible servers for the remote MedGemma tests: the real one, and a fault-injecting one.

- :func:`start_transformers_serve` runs ``transformers serve`` (the real OpenAI-compatible peer)
  on a free 127.0.0.1 port with a tiny model, waits for ``/health`` and stops it by its PID.
  It needs the ``transformers[serving]`` extras (fastapi, uvicorn, openai);
  :func:`serve_unavailable_reason` says what is missing.
- :class:`ScriptedChatServer` answers ``/v1/chat/completions`` with scripted replies (429 with
  Retry-After, 5xx, bodies that are not JSON, slow answers, SSE streams) to drive the client's
  retry and error paths, which a healthy real server never takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from tests.support.http_handlers import LoopbackServer, send

VENV_BIN = Path(sys.executable).parent


def serve_unavailable_reason() -> str | None:
    """Return None when ``transformers serve`` can run here, else what is missing."""
    missing = []
    for module in ("fastapi", "uvicorn", "openai"):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, check=False)
        if probe.returncode != 0:
            missing.append(module)
    if missing:
        return f"`transformers serve` needs the transformers[serving] extras; missing: {', '.join(missing)}"
    if not (VENV_BIN / "transformers").exists():
        return f"no `transformers` command in {VENV_BIN}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServedModel:
    """A running ``transformers serve``: its API root and the model name it is pinned to."""

    base_url: str
    model: str
    pid: int
    log: Path


@contextlib.contextmanager
def start_transformers_serve(
    model_dir: Path, log_dir: Path, *, ready_timeout_s: float = 120.0
) -> Iterator[ServedModel]:
    """Run ``transformers serve MODEL_DIR`` on 127.0.0.1 until the block ends; stop it by its PID.

    The server is pinned to ``str(model_dir)``: requests must name exactly that model.

    Raises:
        RuntimeError: when the server exits or does not answer ``/health`` in time (its log tail
            is in the message).
    """
    port = _free_port()
    log = log_dir / f"transformers-serve-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "transformers"),
                "serve",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        origin = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {process.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{origin}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not answer /health in {ready_timeout_s:g} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield ServedModel(base_url=f"{origin}/v1", model=str(model_dir), pid=process.pid, log=log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # The server runs in its own session: signal that process group (our child's), by its PID.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the fault-injecting server --------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer: a status with a JSON (or raw) body, or an SSE stream, maybe late."""

    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes -> sent as is
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay_s: float = 0.0
    events: list[str] | None = None  # SSE "data:" payloads, sent one write each


@dataclass
class SeenRequest:
    """What the client sent: method, path, headers and the decoded JSON body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


def completion(text: str, *, prompt_tokens: int = 7, completion_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    """Return a minimal OpenAI chat completion whose answer is ``text``."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        **extra,
    }


def chunk(content: str | None = None, *, finish_reason: str | None = None, **extra: Any) -> str:
    """Return one SSE chat.completion.chunk payload (JSON text)."""
    delta = {} if content is None else {"content": content}
    return json.dumps(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
    )


class ScriptedChatServer(LoopbackServer):
    """Answers chat completions from a script; ``GET /v1/models`` lists ``models``.

    Replies are taken in order; when the script is empty, a plain completion answers. Every
    request is kept in :attr:`seen`.
    """

    thread_name = "scripted-chat-server"

    def __init__(self, *, models: list[str] | None = None, models_status: int = 200) -> None:
        super().__init__("127.0.0.1", 0, timeout_s=5)
        self.models = models if models is not None else ["medgemma-test"]
        self.models_status = models_status
        self.script: deque[Reply] = deque()
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The OpenAI API root of this server."""
        return f"{self.origin}/v1"

    def chat_requests(self) -> list[SeenRequest]:
        """Return the chat completion requests received so far."""
        return [request for request in self.seen if request.path.endswith("/chat/completions")]

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Serve one request from the script."""
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        with self._lock:
            self.seen.append(SeenRequest(handler.command, handler.path, dict(handler.headers.items()), body))
            if handler.path.endswith("/models"):
                reply = Reply(self.models_status, {"object": "list", "data": [{"id": m} for m in self.models]})
            else:
                reply = self.script.popleft() if self.script else Reply(200, completion("Scripted answer."))
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.events is not None:
            self._send_events(handler, reply)
            return
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        send(handler, reply.status, [("Content-Type", "application/json"), *reply.headers], payload)

    @staticmethod
    def _send_events(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Connection", "close")
            for name, value in reply.headers:
                handler.send_header(name, value)
            handler.end_headers()
            for event in reply.events or []:
                handler.wfile.write(f"data: {event}\n\n".encode())
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
