"""Pieces shared by the test's small HTTP servers (fault proxy, token server): answering and dispatch."""

from __future__ import annotations

from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any


def send(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
    """Answer one request and close the connection; a client that already gave up is ignored."""
    try:
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
        # The client gave up first (e.g. a timeout fault); nothing is left to tell it.
        pass


def handler_class(dispatch: Callable[[BaseHTTPRequestHandler], None]) -> type[BaseHTTPRequestHandler]:
    """Return a request handler class sending every GET/POST/PUT/DELETE to ``dispatch``, quietly."""

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            dispatch(self)

        def do_POST(self) -> None:
            dispatch(self)

        def do_PUT(self) -> None:
            dispatch(self)

        def do_DELETE(self) -> None:
            dispatch(self)

        def log_message(self, format: str, *args: Any) -> None:
            # Test output stays readable; the servers' own records say what happened.
            pass

    return _Handler
