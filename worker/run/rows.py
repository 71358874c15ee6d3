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
import stat

#: Bytes read per call while counting.
BLOCK = 1 << 20


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
        """Count the rows (non-blank lines, the header left out) now; blocking.

        ``beside``: counting beside the run, which :meth:`abandon` cuts short.
        """
        lines = counted = 0
        last = b"\n"
        try:
            with open(self.path, "rb") as handle:
                while not (beside and self._abandoned) and (block := handle.read(BLOCK)):
                    # Blank lines are not rows; a blank line spanning two blocks is rare
                    # enough to leave to the estimate.
                    lines += block.count(b"\n") - block.count(b"\n\n") - block.count(b"\n\r\n")
                    counted += len(block)
                    last = block[-1:]
                    if beside:
                        self._lines, self._bytes = lines, counted
        except OSError:
            return self.estimate() or 0
        if beside and self._abandoned:
            return self.estimate() or 0
        if last != b"\n":
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
