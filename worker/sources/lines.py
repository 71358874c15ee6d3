"""Reading physical lines from a byte stream, fast and with bounded memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from itertools import count, repeat
from typing import BinaryIO, cast, overload

from worker.sources.feed import Feed, in_thread

#: Longest line accepted; a longer one is rejected as ``line_too_long`` without being held.
MAX_LINE_BYTES = 64 * 1024
#: Bytes read per system call; lines are split out of each block in C.
BLOCK_BYTES = 256 * 1024
#: Lines handed out per call at most. A file is parsed on the event loop a call at a
#: time, and a block of short malformed lines (a stray quote on each, 80,000 to a block)
#: takes the slow path line by line: half a second for a whole block, 25 ms for this many.
MAX_LINES = 4096

BOM = b"\xef\xbb\xbf"

Row = tuple[int, str | None, str | None, str | None]


class Columns(Sequence[Row]):
    """A block of rows the reader found well-formed, held column-wise.

    Row ``i`` is ``(first + i, tokens[i], emails[i], None)``. Readers return this for the
    common, clean block so that no tuple is built per row; validation reads the columns
    directly (see :meth:`worker.validate.Validator.check_rows`), anything else may iterate.
    """

    __slots__ = ("emails", "first", "tokens")

    def __init__(self, first: int, tokens: list[str], emails: list[str]) -> None:
        self.first, self.tokens, self.emails = first, tokens, emails

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[Row]:
        return zip(count(self.first), self.tokens, self.emails, repeat(None), strict=False)

    @overload
    def __getitem__(self, index: int) -> Row: ...
    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...
    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            return list(self)[index]
        position = range(len(self))[index]  # IndexError and negative indexes, as a list
        return (self.first + position, self.tokens[position], self.emails[position], None)


class LineReader:
    """Physical lines of a byte stream, a block at a time.

    Splits on ``\\n`` and drops one trailing ``\\r`` (CRLF files). A line longer than
    :data:`MAX_LINE_BYTES` comes back as ``None`` and is never held whole, so a 1 GB line
    with no newline costs no more memory than a short one. A byte-order mark at the start
    is dropped. A slow pipe hands over what it has instead of making us wait for a full
    block, and :meth:`close` returns at once even while a read waits (see
    :class:`~worker.sources.feed.Feed`). At most :data:`MAX_LINES` lines come per call.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._feed = Feed(stream)
        self._read = self._feed.read
        self._tail = b""
        self._skipping = False  # inside an over-long line whose end has not come yet
        self._started = False
        self._done = False
        # Lines of the last block, handed out from ``_at`` on.
        self._queued: list[bytes | None] = []
        self._at = 0
        #: Number of the last line returned so far (the first line is 1).
        self.number = 0

    def read(self) -> list[bytes | None] | None:
        """The next lines (``None`` for an over-long one), or None at the end of input.

        At most one block is read per call, and at most :data:`MAX_LINES` lines are
        returned (the rest come with the next calls). From a file, a block that ends no line
        (inside an over-long one) gives ``[]``, so a caller on the event loop is never held
        for a whole line of a gigabyte; an input that may wait is read on to a line's end,
        as it is read in a thread.
        """
        if self._queued:
            return self._hand_out()
        while not self._done:
            block = self._read(BLOCK_BYTES)
            if not block:
                self._done = True
                if self._skipping:
                    return self._count([None])
                if self._tail:
                    return self._count(self._clean([self._tail]))
                return None
            data = self._tail + block
            if not self._started:
                # A pipe may hand the byte-order mark over a byte at a time: decide only
                # once three bytes are in (or they can no longer be one).
                if len(data) < len(BOM) and BOM.startswith(data):
                    self._tail = data
                    continue
                self._started = True
                if data.startswith(BOM):
                    data = data[len(BOM) :]
            lines: list[bytes | None] = data.split(b"\n")  # type: ignore[assignment]
            tail = lines.pop()
            assert tail is not None
            self._tail = tail
            if self._skipping and lines:
                lines[0] = None  # the rest of the over-long line ends here
                self._skipping = False
            if len(self._tail) > MAX_LINE_BYTES:
                self._tail = b""
                self._skipping = True
            if lines:
                self._queued = self._clean(lines, b"\r" in data)
                return self._hand_out()
            if not self._feed.may_wait:
                return []
        return None

    def _hand_out(self) -> list[bytes | None]:
        """The next :data:`MAX_LINES` of the lines queued (all of them, in the common case)."""
        queued, at = self._queued, self._at
        whole = at == 0 and len(queued) <= MAX_LINES  # no copy of a common block
        lines = queued if whole else queued[at : at + MAX_LINES]
        self._at = at + len(lines)
        if self._at >= len(queued):
            self._queued, self._at = [], 0
        return self._count(lines)

    @property
    def may_wait(self) -> bool:
        """Whether a read can wait on a writer (a pipe, a FIFO, a terminal): read it in a
        thread. A regular file's blocks are always at hand."""
        return self._feed.may_wait

    def close(self) -> None:
        """Close the stream (idempotent); a read waiting in another thread is woken."""
        self._feed.close()

    def _count(self, lines: list[bytes | None]) -> list[bytes | None]:
        self.number += len(lines)
        return lines

    @staticmethod
    def _clean(lines: list[bytes | None], crlf: bool = True) -> list[bytes | None]:
        """Over-long lines to None, a trailing ``\r`` dropped (``crlf``: the block has one)."""
        limit = MAX_LINE_BYTES
        # The common block needs no per-line work, and that is checked in C.
        if not crlf and None not in lines and max(map(len, cast(list[bytes], lines))) <= limit:
            return lines
        return [
            None if line is None or len(line) > limit
            else line[:-1] if line[-1:] == b"\r" else line
            for line in lines
        ]  # fmt: skip


async def chunked(
    parse_chunk: Callable[[], Sequence[Row] | None], *, may_wait: bool = True
) -> AsyncIterator[Sequence[Row]]:
    """Call a blocking ``parse_chunk`` until it returns ``None`` (end of input).

    ``may_wait``: the input can keep a read waiting (see :attr:`LineReader.may_wait`).
    Such an input is read in a thread, so a slow pipe on standard input never stalls the
    requests in flight; the thread is a daemon of its own, so a read still waiting on a
    silent writer never holds up the end of the run. A regular file is parsed on the
    loop, a block at a time with a turn for the others between blocks: a thread would
    gain nothing there, and it would cost the loop the interpreter lock each time a reply
    comes in while a block is being parsed. Empty chunks (only blank lines) are skipped.
    """
    while True:
        if may_wait:
            rows = await in_thread(parse_chunk)
        else:
            await asyncio.sleep(0)  # requests in flight go on between blocks
            rows = parse_chunk()
        if rows is None:
            return
        if rows:
            yield rows
