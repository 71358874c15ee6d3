"""One retry policy and one attempt loop for every request the worker makes.

Shaped like stamina's: a policy says *whether* a failure is worth another attempt (from
the error's type alone, never its text) and *how long* to wait first. Sending, listing and
reading dashboards go through the same loop (:func:`attempt`), so ``--max-attempts``, the
backoff and a stop mean one thing everywhere; the sender's journal and reconciliation are
hooks of it (:class:`Hooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from worker.clock import Clock, sleep_unless
from worker.errors import (
    FatalError,
    InviteWorkerError,
    OutcomeUnknown,
    RateLimited,
    RateLimitInfo,
    RetryableError,
    SendError,
    Stopped,
)

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


class Hooks:
    """What one attempt loop tells its owner, and asks it. The defaults suit a read (or an
    idempotent write): nothing to journal, and an unknown outcome is simply tried again.
    """

    def refusal(self) -> InviteWorkerError | None:
        """Checked before each request: an error to end with instead of making it."""
        return None

    async def sending(self, sent_at: float) -> None:
        """A request is about to leave (the sender makes its intent durable here)."""

    def held_up(self, sent_at: float) -> SendError | None:
        """Checked as the request, paced for ``sent_at``, is about to leave: an error to
        fail this try with instead (nothing sent; the next try goes as any retry)."""
        return None

    def unsent(self) -> None:
        """The last request created nothing: a 429, a known failure, or none was made."""

    def cut(self) -> None:
        """The request in flight was cancelled (a stop's grace ran out): it may have
        reached the service, so its outcome is unknown."""

    def limited(self) -> None:
        """The last request was answered 429 (not a failed attempt)."""

    def failed(self, error: SendError, attempt: int) -> None:
        """Try number ``attempt`` failed with ``error`` (a 429 is not a failed try)."""

    async def unknown(self, error: OutcomeUnknown, attempt: int, sent_at: float) -> bool:
        """After an unknown outcome (try number ``attempt``): settle it, e.g. by listing.

        False ends the attempts (nothing is left to send, or what happened cannot be told).
        """
        return True

    def retrying(self, error: SendError, attempt: int, delay: float) -> None:
        """Try number ``attempt`` failed with ``error``; the next goes after ``delay`` s."""


async def attempt(
    call: Callable[[], Awaitable[A]],
    hooks: Hooks,
    *,
    pacer: Pacer,
    policy: RetryPolicy,
    clock: Clock,
    rng: random.Random,
    stop: asyncio.Event | None = None,
) -> A | None:
    """The one attempt loop of every request: pace, send, observe, settle, back off.

    A 429 waits for the pacer (not a failed attempt); a retryable error backs off by the
    policy, anything else is raised, as is the last error once the policy gives up. An
    unknown outcome goes to ``hooks.unknown`` first (None is returned when that ends it).
    Raises :class:`Stopped` when ``stop`` is set before a slot is free or during a backoff:
    a stop never waits out a wait.
    """
    tries = 0
    while True:
        if (refused := hooks.refusal()) is not None:
            raise refused
        async with pacer.slot(stop) as slot:
            if slot is None:
                raise Stopped("stopping: the request was not made")
            if (refused := hooks.refusal()) is not None:  # decided while we waited
                raise refused
            sent_at = slot.sent_at
            await hooks.sending(sent_at)
            try:
                if (late := hooks.held_up(sent_at)) is not None:
                    raise late
                answer = await call()
            except asyncio.CancelledError:
                hooks.cut()
                raise
            except FatalError:  # no connection could ever be made: nothing was created
                with contextlib.suppress(FatalError):  # the first fault is the one to tell
                    hooks.unsent()
                raise
            except SendError as exc:
                slot.observe(exc.ratelimit, limited=isinstance(exc, RateLimited))
                error: SendError = exc
            else:
                slot.observe(answer.ratelimit)
                return answer
        if isinstance(error, RateLimited):
            hooks.unsent()
            hooks.limited()
            continue
        tries += 1
        hooks.failed(error, tries)
        if isinstance(error, OutcomeUnknown):
            if not await hooks.unknown(error, tries, sent_at):
                return None
        else:
            hooks.unsent()
        if not policy.retries(error, tries):
            raise error
        delay = policy.delay(tries, rng)
        hooks.retrying(error, tries, delay)
        if not await sleep_unless(clock, delay, stop):
            raise Stopped("stopping: the retry was not waited for")
