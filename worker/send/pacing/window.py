"""The service's rate-limit window, as its headers describe it: a budget to spread.

Datadog counts requests per organization in fixed, calendar-aligned windows of ``Period``
seconds and says, on every response, how many are ``Remaining`` and when the window
``Reset``\\ s. :class:`Window` keeps one model of the current window and spends what
remains evenly up to its end, counting requests still in flight against it, so the limit
is used to the last request without a 429.
"""

from __future__ import annotations

import math
from typing import Protocol

import structlog

from worker.errors import RateLimitInfo

log = structlog.get_logger("worker.pacing")

#: Extra wait past a window boundary before counting on the new budget, for clock skew.
BOUNDARY_MARGIN = 0.02
#: A wait between two requests this long or longer, to spread a window's budget, is logged.
LONG_PACE = 30.0


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


class Window:
    """The current window's end and remaining budget, learned from the answers."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.period: float | None = None
        self.name: str | None = None
        self.end: float | None = None
        self.remaining = 0
        self._logged: float | None = None
        self._paced_logged: float | None = None
        #: Times the budget was spent and senders had to wait for the next window.
        self.waits = 0

    def learn(self, info: RateLimitInfo) -> None:
        """Take the limit, period and name an answer states."""
        if info.limit is not None:
            self.limit = info.limit
            self.name = info.name
            if info.period:
                self.period = info.period

    def wait(self, now: float, in_flight: int, last_send: float) -> float | None:
        """Seconds until the budget allows another request (None: now)."""
        if self.limit is None:
            return None  # the server announces no limit: only --concurrency applies
        if self.end is None or now >= self.end:
            # The known window is over: assume a full budget in the one we are now in.
            period = self.period or 1.0
            self.end = (math.floor(now / period) + 1) * period
            self.remaining = self.limit
        start = self.end - (self.period or 1.0)
        if now < start + BOUNDARY_MARGIN:
            return start + BOUNDARY_MARGIN - now
        budget = self.remaining - in_flight
        if budget <= 0:
            if self._logged != self.end:
                self._logged = self.end
                self.waits += 1
                log.info("ratelimit.wait", reason="budget_spent",
                         seconds=round(self.end - now, 3), limit=self.limit)  # fmt: skip
            return self.end - now + BOUNDARY_MARGIN
        # Spread what is left evenly between the last send and the window's end: with the
        # full budget of a fresh window that is exactly Period / Limit apart.
        earliest = last_send + (self.end - last_send) / (budget + 1)
        if earliest <= now:
            return None
        if earliest - now >= LONG_PACE and self._paced_logged != self.end:
            # A small budget over a long window (3 a day) spaces requests hours apart:
            # said once per window, or the run would look stuck.
            self._paced_logged = self.end
            log.info("ratelimit.wait", reason="paced", seconds=round(earliest - now, 3),
                     limit=self.limit, period=self.period)  # fmt: skip
        return earliest - now

    def observe(self, sent_at: float, end: float, remaining: int) -> bool:
        """An answer says ``remaining`` in the window ending at ``end``; True if news."""
        period = self.period or 1.0
        tolerance = min(0.5, period / 2)
        if sent_at < end - period:
            # Sent in an earlier window, answered in this one: the count may belong to either.
            # Assume it landed in this window, and keep the budget we already believe in.
            if self.end is not None and abs(end - self.end) < tolerance:
                self.remaining -= 1
            return False
        if self.end is None or end > self.end + tolerance:
            self.end, self.remaining = end, remaining
        elif abs(end - self.end) < tolerance:
            self.remaining = min(self.remaining, remaining)
        else:
            return False  # a late answer about a window already over
        return True

    def unanswered(self, sent_at: float) -> None:
        """No count came back (timeout, dropped connection): assume it was counted."""
        if self.end is not None and sent_at < self.end:
            self.remaining -= 1

    def spent(self, end: float) -> None:
        """A 429: nothing is left until ``end``."""
        self.end, self.remaining = end, 0
