"""How many rows an input file holds: counted beside the run, estimated from its size.

The reader keeps only a chunk ahead of the senders, so in a run paced by a rate limit it
reaches the end of a file late. Counting the file's lines apart (a block at a time, in a
thread: about 20 ms per million rows) gives the progress bar its total early, and a run
that stops the number of rows it never read. Until the count is done, the share counted
so far, scaled to the file's size, is the estimate.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat

from worker.sources.lines import BOM

#: Bytes read per call while counting.
BLOCK = 1 << 20

# What the readers take for blank (``bytes.strip``'s ASCII whitespace, which ``\s`` matches
# in a bytes pattern). A blank line is found from the newline before it, which the
# regex engine searches for in C; a byte outside that whitespace is text.
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*(?=\n)")  # from the newline before it
_TEXT = re.compile(rb"\S")


class InputRows:
    """The rows of one regular input file (``header``: one line is a CSV header)."""

    def __init__(self, path: str, size: int, *, header: bool) -> None:
        self.path, self.size, self._header = path, size, int(header)
        self._lines = 0  # counted so far
        self._bytes = 0
        self._abandoned = False
        #: Every row, once counted; None until then.
        self.total: int | None = None

    @classmethod
    def of(cls, path: str, *, header: bool) -> InputRows | None:
        """For a regular file; None for standard input, a pipe, a FIFO or a device."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return cls(path, st.st_size, header=header) if stat.S_ISREG(st.st_mode) else None

    def count(self, *, beside: bool = False) -> int:
        """Count the rows now, as the readers see them; blocking.

        A row is a physical line holding anything but ASCII whitespace (the readers skip
        the rest), the CSV header left out. A quoted CSV field holding a newline is two
        rows here as it is to the reader, which parses each line on its own. One case is
        left to the reader: a whitespace-only line over its 64 KiB limit, which it rejects
        as ``line_too_long`` and this count takes for blank.

        ``beside``: counting beside the run, which :meth:`abandon` cuts short.
        """
        lines = counted = 0
        # Whether the line still open at the end of the last block holds text so far: only
        # that is carried across blocks, so a line of any length costs no memory.
        open_text = False
        try:
            with open(self.path, "rb") as handle:
                if handle.read(len(BOM)) != BOM:  # dropped by the readers: not text
                    handle.seek(0)
                while not (beside and self._abandoned) and (block := handle.read(BLOCK)):
                    counted += len(block)
                    first = block.find(b"\n")
                    if first < 0:
                        open_text = open_text or _TEXT.search(block) is not None
                    else:
                        # The line carried in ends here; whole lines follow up to the last
                        # newline (counted in C, blank ones found by a regex); then a new
                        # open line.
                        if open_text or _TEXT.search(block, 0, first) is not None:
                            lines += 1
                        last = block.rfind(b"\n")
                        lines += block.count(b"\n", first + 1, last + 1) - len(
                            _BLANK_LINE.findall(block, first, last + 1)
                        )
                        open_text = _TEXT.search(block, last + 1) is not None
                    if beside:
                        self._lines, self._bytes = lines, counted
        except OSError:
            return self.estimate() or 0
        if beside and self._abandoned:
            return self.estimate() or 0
        if open_text:
            lines += 1  # a last line without its newline
        self.total = max(0, lines - self._header)
        return self.total

    def abandon(self) -> None:
        """Stop a count running in a thread (the run is over)."""
        if self.total is None:
            self._abandoned = True

    async def count_in_thread(self) -> None:
        """:meth:`count`, off the event loop."""
        await asyncio.to_thread(self.count, beside=True)

    def estimate(self) -> int | None:
        """The rows: counted, or scaled from the part counted so far; None before any."""
        if self.total is not None:
            return self.total
        if not self._bytes:
            return None
        return max(0, round(self._lines * self.size / self._bytes) - self._header)
