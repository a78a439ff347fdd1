"""Pieces shared by the test's small HTTP servers (fault proxy, token server): answering and dispatch."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


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


#: Headers that belong to one connection, not to the message: never forwarded.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade", "proxy-connection"}
)


class LoopbackServer:
    """A small HTTP server on a free 127.0.0.1 port, served from a daemon thread, in front of an upstream.

    Subclasses implement :meth:`handle` and may extend :meth:`start` / :meth:`stop`.
    """

    thread_name = "loopback-server"

    def __init__(self, upstream_host: str, upstream_port: int, timeout_s: float) -> None:
        self._upstream_host = upstream_host
        self._upstream_port = upstream_port
        self._timeout_s = timeout_s
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.origin = ""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        """Serve one request (runs in the server's threads)."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start listening and serving; ``origin`` becomes ``http://127.0.0.1:<port>``."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class(self.handle))
        server.daemon_threads = True
        self._server = server
        self.origin = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            # A short poll interval keeps stop() quick; the default 0.5 s adds up across tests.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (this server only)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def forward(
        self, handler: BaseHTTPRequestHandler, body: bytes | None, *, drop: frozenset[str] = frozenset()
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request on to the upstream (without hop headers and ``drop``); return its answer.

        The client's Host is kept: the engine builds absolute links from it, so its ``next``
        links point back through this server, as a real gateway would arrange.
        """
        connection = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=self._timeout_s)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_HEADERS | drop}
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_HEADERS]
            return response.status, kept, payload
        finally:
            connection.close()
