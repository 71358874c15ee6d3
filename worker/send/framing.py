"""HTTP/1.1 answers read off a stream: the status line and headers, a body framed by
Content-Length, chunked coding or the connection's end, and its Content-Encoding undone.

What :mod:`worker.send.gets` reads its answers with; anything that is not HTTP/1.x is
:class:`Dropped`.
"""

from __future__ import annotations

import asyncio
import re
import zlib

from multidict import CIMultiDict

from worker.send.answers import MAX_BODY_BYTES

#: Longest status line plus headers read; past it the answer is garbage, not an API's.
MAX_HEAD = 64 * 1024
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_NO_BODY = (204, 304)


class Dropped(Exception):
    """The request went out, but the connection broke or what came back is not HTTP/1.x."""


def read_head(raw: bytes) -> tuple[int, CIMultiDict[str], bool]:
    """Status, headers, and whether the connection may carry another request."""
    lines = raw[:-4].split(b"\r\n")
    line = _STATUS.fullmatch(lines[0])
    if line is None:
        raise Dropped(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for field in lines[1:]:
        name, colon, value = field.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise Dropped(f"a malformed header line: {field[:80]!r}")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    keep = "keep-alive" in tokens if line[1] == b"0" else "close" not in tokens
    return int(line[2]), headers, keep


async def read_body(
    reader: asyncio.StreamReader, status: int, headers: CIMultiDict[str]
) -> tuple[bytes, bool]:
    """The body (at most MAX_BODY_BYTES) and whether it was read to its end, leaving the
    connection at the start of the next answer."""
    if status in _NO_BODY:  # whatever length it states is the one it would have had
        return b"", True
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise Dropped(f"a Transfer-Encoding this client does not read: {coding[:40]!r}")
        body, whole = await _chunked(reader)
        # A length besides chunked is a smuggling smell: read as chunked, then closed.
        return body, whole and "Content-Length" not in headers
    lengths = headers.getall("Content-Length", ())
    if lengths:
        text = lengths[0]
        if any(v != text for v in lengths) or not (text.isascii() and text.isdigit()):
            raise Dropped(f"a malformed Content-Length: {lengths!r:.80}")
        length = int(text[:19]) if len(text) < 19 else MAX_BODY_BYTES + 1
        body = await reader.readexactly(min(length, MAX_BODY_BYTES))
        return body, length <= MAX_BODY_BYTES
    parts: list[bytes] = []  # no length: the body ends with the connection, which is not kept
    size = 0
    while size < MAX_BODY_BYTES and (part := await reader.read(MAX_BODY_BYTES - size)):
        parts.append(part)
        size += len(part)
    return b"".join(parts), False


async def _chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        length = line[:-2].split(b";", 1)[0].strip(b" \t")  # chunk extensions ignored
        if _HEX.fullmatch(length) is None:
            raise Dropped(f"a malformed chunk size: {line[:40]!r}")
        n = int(length, 16)
        if n == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, ignored
                pass
            return b"".join(parts), True
        if size + n > MAX_BODY_BYTES:  # as long as a body is read; the rest is left
            parts.append(await reader.readexactly(MAX_BODY_BYTES - size))
            return b"".join(parts), False
        parts.append(await reader.readexactly(n))
        size += n
        if await reader.readexactly(2) != b"\r\n":
            raise Dropped("a chunk longer than its size said")


def decoded(body: bytes, coding: str | None) -> bytes:
    """The body without its Content-Encoding (asked for identity, a server may not listen)."""
    if coding is None or not body:
        return body
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip", "deflate"):
        # deflate is meant zlib-wrapped, yet some servers send it raw: the first byte says.
        wbits = 16 + zlib.MAX_WBITS if "gzip" in coding else zlib.MAX_WBITS
        if coding == "deflate" and body[0] & 0x0F != 8:
            wbits = -zlib.MAX_WBITS
        unpack = zlib.decompressobj(wbits)
        try:
            out = unpack.decompress(body, MAX_BODY_BYTES)
        except zlib.error as exc:
            raise Dropped(f"a {coding} body that does not decompress: {exc}") from None
        if not unpack.eof and len(out) < MAX_BODY_BYTES:
            raise Dropped(f"a {coding} body cut short")
        return out
    raise Dropped(
        f"an answer in Content-Encoding {coding[:40]!r}, which this client does not decode: it "
        "asks for identity, so something in between (a proxy, a gateway) recompresses answers"
    )
