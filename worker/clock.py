"""Time as a dependency, so pacing and backoff can be tested without sleeping."""

from __future__ import annotations

import asyncio
import functools
import heapq
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

T = TypeVar("T")


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
    """Virtual time for tests and simulations: sleeps return without real waiting.

    A discrete-event clock. Sleepers queue by wake-up time; once the tasks that can run have
    run (a few event-loop turns), time jumps to the earliest wake-up and that sleeper
    resumes. Concurrent tasks therefore see the same timeline they would see in real time,
    only compressed. ``slept`` records every requested wait.
    """

    #: Event-loop turns given to runnable tasks before virtual time moves on.
    SETTLE_TURNS = 20

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._driver: asyncio.Task[None] | None = None

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward without anyone sleeping."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), self._seq, future))
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        await future

    async def _drive(self) -> None:
        while self._sleepers:
            for _ in range(self.SETTLE_TURNS):
                await asyncio.sleep(0)
            wake, _, future = heapq.heappop(self._sleepers)
            if future.cancelled():
                continue
            self.now = max(self.now, wake)
            future.set_result(None)


async def unless_set(
    event: asyncio.Event, step: Awaitable[T], on_discard: Callable[[T], object] | None = None
) -> tuple[bool, T | None]:
    """Await ``step`` unless ``event`` is set first; ``(completed, result)``.

    When the event wins, the step is cancelled; one that completed in the same instant is
    handed to ``on_discard`` (so, say, an acquired pacer slot is given back).
    """
    task = asyncio.ensure_future(step)
    try:
        if not event.is_set():
            waiter = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
    except BaseException:
        # The caller itself was cancelled: the step must not outlive it (an orphaned
        # acquire would take a slot nobody uses, a sleep would run on for nothing).
        _discard(task, on_discard)
        raise
    if not event.is_set():
        return True, task.result()
    _discard(task, on_discard)
    return False, None


def _discard(task: asyncio.Future[T], on_discard: Callable[[T], object] | None) -> None:
    """Cancel ``task``, or hand a result it already has to ``on_discard``."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None and on_discard is not None:
        on_discard(task.result())


async def sleep_unless(clock: Clock, seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``seconds`` on ``clock`` unless ``stop`` is set first; True if slept in full.

    The one wait of a run that a stop cuts short: a backoff, the reconcile delay.
    """
    if stop is None:
        await clock.sleep(seconds)
        return True
    if stop.is_set():
        return False
    slept, _ = await unless_set(stop, clock.sleep(seconds))
    return slept


@functools.lru_cache(maxsize=4)
def second_text(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of a whole epoch second.

    Formatting the date is most of the cost of a timestamp, and a run stamps a log line and
    a report record per batch: each second is formatted once, then only the fraction added.
    """
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
