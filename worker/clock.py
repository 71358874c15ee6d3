"""Time as a dependency, so pacing and backoff can be tested without sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds and a way to wait; the only time source pacing and retries use."""

    def time(self) -> float:
        """Seconds since the epoch (rate-limit windows are calendar aligned to it)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a no-op for zero or less)."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
        else:
            # Still yield, so a loop of zero-length waits cannot starve other tasks.
            await asyncio.sleep(0)


class FakeClock:
    """A clock whose sleeps return at once and move its time forward.

    Sleeps run one after another in virtual time (two tasks that each sleep one second move
    it two seconds), which only ever over-states elapsed time: a pacing test that passes on it
    cannot be relying on waits that were skipped. ``slept`` records every requested wait.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward without anyone sleeping."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds > 0:
            self.now += seconds
        await asyncio.sleep(0)
