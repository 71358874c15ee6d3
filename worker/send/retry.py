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
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

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


@dataclass(slots=True)
class Tally:
    """What a reader's requests met, for the summary: 429 answers and retries."""

    limited: int = 0
    retries: int = 0


class Unsettled(InviteWorkerError):
    """A :class:`Once` request that failed for a reason worth trying again — a 429, a 5xx,
    a broken connection, no answer — and was not made again. ``maybe_applied``: the
    service may have acted on it (its outcome is unknown)."""

    def __init__(
        self, cause: SendError | None, *, final: bool = False, stopped: bool = False
    ) -> None:
        super().__init__(f"made once, not again: {cause or 'rate limited (429)'}")
        self.maybe_applied = isinstance(cause, OutcomeUnknown)
        #: A failed try as ``--max-attempts`` counts them (a 429 is none), and whether it
        #: was the last the policy allows.
        self.failed, self.final = cause is not None, final
        #: A stop came during the backoff that followed (the caller stops too).
        self.stopped = stopped


class Once(Generic[A]):
    """A request :func:`paced_call` makes at most once: a dashboard's write, whose body is
    good only for the reads it came from. Paced like any other; a failure worth trying
    again ends it with :class:`Unsettled` — after the policy's backoff for try ``tries``
    (a 429: the pacer's pause holds the next requests instead), never retried, nothing
    counted twice — and the caller reads again before it writes again, up to the
    policy's attempts."""

    def __init__(self, call: Callable[[], Awaitable[A]], tries: int = 1) -> None:
        """``tries``: which try of the caller's this is (its backoff and its last)."""
        self._call, self.tries = call, tries
        self.made = False

    async def __call__(self) -> A:
        self.made = True
        return await self._call()


#: A :class:`Once` request's policy: no retry (a 429 ends it through the hooks' refusal).
_ONCE = RetryPolicy(attempts=1, base=0.0, cap=0.0)


class _Counted(Hooks):
    def __init__(
        self, counted: Callable[[], None], tally: Tally | None, once: Once[Any] | None = None
    ) -> None:
        self._counted = counted
        self._tally = tally
        self._once = once

    def refusal(self) -> InviteWorkerError | None:
        # Asked again after a 429 (the one failure the loop goes on from by itself).
        return Unsettled(None) if self._once is not None and self._once.made else None

    async def sending(self, sent_at: float) -> None:
        self._counted()

    def limited(self) -> None:
        if self._tally is not None:
            self._tally.limited += 1

    def retrying(self, error: SendError, attempt: int, delay: float) -> None:
        if self._tally is not None:
            self._tally.retries += 1


async def paced_call(
    call: Callable[[], Awaitable[A]],
    pacer: Pacer,
    policy: RetryPolicy,
    clock: Clock,
    rng: random.Random,
    counted: Callable[[], None],
    *,
    stop: asyncio.Event | None = None,
    tally: Tally | None = None,
) -> A:
    """One request (a read, or an idempotent write) through :func:`attempt`.

    ``counted`` is called for every request made and ``tally`` counts its 429s and
    retries (for the summary's counters); with ``stop``, a stop ends it with
    :class:`Stopped`.
    """
    once = call if isinstance(call, Once) else None
    try:
        answer = await attempt(call, _Counted(counted, tally, once), pacer=pacer,
                               policy=policy if once is None else _ONCE, clock=clock, rng=rng,
                               stop=stop)  # fmt: skip
    except RetryableError as exc:
        if once is None:
            raise
        if not policy.retries(exc, once.tries):
            raise Unsettled(exc, final=True) from None
        # Backed off as a retry would be, so the reads that follow do not press a service
        # that just failed; a stop ends the wait, and the caller learns of both.
        waited = await sleep_unless(clock, policy.delay(once.tries, rng), stop)
        raise Unsettled(exc, stopped=not waited) from None
    assert answer is not None  # the default hooks never end the attempts early
    return answer
