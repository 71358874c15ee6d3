"""One live process per ``--consumer`` name: the name's lease in Redis.

A consumer's pending messages are its own: a worker sends only messages pending for its
name, and one started under that name re-reads them all. Two processes running at once
under one name would each take the other's messages for their own, and invite people
twice. So a worker holds its name: ``<stream>:<group>:consumer:<name>`` holds a random
token of its holder and when the holder last renewed it (every
:data:`RENEW_EVERY` seconds).

- **At the start**, a name held by a live process (renewed within :data:`LEASE_TTL`
  seconds) is refused (exit 2), as soon as a renewal shows the holder alive. A holder that
  does not renew (killed without a chance to let go) is waited for, up to
  :data:`LEASE_TTL`: then the name is taken over, and its pending messages with it.
- **While it runs**, a worker records a request's intents only while the name holds its
  own token, in the same script (:data:`~worker.queue.scripts.INTENTS`): a worker that
  stalled past the lease, and whose name was taken over meanwhile, sends nothing more and
  halts (``consumer_taken_over``); the worker that took over settles its messages, those
  it had sent included (their intents are recorded). An outage of Redis takes nobody's
  name: only a process starting under it does. The key itself goes
  :data:`KEEP_SECONDS` after its last renewal.
- **At the end** the worker lets go of its name, so a restart under it starts at once;
  the key still names it, so a worker stalled meanwhile still finds the name another's.

The scripts use only GET and SET, which the ACL rules a worker is told to
have already grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError

from worker.errors import ConsumerTakenOver, UsageError
from worker.queue.scripts import HOLDS_NAME

if TYPE_CHECKING:
    from worker.queue.stream import StreamQueue

log = structlog.get_logger("worker.queue")

#: Seconds a holder that stopped renewing keeps its name from a process starting under it.
LEASE_TTL = 10.0
#: How often a worker renews its name.
RENEW_EVERY = LEASE_TTL / 4
#: Seconds the key lives after its last renewal, then goes by itself. Longer than a worker
#: stays cut off from Redis before it halts (about 30 s), so one that reconnects finds its
#: own token; a worker stalled longer finds the key gone, takes that for a takeover
#: (which it cannot rule out), and halts.
KEEP_SECONDS = 3600.0
#: How often a worker waiting for a silent holder's lease looks again.
POLL = 0.2
#: Seconds a worker that ends waits for Redis to take its letting go of its name.
LET_GO_WAIT = 2.0

# KEYS: the name's key. ARGV: the token, the time now, LEASE_TTL and KEEP_SECONDS (all in
# ms), and a renewal the caller has seen unchanged for LEASE_TTL by its own clock (or
# ""). Takes the name if it is free, its own, or its holder has not renewed it for
# LEASE_TTL (by the time given, or since that renewal): "1". Else "0 RENEWED": when its
# holder last renewed it.
TAKE_NAME = r"""
local value = redis.call('GET', KEYS[1])
if value then
  local holder, renewed = string.match(value, '^(%S+) (%d+)$')
  if holder and holder ~= ARGV[1] and renewed ~= ARGV[5]
      and tonumber(ARGV[2]) - tonumber(renewed) < tonumber(ARGV[3]) then
    return '0 ' .. renewed
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[4])
return '1'
"""

# KEYS: the name's key. ARGV: the token, the time now and KEEP_SECONDS (in ms). 1 if the
# name is still the token's (renewed now), 0 if another process took it over (or the key
# is gone).
RENEW_NAME = (
    HOLDS_NAME
    + r"""
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
return 1
"""
)

# KEYS: the name's key. ARGV: the token, the time now and KEEP_SECONDS (in ms). Let go
# if still the token's: renewed at 0, so free to take at once, but still naming its last
# holder, so that a worker stalled meanwhile still finds its name another's.
LET_GO_NAME = (
    HOLDS_NAME
    + r"""
if holds(KEYS[1], ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1] .. ' 0', 'PX', ARGV[3]) end
return 1
"""
)


class ConsumerInUse(UsageError):
    """Another live process runs under this ``--consumer`` name (exit 2)."""


def lease_key(stream: str, group: str, consumer: str) -> str:
    """The key of a consumer name's lease."""
    return f"{stream}:{group}:consumer:{consumer}"


