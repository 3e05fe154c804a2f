"""Reading .tqz files named by URL: ranges for random access (spec §10.2), a body for streaming (§10.1).

``http://`` and ``https://`` go through fsspec's HTTP file system (aiohttp underneath); any other
scheme fsspec has a plugin for (``s3://``, ``gs://``, ``memory://``, ...) goes through that plugin.
Both need the optional extra ``pip install 'tqcodec[remote]'`` (fsspec, aiohttp); without it a URL
gives ``TqzError(BAD_OPTION)``: the caller asked for something this installation cannot do, and
no retry would help (IO_ERROR is kept for reads that were tried and failed).

Random access over HTTP costs, for a file whose index fits in the last ``TAIL_BYTES`` bytes:
one suffix range request (footer, index, and the file's length from ``Content-Range``), one
request for the header and manifest, then one request per tensor. A file no longer than
``TAIL_BYTES`` is read whole by the first request. Every response is checked before it is
used: a server that ignores ``Range`` (HTTP 200), answers a different range, or sends a short
or long body gives a TqzError, never bytes from the wrong place. (The CRCs of spec §9 and §6
would catch most such bytes anyway; these checks name the cause.)
"""
from __future__ import annotations

import io
import re
import threading
from typing import Any, Optional

from ..errors import TqzError, fail

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
TAIL_BYTES = 64 << 10
"""The first request of random access reads this many bytes from the end of the file."""
STREAM_PIECE = 1 << 20
INSTALL_HINT = "pip install 'tqcodec[remote]'"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def is_url(source: object) -> bool:
    """True for a string with a scheme (``http://...``, ``s3://...``)."""
    return isinstance(source, str) and bool(URL_RE.match(source))


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's file system for ``url`` and the path in it; BAD_OPTION if it is not installed."""
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise fail("BAD_OPTION", f"reading URLs needs fsspec: {INSTALL_HINT}", url) from None
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise fail("BAD_OPTION", f"reading http(s) URLs needs aiohttp: {INSTALL_HINT}", url) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise fail("BAD_OPTION", f"no fsspec file system for {scheme}:// is installed ({exc})", url) from None
    except ValueError as exc:
        raise fail("BAD_OPTION", f"fsspec does not know the scheme {scheme}:// ({exc})", url) from None


def _is_http(fs: Any) -> bool:
    try:
        from fsspec.implementations.http import HTTPFileSystem
    except ImportError:
        return False
    return isinstance(fs, HTTPFileSystem)


def _transport_error(exc: BaseException, url: str, what: str) -> TqzError:
    """A TqzError for a failure of the transport (aiohttp, fsspec, the OS)."""
    if isinstance(exc, TqzError):
        return exc
    name = type(exc).__name__
    if name in ("ClientPayloadError", "ContentLengthError", "TransferEncodingError", "IncompleteReadError"):
        return fail("TRUNCATED", f"the connection closed before the end of {what} ({name}: {exc})", url)
    if isinstance(exc, FileNotFoundError):
        return fail("IO_ERROR", "not found (HTTP 404 or no such object)", url)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    return fail("IO_ERROR", f"cannot read {what}: {name}: {msg[:300]}", url)


