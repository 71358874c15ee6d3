"""One request through the run's pacer and retry policy (:func:`paced_call`): the reads
and writes that are not invitations — listings, dashboards, revocations — and the
dashboard writes made once (:class:`Once`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

from worker.clock import Clock, sleep_unless
from worker.errors import InviteWorkerError, OutcomeUnknown, RetryableError, SendError
from worker.send.retry import A, Hooks, RetryPolicy, attempt

if TYPE_CHECKING:
    from worker.send.pacing import Pacer


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
