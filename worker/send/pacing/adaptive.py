"""Pacing a service that rate-limits without saying how: backoff and AIMD.

After a 429 with no usable headers (a proxy's page, or headers that made no sense), the
pace is halved — once per backoff, since the other answers of requests sent before it met
the old pace — and every sender waits, exponentially longer while 429s go on, with
jitter. The pace then grows by about :data:`INCREASE` requests/s per second while answers
are not 429s, as TCP's congestion window does.
"""

from __future__ import annotations

import math
import random
from collections import deque

#: The pace after a 429 is this share of the pace that met it, ...
DECREASE = 0.5
#: ... and grows by about this many requests/s per second while answers are not 429s.
INCREASE = 0.5
#: The slowest pace, in requests per second.
MIN_RATE = 0.05


class Adaptive:
    """The AIMD pace (None until a header-less 429) and the backoff after such a 429."""

    def __init__(self, base_wait: float, jitter: float, rng: random.Random) -> None:
        self._base_wait, self._jitter, self._rng = base_wait, jitter, rng
        #: Requests per second, once engaged.
        self.rate: float | None = None
        self._streak = 0  # header-less 429s in a row
        self._decreased_at = -math.inf
        self._accepted: deque[float] = deque(maxlen=256)  # when answers other than 429 came

    def wait(self, now: float, last_send: float) -> float | None:
        """Seconds until the pace allows another request (None: now)."""
        if self.rate is None:
            return None
        earliest = last_send + 1.0 / self.rate
        return earliest - now if earliest > now else None

    def answered(self, now: float) -> None:
        """An answer that was not a 429: the pace grows a little."""
        self._streak = 0
        self._accepted.append(now)
        if self.rate is not None:
            self.rate += INCREASE / max(self.rate, 1.0)

    def limited(self, sent_at: float, now: float, cap: float) -> float | None:
        """A header-less 429 for a request sent at ``sent_at``: the backoff, in seconds.

        None when a backoff that began after that request was sent already answers it.
        """
        if sent_at < self._decreased_at:
            return None
        self._streak += 1
        if self.rate is None:
            # First time: start from what the service took over the last second, but
            # never pace slower than the backoff itself waits.
            took = sum(1 for t in self._accepted if t > now - 1.0)
            current = max(float(took), 2.0 / max(self._base_wait, 1e-3))
        else:
            current = self.rate
        self.rate = max(MIN_RATE, current * DECREASE)
        self._decreased_at = now
        ceiling = min(cap, self._base_wait * 2.0 ** (self._streak - 1))
        return ceiling + self._rng.uniform(0, min(self._jitter, ceiling))

    def disengage(self) -> None:
        """The service says where its window ends again: pace by that instead."""
        self.rate = None