class RangeSource:
    """Random access to a remote file: ``size``, ``read_at(offset, length)``, request counts.

    Thread-safe (the HTTP requests run on fsspec's event loop thread).
    """

    def __init__(self, url: str, tail_bytes: Optional[int] = None):
        tail_bytes = TAIL_BYTES if tail_bytes is None else tail_bytes
        self.url = url
        self.fs, self.path = _filesystem(url)
        self.http = _is_http(self.fs)
        self.requests = 0
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._etag: Optional[str] = None
        self._cache_start = 0
        self._cache = b""
        try:
            if self.http:
                self._open_http(tail_bytes)
            else:
                self._open_fsspec(tail_bytes)
        except Exception as exc:  # noqa: BLE001 - every transport failure becomes a TqzError
            raise _transport_error(exc, url, "the end of the file") from None

    # --- HTTP: fsspec's aiohttp session, checking status and Content-Range ourselves -------------

    def _open_http(self, tail_bytes: int) -> None:
        status, headers, body = self._http_get(f"bytes=-{tail_bytes}", tail_bytes, "the end of the file")
        if status == 416:  # a suffix range of an empty file is unsatisfiable
            m = _UNSATISFIED.match(headers.get("Content-Range", ""))
            if not m:
                raise fail("IO_ERROR", "server refused the range request (HTTP 416)", self.url)
            self.size = int(m.group(1))
            return
        start, end, total = self._check_range(headers, None, None)
        if total is None:
            raise fail("IO_ERROR", "server did not give the file's length in Content-Range", self.url)
        if end != total - 1 or start != max(0, total - tail_bytes):
            raise fail("IO_ERROR", f"server answered bytes {start}-{end}/{total} to a request for the "
                                   f"last {tail_bytes} bytes", self.url)
        if len(body) != end - start + 1:
            raise fail("TRUNCATED", f"server sent {len(body)} of the {end - start + 1} bytes of "
                                    f"the end of the file", self.url)
        self.size = total
        self._cache_start, self._cache = start, body
        etag = headers.get("ETag")
        if etag and not etag.startswith("W/"):
            self._etag = etag  # later ranges must come from the same version of the file (If-Range)

    def _check_range(self, headers: Any, start: Optional[int], end: Optional[int],
                     ) -> tuple[int, int, Optional[int]]:
        enc = headers.get("Content-Encoding", "identity").lower()
        if enc not in ("identity", ""):
            raise fail("IO_ERROR", f"server sent a range with Content-Encoding {enc}", self.url)
        m = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if not m:
            raise fail("IO_ERROR", "server answered a range request (HTTP 206) without a valid Content-Range",
                       self.url)
        a, b = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        if start is not None and (a, b) != (start, end):
            raise fail("IO_ERROR", f"server answered bytes {a}-{b} to a request for bytes {start}-{end}", self.url)
        return a, b, total

    def _http_get(self, range_header: str, expect: int, what: str) -> tuple[int, Any, bytes]:
        from fsspec.asyn import sync
        return sync(self.fs.loop, self._http_get_async, range_header, expect, what)

    async def _http_get_async(self, range_header: str, expect: int, what: str) -> tuple[int, Any, bytes]:
        session = await self.fs.set_session()
        kw = dict(self.fs.kwargs)
        headers = dict(kw.pop("headers", None) or {})
        headers["Range"] = range_header
        headers["Accept-Encoding"] = "identity"
        if self._etag:
            headers["If-Range"] = self._etag
        with self._lock:
            self.requests += 1
        async with session.get(self.fs.encode_url(self.url), headers=headers, **kw) as r:
            if r.status == 404:
                raise fail("IO_ERROR", "not found (HTTP 404)", self.url)
            if r.status == 200:
                raise fail("IO_ERROR", "server answered a range request with the whole file (HTTP 200): it "
                                       "does not support Range requests, or the file changed since it was "
                                       "opened; stream it instead (tqcodec.iter_tensors(url), tqz decode URL)",
                           self.url)
            if r.status == 416:
                return r.status, r.headers, b""
            if r.status != 206:
                raise fail("IO_ERROR", f"HTTP {r.status} {r.reason or ''}".rstrip(), self.url)
            parts = []
            got = 0
            while True:  # never more than asked for, whatever the server sends
                b = await r.content.read(min(STREAM_PIECE, expect + 1 - got))
                if not b:
                    break
                parts.append(b)
                got += len(b)
                if got > expect:
                    raise fail("IO_ERROR", f"server sent more than the {expect} bytes of {what}", self.url)
            body = b"".join(parts)
            with self._lock:
                self.bytes_read += len(body)
            return r.status, r.headers, body

    def _read_http(self, off: int, n: int) -> bytes:
        what = f"bytes {off}-{off + n - 1}"
        status, headers, body = self._http_get(f"bytes={off}-{off + n - 1}", n, what)
        if status == 416:
            raise fail("TRUNCATED", f"server has no {what} (HTTP 416): the file is shorter than it was",
                       self.url)
        start, end, total = self._check_range(headers, off, off + n - 1)
        if total is not None and total != self.size:
            raise fail("IO_ERROR", f"the file's length changed from {self.size} to {total} bytes", self.url)
        if len(body) != n:
            raise fail("TRUNCATED", f"server sent {len(body)} of the {n} bytes of {what}", self.url)
        return body

    # --- any other fsspec file system -----------------------------------------------------------

    def _open_fsspec(self, tail_bytes: int) -> None:
        with self._lock:
            self.requests += 1
        self.size = int(self.fs.size(self.path))
        start = max(0, self.size - tail_bytes)
        if self.size:
            self._cache = self._read_fsspec(start, self.size - start)
            self._cache_start = start

    def _read_fsspec(self, off: int, n: int) -> bytes:
        with self._lock:
            self.requests += 1
        data = self.fs.cat_file(self.path, start=off, end=off + n)
        with self._lock:
            self.bytes_read += len(data)
        if len(data) != n:
            raise fail("TRUNCATED", f"read {len(data)} of the {n} bytes at offset {off}", self.url)
        return bytes(data)

    # --- the read_at of spec §10.2 ------------------------------------------------------------------

    @property
    def fully_cached(self) -> bool:
        """The first request read the whole file (then nothing else is ever requested)."""
        return self._cache_start == 0 and len(self._cache) == self.size

    def read_at(self, off: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``off`` (fewer only at the end of the file)."""
        n = max(0, min(n, self.size - off))
        if n == 0:
            return b""
        c0 = self._cache_start
        if c0 <= off and off + n <= c0 + len(self._cache):
            return self._cache[off - c0:off - c0 + n]
        try:
            return self._read_http(off, n) if self.http else self._read_fsspec(off, n)
        except Exception as exc:  # noqa: BLE001
            raise _transport_error(exc, self.url, f"bytes {off}-{off + n - 1}") from None

    def close(self) -> None:
        self._cache = b""


class StreamReader(io.RawIOBase):
    """A remote file's body as a non-seekable binary stream (one GET over HTTP), for spec §10.1.

    A connection that closes early raises TqzError(TRUNCATED); other failures IO_ERROR.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.fs, self.path = _filesystem(url)
        self.http = _is_http(self.fs)
        self.bytes_read = 0
        self._resp: Any = None
        self._file: Any = None
        try:
            if self.http:
                from fsspec.asyn import sync
                self._resp = sync(self.fs.loop, self._start_http)
            else:
                self._file = self.fs.open(self.path, "rb")
        except Exception as exc:  # noqa: BLE001
            raise _transport_error(exc, url, "the file") from None

    async def _start_http(self) -> Any:
        session = await self.fs.set_session()
        kw = dict(self.fs.kwargs)
        headers = dict(kw.pop("headers", None) or {})
        r = await session.get(self.fs.encode_url(self.url), headers=headers, **kw)
        if r.status != 200:
            r.release()
            if r.status == 404:
                raise fail("IO_ERROR", "not found (HTTP 404)", self.url)
            raise fail("IO_ERROR", f"HTTP {r.status} {r.reason or ''}".rstrip(), self.url)
        return r

    @staticmethod
    async def _close_http(resp: Any) -> None:
        resp.close()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            if self.http:
                from fsspec.asyn import sync
                data = sync(self.fs.loop, self._resp.content.read, len(b))
            else:
                data = self._file.read(len(b))
        except Exception as exc:  # noqa: BLE001
            raise _transport_error(exc, self.url, "the file") from None
        n = len(data)
        b[:n] = data
        self.bytes_read += n
        return n

    def close(self) -> None:
        if not self.closed:
            if self._resp is not None:
                resp, self._resp = self._resp, None
                try:  # drop the connection (a half-read body cannot be reused), on the loop's thread
                    from fsspec.asyn import sync
                    sync(self.fs.loop, self._close_http, resp, timeout=5)
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


def open_range(url: str) -> RangeSource:
    """Random access to ``url`` (spec §10.2)."""
    return RangeSource(url)


def open_stream(url: str) -> io.BufferedReader:
    """``url``'s bytes front to back, buffered (spec §10.1)."""
    return io.BufferedReader(StreamReader(url), STREAM_PIECE)


__all__ = ["RangeSource", "StreamReader", "is_url", "open_range", "open_stream", "TAIL_BYTES"]
