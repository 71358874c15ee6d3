"""One retry policy for every request the worker makes: attempts, backoff and jitter.

Shaped like stamina's: a policy says *whether* a failure is worth another attempt (from
the error's type alone, never its text) and *how long* to wait first. Sending and listing
use the same policy, so ``--max-attempts`` and the backoff mean one thing everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from worker.clock import Clock
from worker.errors import RateLimited, RateLimitInfo, RetryableError, SendError

if TYPE_CHECKING:
    from worker.send.pacing import Pacer


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of ``base * 2**(n-1)``."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to ``attempts`` tries; the n-th retry waits about ``base * 2**(n-1)``, at most ``cap``.

    A 429 is not a failed attempt: the pacer waits for the window instead.
    """

    attempts: int
    base: float
    cap: float

    def retries(self, error: SendError, attempt: int) -> bool:
        """Whether to try again after ``error`` ended try number ``attempt``."""
        if isinstance(error, RateLimited):
            return True
        return isinstance(error, RetryableError) and attempt < self.attempts

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the try after try number ``attempt``."""
        return backoff_delay(attempt, self.base, self.cap, rng)


class Answered(Protocol):
    """An answer that says what the rate-limit headers said."""

    @property
    def ratelimit(self) -> RateLimitInfo: ...


A = TypeVar("A", bound=Answered)


async def paced_call(
    call: Callable[[], Awaitable[A]],
    pacer: Pacer,
    policy: RetryPolicy,
    clock: Clock,
    rng: random.Random,
    counted: Callable[[], None],
) -> A:
    """One request (a read, or an idempotent write) through the pacer, retried by the
    policy: a 429 waits for the pacer, a retryable error backs off, anything else raises.

    ``counted`` is called for every request made (for the summary's counters).
    """
    attempt = 0
    while True:
        async with pacer.slot() as slot:
            assert slot is not None  # no stop event: a slot always comes
            counted()
            try:
                answer = await call()
            except SendError as exc:
                slot.observe(exc.ratelimit, limited=isinstance(exc, RateLimited))
                error: SendError = exc
            else:
                slot.observe(answer.ratelimit)
                return answer
        if isinstance(error, RateLimited):
            continue
        attempt += 1
        if not policy.retries(error, attempt):
            raise error
        await clock.sleep(policy.delay(attempt, rng))
