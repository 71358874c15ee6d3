"""GETs on pooled HTTP/1.1 keep-alive connections, written on asyncio streams.

Why: a run's reads are thousands of GETs (a second day lists every token: 10,000 pages of
100 at 1M rows). Measured against the emulator, a page through the client costs 77-79 µs
of CPU here against 114-118 µs through aiohttp (the GET itself about 45 µs); that day went
from about 3.35 s to 2.85 s of CPU.

It reads answers with :mod:`worker.send.framing` (Content-Length, chunked coding or the
connection's end; 1xx skipped; gzip and deflate undone), verifies TLS as aiohttp does by
default, and keeps idle connections (the most recent first) once an answer was read whole.
Not here: proxies and requests with a body (both stay on aiohttp), redirects, cookies,
pipelining.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

from multidict import CIMultiDict
from yarl import URL

from worker.send.framing import MAX_HEAD, Dropped, decoded, read_body, read_head
from worker.urls import bracketed

_DEFAULT_PORTS = {"http": 80, "https": 443}

Answer = tuple[int, CIMultiDict[str], bytes]


class CannotConnect(Exception):
    """No connection could be made (refused, DNS, TLS): nothing was sent."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class _Stale(Exception):
    """A kept connection was closed by the server before it answered a byte."""


class _Reader(asyncio.StreamReader):
    #: StreamReader's own buffer (absent from the type stubs): what arrived and is unread.
    _buffer: bytearray


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        """Not closed by either side while idle, and nothing unasked-for arrived."""
        reader = self.reader
        return not (self.writer.is_closing() or reader.exception() or reader._buffer
                    or reader.at_eof())  # fmt: skip


class Gets:
    """GETs on ``base``'s origin with ``headers`` on every request; ``timeout`` bounds each."""

    def __init__(
        self, base: URL, headers: Mapping[str, str], *, pool_size: int, timeout: float | None
    ) -> None:
        if base.scheme not in _DEFAULT_PORTS or not base.raw_host:
            raise ValueError(f"cannot GET from {base.scheme}://{base.raw_host}: http or https")
        self._host, self._port = base.raw_host, base.port or _DEFAULT_PORTS[base.scheme]
        self._tail = request_tail(base, headers)
        # The same verification aiohttp applies by default: the system's CAs (SSL_CERT_FILE
        # and SSL_CERT_DIR are honoured), the certificate's name checked against the host.
        # Made once per client: it reads the CA bundle from disk.
        self._ssl = ssl.create_default_context() if base.scheme == "https" else None
        if self._ssl is not None:
            self._ssl.set_alpn_protocols(["http/1.1"])  # as aiohttp: never offered h2
        self._timeout = timeout
        self._size = pool_size
        self._slots = asyncio.Semaphore(pool_size)  # connections open at once, as aiohttp's
        self._idle: list[_Conn] = []  # the most recently used last: taken first
        self._open: set[_Conn] = set()
        self._closed = False
        #: Whether the service ever answered (a status line and headers were read).
        self.answered = False

    async def get(self, url: URL | str) -> Answer:
        """Status, headers and body (at most MAX_BODY_BYTES); raises TimeoutError,
        :class:`CannotConnect` or :class:`Dropped`. A str is the path and query, encoded."""
        path = url if isinstance(url, str) else url.raw_path_qs
        request = b"GET " + path.encode("ascii") + self._tail
        async with asyncio.timeout(self._timeout), self._slots:
            conn = self._take()
            if conn is not None:
                try:
                    return await self._exchange(conn, request, reused=True)
                except _Stale:
                    pass  # closed while idle: GET is idempotent, once more on a new one
            if self._closed:  # close() broke this one off: open nothing it would not close
                raise Dropped("the client was closed")
            return await self._exchange(await self._connect(), request, reused=False)

    async def close(self) -> None:
        """Close every connection, idle or in use; none is kept or opened after."""
        self._closed = True
        for conn in self._open:
            conn.writer.close()
        self._open.clear()
        self._idle.clear()

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: _Conn) -> None:
        conn.writer.close()
        self._open.discard(conn)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        reader = _Reader(limit=MAX_HEAD)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )  # fmt: skip
        except OSError as exc:  # refused, DNS, TLS (ssl.SSLError is an OSError)
            raise CannotConnect(exc) from None
        conn = _Conn(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        self._open.add(conn)
        return conn

    async def _exchange(self, conn: _Conn, request: bytes, *, reused: bool) -> Answer:
        """One GET on ``conn``; it goes back to the pool only when all of it was read."""
        reader = conn.reader
        try:
            conn.writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, OSError) as exc:
                partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
                if reused and not partial and not reader._buffer:
                    raise _Stale from None
                raise
            status, headers, keep = read_head(head)
            self.answered = True
            while 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the next
                status, headers, keep = read_head(await reader.readuntil(b"\r\n\r\n"))
            body, whole = await read_body(reader, status, headers)
            body = decoded(body, headers.get("Content-Encoding"))
        except BaseException as exc:  # cancelled, timed out or broken: never used again
            self._discard(conn)
            if isinstance(exc, asyncio.LimitOverrunError):
                raise Dropped(f"a head or chunk line over {MAX_HEAD} bytes") from None
            if isinstance(exc, (asyncio.IncompleteReadError, OSError)) and not isinstance(
                exc, TimeoutError
            ):
                raise Dropped(f"{type(exc).__name__}: {exc}") from None
            raise
        if (
            keep
            and whole
            and not reader._buffer
            and len(self._idle) < self._size
            and not self._closed
        ):
            self._idle.append(conn)
        else:
            self._discard(conn)
        return status, headers, body


def request_tail(base: URL, headers: Mapping[str, str]) -> bytes:
    """What follows a GET's path: the version, Host (its port when not the scheme's own,
    an IPv6 address in brackets), ``headers``, the empty line."""
    host = bracketed(base.raw_host or "")
    if base.port != _DEFAULT_PORTS[base.scheme]:
        host = f"{host}:{base.port}"
    lines = [f"Host: {host}", *(f"{name}: {value}" for name, value in headers.items())]
    if any(c in line for line in lines for c in "\r\n\0"):
        raise ValueError("a header holds a line break: check the keys for stray characters")
    return (" HTTP/1.1\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()