class ConsumerLease:
    """This process's hold on its ``--consumer`` name (see the module)."""

    def __init__(self, queue: StreamQueue) -> None:
        self._queue = queue
        self.key = queue.lease_key
        self.token = queue.lease_token
        redis = queue.redis
        self._take: Any = redis.register_script(TAKE_NAME)
        self._renew: Any = redis.register_script(RENEW_NAME)
        self._let_go: Any = redis.register_script(LET_GO_NAME)

    async def take(self) -> None:
        """Take the name, waiting out a holder that stopped renewing it; a live holder's
        renewal refuses the start (:class:`ConsumerInUse`)."""
        first: int | None = None
        started, told = time.monotonic(), False
        while True:
            # Seen unchanged for LEASE_TTL by this clock, the holder is silent, whatever the
            # difference between its clock and this one.
            silent = str(first) if time.monotonic() - started >= LEASE_TTL else ""
            reply = await self._call(self._take, LEASE_TTL, KEEP_SECONDS, silent)
            taken, *stamps = reply.split()
            now = time.time()
            if taken == "1":
                if told:
                    log.info("queue.consumer_taken_over", consumer=self._queue.consumer,
                             waited=round(time.monotonic() - started, 1))  # fmt: skip
                return
            renewed = int(stamps[0])
            if first is None:
                first = renewed
            elif renewed != first:
                raise ConsumerInUse(self._in_use(now - renewed / 1000))
            elif not told and time.monotonic() - started > RENEW_EVERY + POLL:
                # Said only once a live holder would have renewed: a start that is
                # refused does not first say it waits.
                told = True
                log.warning("queue.consumer_waiting", consumer=self._queue.consumer,
                            renewed_ago=round(now - renewed / 1000, 1), action="another "
                            "process held this --consumer name and stopped renewing it (one "
                            f"killed without letting go): waiting until it has been silent "
                            f"for {LEASE_TTL:g} s")  # fmt: skip
            await asyncio.sleep(POLL)

    def _in_use(self, ago: float) -> str:
        queue = self._queue
        return (f"another live process is consuming stream '{queue.stream}' (group "
                f"'{queue.group}') as --consumer '{queue.consumer}': it renewed its hold "
                f"{ago:.1f} s ago. Give each process its own --consumer name (two under one "
                "name would each take the other's messages, and invite people twice); the "
                "default, host and pid, is unique")  # fmt: skip

    async def keep(self, finished: asyncio.Event) -> None:
        """Renew the name every :data:`RENEW_EVERY` seconds until ``finished`` (a runner's
        service); taken over meanwhile, the run halts (:class:`ConsumerTakenOver`)."""
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), RENEW_EVERY)
            if not await self._call(self._renew, KEEP_SECONDS):
                raise await self._queue.name_lost()

    async def let_go(self) -> None:
        """Free the name, if still this process's: a restart under it starts at once. A
        failure here is not the run's: the name then frees itself after LEASE_TTL. Not
        waited for past :data:`LET_GO_WAIT`: a run that ends because Redis stopped
        answering has already waited out the reconnections once."""
        with contextlib.suppress(RedisError, TimeoutError):
            args = [self.token, int(time.time() * 1000), int(KEEP_SECONDS * 1000)]
            await asyncio.wait_for(self._let_go(keys=[self.key], args=args), LET_GO_WAIT)

    async def _call(self, script: Any, *seconds: float | str) -> Any:
        # The time is the worker's: TIME is not among the commands a worker is granted.
        # Whose the name is never depends on clocks; a silent holder is waited for at
        # most LEASE_TTL (see take), and a live one whose clock runs LEASE_TTL behind
        # this one's is taken over (it halts, and sends nothing more).
        ms = (s if isinstance(s, str) else int(s * 1000) for s in seconds)
        args = [self.token, int(time.time() * 1000), *ms]
        try:
            return await script(keys=[self.key], args=args)
        except RedisError as exc:
            raise await self._queue.failure(exc, "EVALSHA") from None


def taken_over(consumer: str, *, gone: bool = False) -> ConsumerTakenOver:
    """The halt of a worker whose name another process took over (``gone``: whose name's
    key is not there at all, which a takeover cannot be ruled out from)."""
    if gone:
        why = (f"this worker's hold on --consumer '{consumer}' is gone from Redis (it did not "
               f"renew it for {KEEP_SECONDS / 3600:g} h, or Redis lost it), and another "
               "process may have taken over since")  # fmt: skip
    else:
        why = (f"another process took over --consumer '{consumer}': it found this one's "
               f"last renewal over {LEASE_TTL:g} s old (this one stalled or was cut off from "
               "Redis, or its clock runs behind that process's)")  # fmt: skip
    return ConsumerTakenOver(
        f"{why}, so nothing more is sent here; nothing is lost: what "
        "this one held stays pending for the process under that name"
    )
