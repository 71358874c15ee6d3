"""One rate-limit budget shared by every worker of an organization, kept in Redis.

Datadog counts requests per organization in calendar-aligned windows, so N workers must
share one budget. Each request first takes a slot from a fixed-window counter in Redis
(an atomic Lua script): at most ``Limit`` per window across all workers. Answers keep the
counter honest (it never sits below what the service says was used), and a 429 seen by
one worker pauses all of them until the window resets.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.queue.failures import RedisFailures

log = structlog.get_logger("worker.queue.ratelimit")

# KEYS: window counter, pause key. ARGV: now, limit, window end (epoch seconds).
# Returns "0" when a slot was taken, else the seconds to wait.
_TAKE = """
local now = tonumber(ARGV[1])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then return tostring(paused - now) end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[2]) then return tostring(tonumber(ARGV[3]) - now) end
redis.call('INCR', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 60000)
return '0'
"""

# KEYS: a key. ARGV: value, expiry (epoch ms). Raises the key to at least the value.
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 0
"""


class SharedBudget:
    """The organization's per-window request budget, shared through Redis."""

    def __init__(
        self, redis: Redis, scope: str, where: str = "", failure: RedisFailures | None = None
    ) -> None:
        self._redis = redis
        self._failure = failure or RedisFailures(redis, where, "", worker=False)
        self._prefix = f"invite-worker:ratelimit:{scope}"
        self._take: Any = redis.register_script(_TAKE)
        self._raise: Any = redis.register_script(_RAISE)
        self._tasks: set[asyncio.Task[Any]] = set()

    def _window_key(self, name: str | None, window: int) -> str:
        return f"{self._prefix}:{name or 'default'}:{window}"

    def _pause_key(self, name: str | None) -> str:
        return f"{self._prefix}:{name or 'default'}:paused-until"

    async def take(self, now: float, limit: int, period: float, name: str | None) -> float:
        """Take one request slot in the current window: 0.0, or the seconds to wait first."""
        window = math.floor(now / period)
        end = (window + 1) * period
        keys = [self._window_key(name, window), self._pause_key(name)]
        try:
            wait = float(await self._take(keys=keys, args=[repr(now), limit, repr(end)]))
        except RedisError as exc:  # no shared budget, no sending
            raise await self._failure(exc) from None
        return max(0.0, wait)

    def observe(self, window_end: float, period: float, used: int, name: str | None) -> None:
        """The service says ``used`` requests of the window ending at ``window_end`` are spent."""
        window = round(window_end / period) - 1
        key = self._window_key(name, window)
        self._spawn(self._raise(keys=[key], args=[used, math.ceil(window_end * 1000) + 60000]))

    def pause(self, until: float, name: str | None) -> None:
        """A 429: every worker waits until ``until`` (epoch seconds)."""
        log.info("ratelimit.shared_pause", until=round(until, 3))
        key = self._pause_key(name)
        self._spawn(self._raise(keys=[key], args=[repr(until), math.ceil(until * 1000) + 1000]))

    def _spawn(self, coro: Any) -> None:
        # Best effort and off the hot path; the task set keeps them from being collected.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("ratelimit.shared_update_failed", error=str(task.exception()))

    async def settle(self) -> None:
        """Wait for updates still in flight (before closing the connection)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
