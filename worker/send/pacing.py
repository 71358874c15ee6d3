"""When may the next request go? Pacing from the server's ``X-RateLimit-*`` headers.

Datadog counts requests per organization in fixed, calendar-aligned windows of ``Period``
seconds and says, on every response, how many are ``Remaining`` and when the window
``Reset``\\ s. The pacer keeps one model of the current window and:

- spends the remaining budget evenly up to the window's end, counting requests still in
  flight against it, so the limit is used to the last request without a 429;
- sends only ``probe_in_flight`` requests until the first answer says what the limit is;
- after a 429 pauses *every* sender until the window resets, plus jitter;
- after a 429 that carries no usable headers (a proxy's page), backs off exponentially
  with jitter and paces itself by AIMD, as TCP does: the pace is halved, then raised a
  little with every answer that is not a 429;
- applies ``--rate`` as an extra, burst-free cap (aiolimiter with a capacity of one);
- never waits longer than ``max_wait`` at a time: headers are evidence, not orders, so a
  run can be slow but never stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

import structlog
from aiolimiter import AsyncLimiter

from worker.clock import Clock, unless_set
from worker.errors import RateLimitInfo

log = structlog.get_logger("worker.pacing")

#: Extra wait past a window boundary before counting on the new budget, for clock skew.
BOUNDARY_MARGIN = 0.02
#: AIMD, for a service that rate-limits without saying how: the pace after a 429 is this
#: share of the pace that met it, ...
DECREASE = 0.5
#: ... and grows by about this many requests/s per second while answers are not 429s.
INCREASE = 0.5
#: The slowest AIMD pace, in requests per second.
MIN_RATE = 0.05


def window_end(now: float, info: RateLimitInfo) -> float | None:
    """Wall time at which the window that ``info`` describes ends.

    Windows are calendar aligned, so with a known period the end is the next multiple of it.
    ``Reset`` is whole seconds and may be 0, so it only confirms the alignment; when it
    disagrees (a skewed clock), trust it, rounded up so we never resume early.
    """
    period = info.period
    if period and period > 0:
        aligned = (math.floor(now / period) + 1) * period
        if info.reset is None or info.reset - 1 <= aligned - now <= info.reset + 1:
            return aligned
    if info.reset is not None:
        return now + info.reset + 1.0
    return None


class SharedLimit(Protocol):
    """A budget shared with other workers of the organization (see ``worker.queue``)."""

    async def take(self, now: float, limit: int, period: float, name: str | None) -> float:
        """Take a slot in the current window: 0.0, or the seconds to wait before asking again."""
        ...

    def observe(self, window_end: float, period: float, used: int, name: str | None) -> None:
        """The service reports ``used`` requests spent in the window ending at ``window_end``."""
        ...

    def pause(self, until: float, name: str | None) -> None:
        """A 429 was seen: every worker waits until ``until``."""
        ...


class Pacer:
    """Shared by all senders of a run: ``acquire`` before a request, ``release`` after."""

    def __init__(
        self,
        clock: Clock,
        *,
        rate: float | None = None,
        probe_in_flight: int = 1,
        jitter: float = 1.0,
        default_wait: float = 1.0,
        max_wait: float = 60.0,
        rng: random.Random | None = None,
        shared: SharedLimit | None = None,
    ) -> None:
        self._clock = clock
        self._shared = shared
        self.name: str | None = None
        self._limiter = AsyncLimiter(1, 1.0 / rate) if rate else None
        self._probe = probe_in_flight
        self._jitter = jitter
        self._default_wait = default_wait
        self._max_wait = max_wait
        self._rng = rng or random.Random()  # jitter, not security
        self.limit: int | None = None
        self.period: float | None = None
        self._learned = False
        self._window_end: float | None = None
        self._remaining = 0
        self._in_flight = 0
        self._last_send = -math.inf
        self._paused_until = -math.inf
        self._logged_window: float | None = None
        self._changed = asyncio.Event()
        #: AIMD pace in requests/s, once a 429 came without usable headers; else None.
        self.adaptive_rate: float | None = None
        self._limited_streak = 0  # header-less 429s in a row
        self._decreased_at = -math.inf
        self._capped = False  # whether a wait was ever cut at max_wait (logged once)
        self._accepted: deque[float] = deque(maxlen=256)  # when answers other than 429 came
        #: Times a sender had to wait for the budget or a 429 pause (for the summary).
        self.waits = 0

    @property
    def in_flight(self) -> int:
        """Requests acquired and not yet released."""
        return self._in_flight

    def try_acquire(self) -> float | None:
        """A slot right now if no wait is needed (the common case), else None.

        Only for the pacer's own rules: with ``--rate`` or a shared budget, use ``acquire``.
        """
        if self._limiter is not None or self._shared is not None:
            return None
        now = self._clock.time()
        if self._wait_needed(now) is not None:
            return None
        return self._grant(now)

    async def acquire(self) -> float:
        """Wait until a request may be sent; returns the send time to pass to ``release``.

        However the headers or the shared budget read, no request waits here longer than
        ``max_wait`` in all: past it the request goes, and the answer corrects the model.
        """
        if self._limiter is not None:
            await self._limiter.acquire()
        give_up = self._clock.time() + self._max_wait
        while True:
            now = self._clock.time()
            wait = self._wait_needed(now)
            if wait is None:
                if self._shared is None or self.limit is None:
                    break
                # Our own view allows it; the organization-wide budget must too.
                wait = await self._shared.take(now, self.limit, self.period or 1.0, self.name)
                if wait <= 0:
                    now = self._clock.time()
                    break
            if wait == math.inf:
                await self._changed.wait()  # probing: until an answer teaches us the limit
            elif now >= give_up:
                if not self._capped:
                    self._capped = True
                    hint = "raise --max-wait if the service's windows are longer"
                    log.warning("ratelimit.wait_capped", max_wait=self._max_wait, hint=hint)
                break
            else:
                await self._clock.sleep(min(wait, give_up - now))
        return self._grant(now)

    @contextlib.asynccontextmanager
    async def slot(self, stop: asyncio.Event | None = None) -> AsyncIterator[Slot | None]:
        """``async with pacer.slot() as slot:`` send one request, then ``slot.observe(...)``.

        Leaving the block without an observation gives the slot back as never used (the
        request did not leave: a refusal before sending, a failed journal write). With
        ``stop``, the slot is None if ``stop`` is set before one is free.
        """
        sent_at = self.try_acquire()
        if sent_at is None:
            if stop is None:
                sent_at = await self.acquire()
            else:
                _, sent_at = await unless_set(stop, self.acquire(), lambda _: self.cancel())
        if sent_at is None:
            yield None
            return
        slot = Slot(self, sent_at)
        try:
            yield slot
        finally:
            if not slot.observed:
                self.cancel()

    def _grant(self, now: float) -> float:
        """Count a request sent at ``now`` as in flight."""
        self._in_flight += 1
        self._last_send = now
        return now

    def _wait_needed(self, now: float) -> float | None:
        if now < self._paused_until:
            return self._paused_until - now
        if not self._learned:
            return math.inf if self._in_flight >= self._probe else None
        if self.adaptive_rate is not None:
            earliest = self._last_send + 1.0 / self.adaptive_rate
            if earliest > now:
                return earliest - now
        if self.limit is None:
            return None  # the server announces no limit: only --concurrency applies
        if self._window_end is None or now >= self._window_end:
            self._roll_window(now)
        assert self._window_end is not None
        start = self._window_end - (self.period or 1.0)
        if now < start + BOUNDARY_MARGIN:
            return start + BOUNDARY_MARGIN - now
        budget = self._remaining - self._in_flight
        if budget <= 0:
            if self._logged_window != self._window_end:
                self._logged_window = self._window_end
                self.waits += 1
                log.info(
                    "ratelimit.wait",
                    reason="budget_spent",
                    seconds=round(self._window_end - now, 3),
                    limit=self.limit,
                )
            return self._window_end - now + BOUNDARY_MARGIN
        # Spread what is left evenly between the last send and the window's end: with the
        # full budget of a fresh window that is exactly Period / Limit apart.
        earliest = self._last_send + (self._window_end - self._last_send) / (budget + 1)
        return earliest - now if earliest > now else None

    def _roll_window(self, now: float) -> None:
        """The known window is over: assume a full budget in the one we are now in."""
        period = self.period or 1.0
        self._window_end = (math.floor(now / period) + 1) * period
        self._remaining = self.limit or 0

    def release(self, sent_at: float, info: RateLimitInfo | None, *, limited: bool = False) -> None:
        """Record the answer to a request sent at ``sent_at`` (``info`` is None if none came)."""
        self._in_flight -= 1
        self._learned = True
        now = self._clock.time()
        if info is not None and info.limit is not None:
            self.limit = info.limit
            self.name = info.name
            if info.period:
                self.period = info.period
        end = window_end(now, info) if info is not None else None
        if end is not None:
            end = min(end, now + self._max_wait)
            self.adaptive_rate = None  # the service says where its window ends: pace by it
        if limited:
            if end is None:
                self._back_off(sent_at, now)
            else:
                self._pause(now, end)
        elif end is not None and info is not None and info.remaining is not None:
            self._observe(sent_at, end, info.remaining)
        elif self._window_end is not None and sent_at < self._window_end:
            # No count came back (timeout, dropped connection); assume it was counted.
            self._remaining -= 1
        if not limited:
            self._limited_streak = 0
            self._accepted.append(now)
            if self.adaptive_rate is not None:
                # Additive increase: about INCREASE requests/s more per second of answers.
                self.adaptive_rate += INCREASE / max(self.adaptive_rate, 1.0)
        self._wake()

    def cancel(self) -> None:
        """Give back an acquired slot whose request was never sent."""
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _observe(self, sent_at: float, end: float, remaining: int) -> None:
        period = self.period or 1.0
        tolerance = min(0.5, period / 2)
        if sent_at < end - period:
            # Sent in an earlier window, answered in this one: the count may belong to either.
            # Assume it landed in this window, and keep the budget we already believe in.
            if self._window_end is not None and abs(end - self._window_end) < tolerance:
                self._remaining -= 1
            return
        if self._window_end is None or end > self._window_end + tolerance:
            self._window_end = end
            self._remaining = remaining
        elif abs(end - self._window_end) < tolerance:
            self._remaining = min(self._remaining, remaining)
        else:
            return
        if self._shared is not None and self.limit is not None:
            self._shared.observe(end, period, self.limit - remaining, self.name)
        # else: a late answer about a window already over; nothing to learn.

    def _back_off(self, sent_at: float, now: float) -> None:
        """A 429 with no usable headers: exponential backoff, and halve the pace (AIMD).

        The pace is lowered, and the backoff grows, once per backoff: the other answers of
        requests sent before it met the old pace and must not count again.
        """
        if sent_at < self._decreased_at:
            return  # sent before the last backoff began: that backoff already answers it
        self._limited_streak += 1
        if self.adaptive_rate is None:
            # First time: start from what the service took over the last second, but
            # never pace slower than the backoff itself waits.
            took = sum(1 for t in self._accepted if t > now - 1.0)
            current = max(float(took), 2.0 / max(self._default_wait, 1e-3))
        else:
            current = self.adaptive_rate
        self.adaptive_rate = max(MIN_RATE, current * DECREASE)
        self._decreased_at = now
        ceiling = min(self._max_wait, self._default_wait * 2.0 ** (self._limited_streak - 1))
        jitter = self._rng.uniform(0, min(self._jitter, ceiling))
        self._pause_until(now, now + ceiling + jitter, headers=False)

    def _pause(self, now: float, end: float) -> None:
        """A 429: nobody sends until the window resets (a little later, with jitter)."""
        self._window_end = end
        self._remaining = 0
        spread = min(self._jitter, 0.25 * (self.period or 1.0))
        self._pause_until(now, end + BOUNDARY_MARGIN + self._rng.uniform(0, spread), headers=True)

    def _pause_until(self, now: float, resume: float, *, headers: bool) -> None:
        resume = min(resume, now + self._max_wait)
        if resume > self._paused_until:
            self._paused_until = resume
            self.waits += 1
            if self._shared is not None:
                self._shared.pause(resume, self.name)
            pace = round(self.adaptive_rate, 2) if self.adaptive_rate else None
            log.info(
                "ratelimit.wait",
                reason="429",
                seconds=round(resume - now, 3),
                headers=headers,
                pace=pace,
            )


class Slot:
    """One request's place in the pace: when it was sent, and what its answer said."""

    __slots__ = ("_pacer", "observed", "sent_at")

    def __init__(self, pacer: Pacer, sent_at: float) -> None:
        self._pacer = pacer
        self.sent_at = sent_at
        self.observed = False

    def observe(self, info: RateLimitInfo | None, *, limited: bool = False) -> None:
        """The answer came (``info`` None if none did): account for it, once."""
        if not self.observed:
            self.observed = True
            self._pacer.release(self.sent_at, info, limited=limited)
