"""Reading physical lines from a byte stream with bounded memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO

#: Longest line accepted; a longer one is rejected as ``line_too_long`` without being held.
MAX_LINE_BYTES = 64 * 1024
#: Lines handed to the parser per hop to the reading thread.
CHUNK_LINES = 2_000

BOM = b"\xef\xbb\xbf"


def read_lines(stream: BinaryIO, first_line: int = 1) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_number, bytes)`` per physical line, without the line ending.

    Splits on ``\\n`` and drops one trailing ``\\r`` (CRLF files). A line longer than
    :data:`MAX_LINE_BYTES` yields ``None`` instead of its bytes and is skipped to its end in
    bounded pieces, so a 1 GB line with no newline costs no more memory than a short one.
    A byte-order mark at the start of the stream is dropped.
    """
    number = first_line - 1
    readline = stream.readline
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            # Skip the rest of the over-long line piece by piece.
            while True:
                rest = readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        yield number, raw


Row = tuple[int, str | None, str | None, str | None]


async def chunked(parse_chunk: Callable[[], list[Row] | None]) -> AsyncIterator[list[Row]]:
    """Call a blocking ``parse_chunk`` in a thread until it returns ``None`` (end of input).

    Reading happens off the event loop so a slow pipe on standard input never stalls the
    requests in flight. Empty chunks (only blank lines) are skipped.
    """
    while True:
        rows = await asyncio.to_thread(parse_chunk)
        if rows is None:
            return
        if rows:
            yield rows
