"""When may the next request go? One pacer, shared by every sender of a run.

It combines small parts, each one rule, and a request goes when none of them objects:

- the probe: only ``probe_in_flight`` requests until the first answer says what the
  limit is;
- a pause after a 429: *every* sender waits until the window resets, plus jitter;
- :class:`~worker.send.pacing.adaptive.Adaptive`: backoff and AIMD for 429s without
  usable headers;
- :class:`~worker.send.pacing.window.Window`: the budget the headers state, spread evenly;
- a :class:`~worker.send.pacing.window.SharedLimit`: the organization-wide budget, kept
  with other workers (queue mode);
- ``--rate``: an extra, burst-free cap (aiolimiter with a capacity of one).

No request waits longer than ``max_wait`` in all: headers are evidence, not orders, so a
run can be slow but never stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator

import structlog
from aiolimiter import AsyncLimiter

from worker.clock import Clock, unless_set
from worker.errors import RateLimitInfo
from worker.send.pacing.adaptive import Adaptive
from worker.send.pacing.window import BOUNDARY_MARGIN, SharedLimit, Window, window_end

log = structlog.get_logger("worker.pacing")


class Pacer:
    """Shared by all senders of a run: a :meth:`slot` (or ``acquire``/``release``) per request."""

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
        self._limiter = AsyncLimiter(1, 1.0 / rate) if rate else None
        self._probe = probe_in_flight
        self._jitter = jitter
        self._max_wait = max_wait
        self._rng = rng or random.Random()  # jitter, not security
        self.window = Window()
        self.adaptive = Adaptive(default_wait, jitter, self._rng)
        self._learned = False
        self._in_flight = 0
        self._last_send = -math.inf
        self._paused_until = -math.inf
        self._capped = False  # whether a wait was ever cut at max_wait (logged once)
        self._changed = asyncio.Event()
        self._pauses = 0

    @property
    def in_flight(self) -> int:
        """Requests acquired and not yet released."""
        return self._in_flight

    @property
    def limit(self) -> int | None:
        """The limit the service states, once it has."""
        return self.window.limit

    @property
    def waits(self) -> int:
        """Times senders had to wait for the budget or a 429 pause (for the summary)."""
        return self.window.waits + self._pauses

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
                limit = self.window.limit
                if self._shared is None or limit is None:
                    break
                # Our own view allows it; the organization-wide budget must too.
                period, name = self.window.period or 1.0, self.window.name
                wait = await self._shared.take(now, limit, period, name)
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
        paced = self.adaptive.wait(now, self._last_send)
        if paced is not None:
            return paced
        return self.window.wait(now, self._in_flight, self._last_send)

    def release(self, sent_at: float, info: RateLimitInfo | None, *, limited: bool = False) -> None:
        """Record the answer to a request sent at ``sent_at`` (``info`` is None if none came)."""
        self._in_flight -= 1
        self._learned = True
        now = self._clock.time()
        if info is not None:
            self.window.learn(info)
        end = window_end(now, info) if info is not None else None
        if end is not None:
            end = min(end, now + self._max_wait)
            self.adaptive.disengage()  # the service says where its window ends: pace by it
        if limited and end is None:
            backoff = self.adaptive.limited(sent_at, now, self._max_wait)
            if backoff is not None:
                self._pause_until(now, now + backoff, headers=False)
        elif limited and end is not None:
            self.window.spent(end)
            spread = min(self._jitter, 0.25 * (self.window.period or 1.0))
            resume = end + BOUNDARY_MARGIN + self._rng.uniform(0, spread)
            self._pause_until(now, resume, headers=True)
        elif end is not None and info is not None and info.remaining is not None:
            if self.window.observe(sent_at, end, info.remaining):
                self._share(end, info.remaining)
        else:
            self.window.unanswered(sent_at)
        if not limited:
            self.adaptive.answered(now)
        self._wake()

    def probe_again(self) -> None:
        """Keys refused somewhere: the next request goes alone, as the first did, so that
        wrong keys cost one more request, not one per sender."""
        self._learned = False

    def cancel(self) -> None:
        """Give back an acquired slot whose request was never sent."""
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _share(self, end: float, remaining: int) -> None:
        limit = self.window.limit
        if self._shared is not None and limit is not None:
            period = self.window.period or 1.0
            self._shared.observe(end, period, limit - remaining, self.window.name)

    def _pause_until(self, now: float, resume: float, *, headers: bool) -> None:
        """Nobody sends until ``resume`` (at most ``max_wait`` from now)."""
        resume = min(resume, now + self._max_wait)
        if resume > self._paused_until:
            self._paused_until = resume
            self._pauses += 1
            if self._shared is not None:
                self._shared.pause(resume, self.window.name)
            pace = round(self.adaptive.rate, 2) if self.adaptive.rate else None
            log.info("ratelimit.wait", reason="429", seconds=round(resume - now, 3),
                     headers=headers, pace=pace)  # fmt: skip


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
