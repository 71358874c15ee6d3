"""A stream consumer's settling side: outcomes on disk become acknowledgements and dead
letters, and the messages still held are kept from other workers meanwhile.

Apart from :mod:`worker.queue.consumer`, which reads, claims and batches, because what is
owed to Redis once an outcome is recorded reads on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import structlog
from redis.exceptions import RedisError

from worker.clock import Clock
from worker.errors import ListingMoved, OutcomeUnknown, QueueLost, TokenNotFound, keeps_pending
from worker.outcome import Outcome, Status
from worker.queue.deliveries import SLICE, HeldDeliveries
from worker.queue.messages import MessageIndex, RecentlySettled
from worker.queue.options import StreamOptions
from worker.queue.stream import StreamQueue, hold_period
from worker.record.report import Report, iso
from worker.run.counts import QueueCounts
from worker.send.sender import Sender
from worker.state import RunState

log = structlog.get_logger("worker.queue")

#: Failures that leave a message pending while the worker goes on, to be checked again:
#: its hold is let go of, so that it is claimed (by any worker) after --claim-idle.
RETRIED_LATER = frozenset({OutcomeUnknown.code, ListingMoved.code})


class Settling:
    """Acknowledges, dead-letters and keeps held messages (the consumer's attributes)."""

    options: StreamOptions
    queue: StreamQueue
    report: Report
    sender: Sender
    index: MessageIndex
    clock: Clock
    state: RunState
    stop: asyncio.Event
    acks: list[str]
    dead: list[tuple[str, dict[str, str]]]
    counts: QueueCounts
    settled: RecentlySettled
    held: HeldDeliveries
    settling: set[str]
    gone: dict[str, float]
    #: The period of pair holds in which the pairs in hand last took theirs.
    holds_period: int

    def on_outcome(self, outcome: Outcome) -> None:
        """An outcome is on disk: acknowledge its messages, or dead-letter them."""
        token = outcome.token
        mids = self.index.pop(token, outcome.emails)
        if outcome.status in (Status.SENT, Status.SKIPPED):  # both are done with
            self.acknowledge([mid for mid in mids if mid is not None])
            return
        error = outcome.error
        if error is None or keeps_pending(error.code):
            if error is not None and error.code in RETRIED_LATER and not self.stop.is_set():
                self.held.forget(mids)  # left pending for its own failure: it counts
            return
        if error.code == TokenNotFound.code:
            self.gone.setdefault(token, self.clock.time())
        for mid, email in zip(mids, outcome.emails, strict=True):
            if mid is not None:
                self.dead_letter(mid, token, email, error.code, error.message)

    def acknowledge(self, mids: list[str]) -> None:
        """Settle messages that are done with here (with the next flush): remembered as
        settled, so that a claim racing with their acknowledgement does not take them
        again."""
        self.acks.extend(mids)
        self.settled.update(mids)

    def dead_letter(self, mid: str, token: str, email: str, code: str, message: str) -> None:
        """Settle one message into the dead-letter stream (with the next flush)."""
        self.settled.update((mid,))
        self.counts.dead_lettered += 1
        self.dead.append((mid, {"token": token, "email": email, "stream_id": mid,
                                "error_code": code, "error_message": message,
                                "failed_at": iso(self.clock.time())}))  # fmt: skip

    async def flush(self) -> None:
        """Make the report durable, then dead-letter and acknowledge what it settles.

        Raises :class:`FatalError` when the report cannot be made durable or Redis is lost:
        the messages then stay pending.
        """
        if isinstance(self.state.fatal, QueueLost):
            return  # with Redis lost, the messages stay pending for the next worker
        acks, dead = self.acks, self.dead
        self.acks, self.dead = [], []
        settling = {*acks, *(mid for mid, _ in dead)}
        self.settling |= settling
        try:
            if acks or dead:
                await self.report.sync()
                await self.queue.settle(acks, dead, self.clock.time())
                self.held.forget(settling)
                for code, count in Counter(f["error_code"] for _, f in dead).items():
                    self.sender.metrics.dead_lettered(code, count)
            if self.queue.answered:  # requests that created nothing: no wait for a claimer
                await self.queue.drop_answered()
        except RedisError as exc:
            raise await self.queue.failure(exc) from None
        finally:
            self.settling -= settling

    async def flush_until(self, finished: asyncio.Event) -> None:
        """Flush every 0.1 s, and once more when ``finished`` is set (a runner's service:
        the last outcomes are acknowledged after the senders are done); every third of
        ``--claim-idle``, and as a period of pair holds starts, keep the messages held
        (see :meth:`keep_held`)."""
        every = self.options.claim_idle / 3
        next_keep = time.monotonic() + every
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.1)
            await self.flush()
            due = hold_period(self.clock.time()) != self.holds_period
            if (due or time.monotonic() >= next_keep) and not finished.is_set():
                await self.keep_held()
                next_keep = time.monotonic() + every
        await self.flush()  # a no-op unless the run ended before the first round

    async def keep_held(self) -> None:
        """Tell Redis the messages held are not abandoned, however long they wait here
        (see :meth:`HeldDeliveries.keep`); here, not in the reading loop, which waits
        whenever the senders are behind."""
        if isinstance(self.state.fatal, QueueLost):
            return
        try:
            ours = await self.held.keep(
                self.queue, {*self.acks, *(m for m, _ in self.dead), *self.settling}
            )
            await self._hold_pairs_again(ours)
        except RedisError as exc:
            raise await self.queue.failure(exc) from None

    async def _hold_pairs_again(self, ours: set[str]) -> None:
        """Once a period, the pairs of the messages still held take their hold again (see
        :meth:`StreamQueue.hold_pairs`). A hold lasts one to two periods, and a message may
        wait here longer, behind the rate limit: once its hold lapsed, the same pair
        enqueued again would be taken by another worker, and sent by both.

        Only ``ours``, the messages :meth:`HeldDeliveries.keep` has just found pending for
        this worker (and made idle for ``--claim-idle`` more): one another worker claimed
        may have been dead-lettered there, its pair let go of for a requeued copy to take."""
        now = self.clock.time()
        if hold_period(now) == self.holds_period:
            return
        self.holds_period = hold_period(now)
        mids, pairs = self.index.pairs(ours)
        taken: set[str] = set()
        for start in range(0, len(mids), SLICE):  # a script call each: Redis never stalls
            end = start + SLICE
            taken |= await self.queue.hold_pairs(mids[start:end], pairs[start:end], now)
        if taken:
            log.warning("queue.hold_lost", messages=len(taken),
                        consequence="another message of the same pair took it: only the "
                        "dashboard check stands between the two")  # fmt: skip
