"""Connecting to Redis: checked once at the start, then reconnected through outages.

At the start, what answers must be a Redis that can hold the stream: a refusal (a
password, a permission, protected mode) or something else on the port (an HTTP server, a
Sentinel, a cluster node, a Redis older than 6.2) is a usage error (exit 2), since
running again changes nothing; no answer at all is :class:`QueueUnreachable` (exit 3,
run again).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    InvalidResponse,
    RedisError,
    ResponseError,
    TryAgainError,
)
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
    """A Redis connection, checked with PING, INFO and COMMAND INFO: a refusal (a
    password, a permission) or a server that cannot hold the stream is a usage error
    (exit 2); no answer is :class:`QueueUnreachable` (exit 3, run again).

    Once it answered, a dropped connection (a restart, a fail-over) is retried with
    backoff for about 30 s, commands included, before the run gives up on it. A command
    left unanswered for :data:`COMMAND_TIMEOUT` counts as a dropped connection: a frozen
    server or a network that silently lost the peer would otherwise hold it forever.
    """
    first = _retry(1, ExponentialWithJitterBackoff(cap=2.0, base=0.1))
    # Other producers may write any bytes into a message: a strict decoder raises in the
    # middle of a reply (every worker that reads it, forever). Escaped, the bytes that
    # are not UTF-8 come through as lone surrogates, which the consumer rejects
    # (bad_encoding), and go back to Redis as the very bytes they were.
    redis = Redis.from_url(url, decode_responses=True, encoding_errors="surrogateescape",
                           retry=first, socket_connect_timeout=5,
                           socket_timeout=COMMAND_TIMEOUT)  # fmt: skip
    answered = False
    try:
        # redis-py answers True only for PONG: a server saying OK to anything is no Redis.
        if not await redis.ping():
            raise UsageError(f"{where} does not answer as Redis does (PING was not "
                             f"answered PONG): {CHECK_PORT}")  # fmt: skip
        answered = True
        unfit = await _unfit(redis, where)
    except REFUSALS as exc:
        failure = await failures(redis)(exc, "PING")
        await redis.aclose()
        raise UsageError(str(failure)) from None
    except (RedisError, OSError, UsageError) as exc:
        await redis.aclose()
        raise _at_start(exc, url, where, answered=answered) from None
    if unfit is not None:
        await redis.aclose()
        raise UsageError(unfit)
    redis.set_retry(_retry(RECONNECT_RETRIES, _Reconnecting(cap=2.0, base=0.1)))
    return redis


CHECK_PORT = "check the port in the URL (Redis listens on 6379 unless told otherwise)"


def _at_start(
    exc: RedisError | OSError | UsageError, url: str, where: str, *, answered: bool
) -> UsageError | QueueUnreachable:
    """What an error while connecting means: the set-up's mistake (exit 2), or a Redis
    not answering (exit 3, the same command again once it does)."""
    if isinstance(exc, UsageError):
        return exc
    if isinstance(exc, InvalidResponse):  # something answers, and it is not Redis
        return UsageError(f"{where} does not answer as Redis does ({_said(exc)}): {CHECK_PORT}")
    said = _said(exc)
    refused = _certificate_refused(exc)
    if refused is not None:
        return UsageError(f"Redis at {where} showed a certificate that could not be "
                          f"verified ({refused.verify_message}): if your own CA signed it, "
                          "point SSL_CERT_FILE at that CA's certificate; else check the "
                          "host in the URL")  # fmt: skip
    if isinstance(exc, _NOT_READY) or (isinstance(exc, ResponseError)
                                       and said.startswith("BUSY ")):  # fmt: skip
        # A state it passes through: a replica without its primary, a cluster
        # reconfiguring, a script running (BUSY has no class of its own in redis-py).
        return QueueUnreachable(f"Redis at {where} is not ready ({said}): run the same "
                                "command again once it is")  # fmt: skip
    if isinstance(exc, ResponseError):
        return _answered_with(said, where)
    if isinstance(exc, BusyLoadingError):
        return QueueUnreachable(f"Redis at {where} is loading its data into memory "
                                f"({said}): run the same command again once it has")  # fmt: skip
    if answered:
        return QueueUnreachable(f"Redis at {where} answered PING, then no more ({said}): "
                                "run the same command again once it answers")  # fmt: skip
    if "max number of clients reached" in said:  # redis-py's ConnectionError for it
        return QueueUnreachable(f"Redis at {where} takes no more clients ({said}): run the "
                                "same command again once some have gone, or raise its "
                                "maxclients")  # fmt: skip
    # A TLS port spoken to in plain text resets the connection, as a restart does; a
    # plain port spoken to in TLS leaves the handshake unanswered.
    hint = (" (if that port speaks TLS, use rediss://)" if url.startswith("redis://")
            else " (if that port speaks plain text, use redis://)")  # fmt: skip
    return QueueUnreachable(f"cannot reach Redis at {where}: {said}; check the host and port "
                            f"in the URL{hint}, and once Redis answers, run the same command "
                            "again")  # fmt: skip


def _answered_with(said: str, where: str) -> UsageError | QueueUnreachable:
    """What an error Redis answered while connecting (``said``) means."""
    if said.startswith("DENIED"):
        # Protected mode: it answers and refuses, until its configuration changes.
        return UsageError(f"Redis at {where} refused PING: {said}; change its configuration "
                          "as it says (bind it, or set a password), then run again")  # fmt: skip
    if "HELLO" in said and "unknown command" in said:
        # The client opens with HELLO (Redis 6.0); only an older server does not know it.
        return UsageError(f"Redis at {where} does not know HELLO, so it is older than Redis "
                          f"6.0; {NEEDS}: upgrade it, or point the URL at one that is")  # fmt: skip
    # An answer, not a state it passes through (see _NOT_READY; a database the URL names
    # and Redis has not, say): running again changes nothing.
    return UsageError(f"Redis at {where} refused the connection ({said}): fix what it "
                      "says in the URL or in Redis, then run again")  # fmt: skip


NEEDS = "the worker needs Redis 6.2 or newer (or a server with its stream commands)"
#: Errors of a Redis passing through a state (a replica without its primary, a cluster
#: reconfiguring; MasterDownError is a ClusterDownError): the same command may work soon.
_NOT_READY = (TryAgainError, ClusterDownError)


def _certificate_refused(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under ``exc``, if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(5):  # redis-py wraps it once or twice
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _unfit(redis: Redis, where: str) -> str | None:
    """Why the server that answered PING cannot hold the stream, when it says so: a
    cluster node or a Sentinel (INFO's mode), or a server without XAUTOCLAIM (Redis 6.2).

    What it has is asked, not read from ``redis_version``: Redis-compatible servers set
    that as they please (Kvrocks says 4.0.0 and has every command the worker uses). A
    user not allowed INFO or COMMAND is not refused for it: its commands will tell.
    """
    try:
        info: Any = await redis.info("server")
    except ResponseError:
        info = {}
    info = info if isinstance(info, dict) else {}
    mode = info.get("redis_mode") or info.get("server_mode")  # Valkey 8: server_mode
    if mode == "cluster":
        # The scripts take a stream and its hashes together, keys of different slots.
        return (f"Redis at {where} is a node of a Redis Cluster, which refuses the "
                "worker's scripts (their keys hash to different slots): use a standalone "
                "Redis (a primary, with replicas if you like)")  # fmt: skip
    if mode == "sentinel":
        return (f"{where} is a Redis Sentinel, which holds no stream: put the address "
                f"of the primary it watches in the URL{await _primaries(redis)}")  # fmt: skip
    try:
        # One word, so redis-py's parser for COMMAND (which fails on a nil) is not used.
        ask: Any = redis.execute_command  # untyped in redis-py
        known: Any = await ask("COMMAND INFO", "XAUTOCLAIM")
    except ResponseError:
        return None
    if isinstance(known, list) and known == [None]:
        version = info.get("redis_version")
        told = f" (it says it is version {version})" if version else ""
        return (f"Redis at {where} does not know XAUTOCLAIM{told}; {NEEDS}: upgrade it, "
                "or point the URL at one that is")  # fmt: skip
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
