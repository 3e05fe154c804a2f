"""A real HTTP/1.1 server on 127.0.0.1 for the remote and streaming tests (and benchmarks/serve.py).

Serves in-memory files with single-range ``Range`` support (``bytes=a-b``, ``bytes=a-``,
``bytes=-n``), counts every request and the body bytes it sent, and misbehaves on demand:

- ``ignore_range``: answer every request with 200 and the whole body;
- ``short``: send only half of each body (with an honest, smaller Content-Length and a
  Content-Range that still claims the whole range asked for);
- ``drop_after``: close the connection after this many body bytes of any response, having
  announced the full Content-Length (a connection lost mid-file);
- ``slow``: seconds to sleep between 64 KiB pieces of a body.

Bounded: after ``max_requests`` requests every further one gets 503, so a client that loops
cannot hang a test; ``ServerThread`` stops the server on exit.
"""
from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from typing import Optional

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do (nginx tcp_nodelay): no 40 ms delayed-ACK stalls
    server: "RangeServer"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.log.append((self.command, self.path, self.headers.get("Range")))
            over = srv.requests > srv.max_requests
        if over:
            self._simple(503, b"too many requests")
            return
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self._simple(404, b"not found")
            return
        size = len(data)
        rng = self.headers.get("Range")
        status, start, end = 200, 0, size - 1
        if rng and not srv.ignore_range:
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._simple(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                self._simple(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        body = data[start:end + 1]
        announced = len(body)
        if srv.short:
            body = body[:len(body) // 2]
            announced = len(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "none" if srv.ignore_range else "bytes")
        self.send_header("Content-Length", str(announced))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        self._send_body(body)

    def _send_body(self, body: bytes) -> None:
        srv = self.server
        limit = srv.drop_after
        pos = 0
        piece = 64 << 10
        try:
            while pos < len(body):
                n = min(piece, len(body) - pos)
                if limit is not None:
                    n = min(n, limit - pos)
                    if n <= 0:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                with srv.lock:  # counted before the write: the client may have read it before this thread runs on
                    srv.bytes_sent += n
                self.wfile.write(body[pos:pos + n])
                pos += n
                if srv.slow:
                    self.wfile.flush()
                    time.sleep(srv.slow)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _simple(self, status: int, body: bytes, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RangeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict, max_requests: int = 100):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files = dict(files)
        self.lock = threading.Lock()
        self.max_requests = max_requests
        self.ignore_range = False
        self.short = False
        self.drop_after: Optional[int] = None
        self.slow = 0.0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.bytes_sent = 0
            self.log: list = []

    def handle_error(self, request: object, client_address: object) -> None:
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client that hung up is not news

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{name}"


class ServerThread:
    """``with ServerThread(files) as srv:`` a running RangeServer, stopped on exit."""

    def __init__(self, files: dict, **kw: object):
        self.server = RangeServer(files, **kw)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
