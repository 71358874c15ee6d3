"""Connecting to Redis: checked once at the start, then reconnected through outages.

At the start, what answers must be a Redis that can hold the stream: a refusal (a
password, a permission, protected mode) or something else on the port (an HTTP server, a
Sentinel, a cluster node, a Redis older than 6.2) is a usage error (exit 2), since
running again changes nothing; no answer at all is :class:`QueueUnreachable` (exit 3,
run again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, InvalidResponse, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import QueueUnreachable, UsageError
from worker.queue.failures import FAILING_OVER, REFUSALS, RedisFailures

log = structlog.get_logger("worker.queue")

#: Reconnection attempts before Redis counts as lost: about 30 s of backoff, enough for a
#: server restart; a run cannot tell a long outage from a permanent one.
RECONNECT_RETRIES = 20
#: Seconds a Redis command may go unanswered (reads block for at most one); set here, not
#: left to the client library's default, which was "forever" before redis-py 8.
COMMAND_TIMEOUT = 5.0
#: The oldest Redis with every command the worker uses (XAUTOCLAIM, XPENDING ... IDLE).
MIN_VERSION = (6, 2)
T = TypeVar("T")


class _Reconnecting(ExponentialWithJitterBackoff):
    """redis-py's jittered exponential backoff, saying each time that it reconnects."""

    def compute(self, failures: int) -> float:
        delay = float(super().compute(failures))
        log.warning("queue.reconnecting", attempt=failures, of=RECONNECT_RETRIES,
                    delay=round(delay, 2))  # fmt: skip
        return delay


class _Retry(Retry):
    """redis-py's retry loop, except that a refused password is never retried.

    ``AuthenticationError`` (``NOAUTH``, ``WRONGPASS``) derives from ``ConnectionError``;
    retried, it would look like an outage for half a minute before saying what it is.
    """

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        backoff: Any = self._backoff
        backoff.reset()
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if isinstance(error, REFUSALS) or (is_retryable and not is_retryable(error)):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                if failures > self._retries >= 0:
                    raise error
                await asyncio.sleep(backoff.compute(failures))


def _retry(retries: int, backoff: ExponentialWithJitterBackoff) -> Retry:
    # A read-only replica (a failover under way) is retried like a dropped connection:
    # each retry reconnects, and the address may lead to the new primary by then.
    return _Retry(backoff, retries, supported_errors=(RedisConnectionError, RedisTimeoutError,
                                                      BusyLoadingError, *FAILING_OVER))  # fmt: skip


async def connect(url: str, where: str, failures: Callable[[Redis], RedisFailures]) -> Redis:
    """A Redis connection, checked with PING and INFO: a refusal (a password, a
    permission) or a server that cannot hold the stream is a usage error (exit 2); no
    answer is :class:`QueueUnreachable` (exit 3, run again).

    Once it answered, a dropped connection (a restart, a fail-over) is retried with
    backoff for about 30 s, commands included, before the run gives up on it. A command
    left unanswered for :data:`COMMAND_TIMEOUT` counts as a dropped connection: a frozen
    server or a network that silently lost the peer would otherwise hold it forever.
    """
    first = _retry(1, ExponentialWithJitterBackoff(cap=2.0, base=0.1))
    redis = Redis.from_url(url, decode_responses=True, retry=first, socket_connect_timeout=5,
                           socket_timeout=COMMAND_TIMEOUT)  # fmt: skip
    try:
        # redis-py answers True only for PONG: a server saying OK to anything is no Redis.
        unfit = None if await redis.ping() else "PING was not answered PONG"
        unfit = unfit or await _unfit(redis, where)
    except REFUSALS as exc:
        failure = await failures(redis)(exc, "PING")
        await redis.aclose()
        raise UsageError(str(failure)) from None
    except InvalidResponse as exc:  # something answers, and it is not Redis
        await redis.aclose()
        raise UsageError(
            f"{where} does not answer as Redis does ({_said(exc)}): check the port "
            "in the URL (Redis listens on 6379 unless told otherwise)"
        ) from None
    except (RedisError, OSError) as exc:
        await redis.aclose()
        if isinstance(exc, ResponseError) and str(exc).startswith("DENIED"):
            # Protected mode: it answers and refuses, until its configuration changes.
            raise UsageError(
                f"Redis at {where} refused PING: {_said(exc)}; change its "
                "configuration as it says (bind it, or set a password), then run again"
            ) from None
        # A TLS port spoken to in plain text resets the connection, as a restart does.
        tls = " (if that port speaks TLS, use rediss://)" if url.startswith("redis://") else ""
        raise QueueUnreachable(
            f"cannot reach Redis at {where}: {_said(exc)}; check the host and port "
            f"in the URL{tls}, and once Redis answers, run the same command again"
        ) from None
    if unfit is not None:
        await redis.aclose()
        if unfit.startswith("PING"):
            unfit = (f"{where} does not answer as Redis does ({unfit}): check the port in "
                     "the URL (Redis listens on 6379 unless told otherwise)")  # fmt: skip
        raise UsageError(unfit)
    redis.set_retry(_retry(RECONNECT_RETRIES, _Reconnecting(cap=2.0, base=0.1)))
    return redis


async def _unfit(redis: Redis, where: str) -> str | None:
    """Why the server that answered PING cannot hold the stream, when its INFO says so:
    a cluster node, a Sentinel (it knows where the primary is, and holds no data), or a
    Redis too old."""
    try:
        info: Any = await redis.info("server")
    except ResponseError:
        return None  # INFO refused to this user, or renamed: the commands will tell
    if not isinstance(info, dict):
        return None
    if info.get("redis_mode") == "cluster":
        # The scripts take a stream and its hashes together, keys of different slots.
        return (f"Redis at {where} is a node of a Redis Cluster, which refuses the "
                "worker's scripts (their keys hash to different slots): use a standalone "
                "Redis (a primary, with replicas if you like)")  # fmt: skip
    if info.get("redis_mode") == "sentinel":
        return (f"{where} is a Redis Sentinel, which holds no stream: put the address "
                f"of the primary it watches in the URL{await _primaries(redis)}")  # fmt: skip
    version = str(info.get("redis_version", ""))
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if len(numbers) == 2 and numbers < MIN_VERSION:
        return (f"Redis at {where} is version {version}; the worker needs Redis "
                f"{'.'.join(map(str, MIN_VERSION))} or newer (XAUTOCLAIM): upgrade it, or "
                "point the URL at one that is")  # fmt: skip
    return None


async def _primaries(redis: Redis) -> str:
    """The primaries a Sentinel watches, as ``(it watches NAME at HOST:PORT)``, if it says."""
    try:
        masters: Any = await redis.sentinel_masters()
        watched = [f"{name} at {m['ip']}:{m['port']}" for name, m in sorted(masters.items())]
    except (RedisError, AttributeError, KeyError, TypeError):
        return ""  # only to help: the message stands without it
    return f" (it watches {', '.join(watched)})" if watched else ""


def _said(exc: BaseException) -> str:
    """What an error says, without the period redis-py ends it with: the fix follows."""
    return str(exc).rstrip(".")
