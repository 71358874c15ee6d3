"""Edits of a shared dashboard one at a time across the workers of a stream.

``--add-invitees`` reads a dashboard's invitees and writes them back with its additions.
The API has no version field or ETag, so of two workers writing at once only the last
one's additions stay: people invited whom the dashboard then does not let in, and rows
refused because the read-back did not show them. The workers of a stream share a Redis,
so each edit of a token's dashboard holds a lock there (``{stream}:edit:{token}``, under
the stream's own key pattern: the ACL rules a worker already has cover it).

The lock expires :data:`LOCK_TTL` seconds after its holder last renewed it, so a worker
killed mid-edit holds nobody up for long; the holder renews it every third of that while
its paced requests wait for the rate limit. A holder stalled longer than that (SIGSTOP, a
suspended VM) has lost it, and another worker may have edited since: so right before its
write leaves, the holder confirms the lock is still its own, and if not takes it again
and reads the dashboard afresh. A writer outside the stream (a person, a run over a file)
is not held by it: the read-twice and read-back checks of :mod:`worker.send.invitees` are
what catch one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from worker.errors import Stopped
from worker.queue.stream import StreamQueue
from worker.send.invitees import Confirm

log = structlog.get_logger("worker.invitees")

#: Seconds a lock outlives its holder's last renewal.
LOCK_TTL = 30.0
#: How often a waiting worker looks at its stop while another worker edits.
STOP_CHECK = 0.5


class DashboardEdits:
    """``async with edits.hold(token) as confirm:`` one edit of ``token``'s dashboard at a
    time, across the workers of ``queue``'s stream; a stop ends a wait (:class:`Stopped`)."""

    def __init__(self, queue: StreamQueue, stop: asyncio.Event) -> None:
        self._queue, self._stop = queue, stop

    @contextlib.asynccontextmanager
    async def hold(self, token: str) -> AsyncIterator[Confirm]:
        """Hold the lock of ``token``'s dashboard; a Redis failure halts the run, as any
        other of the stream's commands does."""
        name = f"{self._queue.stream}:edit:{token}"
        lock = self._queue.redis.lock(name, timeout=LOCK_TTL, sleep=0.05, thread_local=False)
        await self._acquire(lock)

        async def confirm() -> bool:
            try:
                await lock.reacquire()  # its time to live starts over: the write may be slow
                return True
            except LockNotOwnedError:
                log.warning("invitees.lock_lost", token=token,
                            action="taking it again; the dashboard is read afresh")  # fmt: skip
            except RedisError as exc:
                raise await self._queue.failure(exc, "EVALSHA") from None
            await self._acquire(lock)
            return False

        renewing = asyncio.create_task(self._renew(lock))
        try:
            yield confirm
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            # Not released (lost, or Redis failed): it expires on its own.
            with contextlib.suppress(LockError, RedisError):
                await lock.release()

    async def _acquire(self, lock: Lock) -> None:
        try:
            while not await lock.acquire(blocking_timeout=STOP_CHECK):
                if self._stop.is_set():
                    raise Stopped("stopping: the dashboard was not edited")
        except RedisError as exc:
            raise await self._queue.failure(exc, "SET") from None

    @staticmethod
    async def _renew(lock: Lock) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            # Lost, or Redis failing: the check before the write tells, and takes it again.
            with contextlib.suppress(LockError, RedisError):
                await lock.extend(LOCK_TTL, replace_ttl=True)
