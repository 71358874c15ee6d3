"""Edits of a shared dashboard one at a time across the workers of a stream.

``--add-invitees`` reads a dashboard's invitees and writes them back with its additions.
The API has no version field or ETag, so of two workers writing at once only the last
one's additions stay: people invited whom the dashboard then does not let in, and rows
refused because the read-back did not show them. The workers of a stream share a Redis,
so each edit of a token's dashboard holds a lock there, ``{stream}:edits:{token}:lock``:
under the stream's key pattern, and apart from every group's keys whatever the group's
name.

The lock is a key set only if absent, holding a random token of its holder, with a time
to live; its scripts use only GET, SET and PEXPIREAT, which the ACL rules a worker is
told to have already grant (redis-py's lock would need DEL, PEXPIRE and PTTL too). It
expires :data:`LOCK_TTL` seconds after its holder last renewed it, so a worker killed
mid-edit holds nobody up for long; the holder renews it every third of that while its
paced requests wait for the rate limit. A holder stalled longer than that (SIGSTOP, a
suspended VM) has lost it, and another worker may have edited since: so right before its
write leaves, the holder confirms the lock is still its own, and if not takes it again
and reads the dashboard afresh. A stall after that confirmation, or a write slower than
the lock's life, is not covered: no fencing reaches the API. A writer outside the
stream (a person, a run over a file) does not take the lock: the read-twice and
read-back checks of :mod:`worker.send.rounds` are what catch one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.exceptions import RedisError

from worker.errors import Stopped
from worker.queue.stream import StreamQueue
from worker.send.invitees import Confirm

log = structlog.get_logger("worker.invitees")

#: Seconds a lock outlives its holder's last renewal.
LOCK_TTL = 30.0
#: How often a worker waiting for another's edit tries the lock again.
POLL = 0.05

# KEYS: the lock. ARGV: the holder's token, the time to live in ms. 1 if the lock is the
# holder's now: taken, or already its own (a retried SET whose reply was lost, a renewal).
_TAKE = r"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lock. ARGV: the holder's token, the time to live in ms. 1 if it was still the
# holder's (its time to live starts over), 0 if it had expired or another holds it.
_RENEW = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])
return 1
"""

# KEYS: the lock. ARGV: the holder's token. Let go if still the holder's (an expiry in
# the past deletes the key: PEXPIREAT is granted where DEL may not be).
_LET_GO = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIREAT', KEYS[1], 1) end
return 1
"""


class DashboardEdits:
    """``async with edits.hold(token) as confirm:`` one edit of ``token``'s dashboard at a
    time, across the workers of ``queue``'s stream; a stop ends a wait (:class:`Stopped`)."""

    def __init__(self, queue: StreamQueue, stop: asyncio.Event) -> None:
        self._queue, self._stop = queue, stop
        redis = queue.redis
        self._take: Any = redis.register_script(_TAKE)
        self._renew_script: Any = redis.register_script(_RENEW)
        self._let_go: Any = redis.register_script(_LET_GO)

    def key(self, token: str) -> str:
        """The Redis key of ``token``'s lock."""
        return f"{self._queue.stream}:edits:{token}:lock"

    @contextlib.asynccontextmanager
    async def hold(self, token: str) -> AsyncIterator[Confirm]:
        """Hold the lock of ``token``'s dashboard; a Redis failure halts the run, as any
        other of the stream's commands does."""
        key, mine = self.key(token), secrets.token_hex(16)
        await self._acquire(key, mine)

        async def confirm() -> bool:
            if await self._call(self._renew_script, key, mine):
                return True  # its time to live started over: the write may be slow
            log.warning("invitees.lock_lost", token=token,
                        action="taking it again; the dashboard is read afresh")  # fmt: skip
            await self._acquire(key, mine)
            return False

        done = asyncio.Event()
        renewing = asyncio.create_task(self._renew(key, mine, done))
        try:
            yield confirm
        except BaseException:
            await _ended(renewing, done)
            with contextlib.suppress(RedisError):  # the edit's own failure is the one told
                await self._let_go(keys=[key], args=[mine])
            raise
        await _ended(renewing, done)
        # A refusal halts the run as any command's does: swallowed, each edit of the
        # token would wait out the lock's 30 s, silently.
        await self._call(self._let_go, key, mine)

    async def _acquire(self, key: str, mine: str) -> None:
        # The stop is looked at before each try: batches queued behind this worker's own
        # lock of the token each end at once on a stop, not after a wait of their own.
        while not self._stop.is_set():
            if await self._call(self._take, key, mine):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), POLL)
        raise Stopped("stopping: the dashboard was not edited")

    async def _call(self, script: Any, key: str, mine: str) -> bool:
        try:
            return bool(await script(keys=[key], args=[mine, int(LOCK_TTL * 1000)]))
        except RedisError as exc:
            raise await self._queue.failure(exc, "EVALSHA") from None

    async def _renew(self, key: str, mine: str, done: asyncio.Event) -> None:
        """Renew the lock every third of its life until ``done``.

        ``done`` ends it, not only the cancellation: one that lands as a Redis command
        times out can come back as that command's timeout (a RedisError, suppressed
        here), and a loop that then went on renewing would hold the dashboard's lock for
        good, with the edit waiting for it to end (seen after a SIGSTOP of 35 s)."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), LOCK_TTL / 3)
            if done.is_set():
                return
            # Lost, or Redis failing: the check before the write tells, and takes it again.
            with contextlib.suppress(RedisError):
                await self._renew_script(keys=[key], args=[mine, int(LOCK_TTL * 1000)])


async def _ended(task: asyncio.Task[None], done: asyncio.Event) -> None:
    """End ``task`` (see ``_renew``) and wait for it, without taking its CancelledError:
    a cancellation of the caller arriving meanwhile must still reach the caller."""
    done.set()
    task.cancel()
    await asyncio.wait([task])
