"""Live progress of a run: a bar redrawn in place on a terminal, or periodic events.

On a terminal (console logs, stderr a TTY) a tqdm bar on stderr shows rows read, emails
sent and failed, requests, 429 waits, the rate and, once the input is fully read, the ETA;
log lines are written above it. Otherwise a ``progress`` event is logged every
``--progress-every`` seconds with the same numbers.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker import logs

log = structlog.get_logger("worker.progress")

#: How often the bar is redrawn.
BAR_REFRESH = 0.25

Snapshot = Callable[[], dict[str, int]]


class Progress:
    """Shows a run's progress until :meth:`close`. ``mode``: ``bar``, ``events`` or ``off``."""

    def __init__(self, snapshot: Snapshot, mode: str, every: float) -> None:
        self._snapshot = snapshot
        self.mode = mode
        self._every = BAR_REFRESH if mode == "bar" else max(every, 0.05)
        self._bar: Any = None  # a tqdm bar, in bar mode
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    def start(self) -> None:
        """Begin showing progress (a no-op when off)."""
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm import tqdm  # only a terminal run pays for the import

            # Some terminals (and bare pseudo-terminals) report a width of 0: then tqdm
            # would draw nothing, so fall back to a fixed width.
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError):
                width = 0
            self._bar = tqdm(total=None, unit="email", desc="invites", file=sys.stderr,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 120,
                             smoothing=0.2, leave=True)  # fmt: skip
            bar = self._bar
            logs.STDERR.sink = lambda line: bar.write(line, file=sys.stderr)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.update()

    def update(self) -> None:
        """Redraw the bar, or log one ``progress`` event."""
        snap = self._snapshot()
        done = snap["sent"] + snap["failed"] + snap["skipped"]
        if self._bar is not None:
            bar = self._bar
            if snap["read_all"] and bar.total != snap["valid"]:
                bar.total = snap["valid"]
            bar.set_postfix_str(
                f"rows {snap['rows']:,} | sent {snap['sent']:,} | skipped {snap['skipped']:,}"
                f" | failed {snap['failed']:,} (refused {snap['refused']:,})"
                f" | requests {snap['requests']:,} | 429s {snap['limited']:,}"
                f" | pacing waits {snap['waits']:,}",
                refresh=False,
            )
            bar.update(done - bar.n)  # redraws in place
            return
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = snap["valid"] - done
        eta = round(left / rate, 1) if snap["read_all"] and rate > 0 else None
        log.info("progress", rows=snap["rows"], valid=snap["valid"], sent=snap["sent"],
                 failed=snap["failed"], skipped=snap["skipped"], refused=snap["refused"],
                 requests=snap["requests"], rate_limited=snap["limited"],
                 ratelimit_waits=snap["waits"], emails_per_second=round(rate, 1),
                 eta_seconds=eta)  # fmt: skip

    async def close(self) -> None:
        """Stop; a bar gets its final state, then goes back to plain stderr."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._bar is not None:
            self.update()
            self._bar.close()
            logs.STDERR.sink = None
