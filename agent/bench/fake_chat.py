"""A fast fake OpenAI-compatible MedGemma endpoint on 127.0.0.1, for the service benchmark.

It answers at once, citing the first record tags of the prompt, so the benchmark measures what
the service adds around a model call (HTTP, SSE, threads, trace), not the model. It speaks the
same protocol as vLLM or ``transformers serve``: ``GET /v1/models`` and streaming or plain
``POST /v1/chat/completions``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TAG = re.compile(r"\[([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})\]")


def _answer(payload: dict[str, Any]) -> str:
    """Cite the first three distinct record tags of the last user turn (a plausible, checkable answer)."""
    messages = payload.get("messages") or [{}]
    content = messages[-1].get("content", "")
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    tags = list(dict.fromkeys(TAG.findall(str(content))))[:3]
    return " ".join(f"Finding {n} [{tag}]." for n, tag in enumerate(tags, 1)) or "Nothing relevant was found."


class _Handler(BaseHTTPRequestHandler):
    server: FakeChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:  # no request logging: prompts carry record text
        return None

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            body = json.dumps({"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
            self._send(200, body.encode(), "application/json")
        else:
            self._send(404, b"{}", "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}")
        text = _answer(payload)
        usage = {"prompt_tokens": len(json.dumps(payload)) // 4, "completion_tokens": len(text.split())}
        if not payload.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            body: dict[str, Any] = {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            self._send(200, json.dumps({**body, "usage": usage}).encode(), "application/json")
            return
        events: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            for word in text.split()
        ]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({"choices": [], "usage": usage})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, stream.encode(), "text/event-stream")


class FakeChatServer(ThreadingHTTPServer):
    """Serve the fake endpoint from a background thread until :meth:`close`."""

    daemon_threads = True

    def __init__(self, model: str = "fake-medgemma") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model = model
        self._thread = threading.Thread(target=self.serve_forever, name="fake-chat", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root (``.../v1``)."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.shutdown()
        self.server_close()
        self._thread.join(5)
