"""Entry points of queue mode: ``run redis://...`` and ``enqueue``."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, InvalidResponse, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.clock import Clock, SystemClock
from worker.config import Config
from worker.errors import FatalError, InviteWorkerError, QueueUnreachable, UsageError
from worker.metrics import metrics_for
from worker.queue.failures import (
    FAILING_OVER,
    REFUSALS,
    RedisFailures,
    RedisRefused,
)
from worker.queue.mode import StreamMode
from worker.queue.names import closest_streams
from worker.queue.options import StreamOptions
from worker.queue.ratelimit import SharedBudget
from worker.queue.stream import StreamQueue, enqueue_rows
from worker.record.lock import hold_report
from worker.record.report import Report
from worker.run.assembly import assemble
from worker.run.counts import QueueRead
from worker.run.summary import RunResult
from worker.sources import Source
from worker.validate import Validator

log = structlog.get_logger("worker.queue")


#: Reconnection attempts before Redis counts as lost: about 30 s of backoff, enough for a
#: server restart; a run cannot tell a long outage from a permanent one.
RECONNECT_RETRIES = 20
#: Rows added by one script call: Redis runs a script alone, so a slice keeps that short.
ENQUEUE_SLICE = 2000
#: Seconds a token's dashboard check (who is allowed, invited, in a session) is reused.
PREFLIGHT_TTL = 60.0
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
    """A Redis connection, checked with PING: a refusal (a password, a permission) is a
    usage error (exit 2); no answer is :class:`QueueUnreachable` (exit 3, run again).

    Once it answered, a dropped connection (a restart, a fail-over) is retried with
    backoff for about 30 s, commands included, before the run gives up on it. A command
    left unanswered for :data:`COMMAND_TIMEOUT` counts as a dropped connection: a frozen
    server or a network that silently lost the peer would otherwise hold it forever.
    """
    first = _retry(1, ExponentialWithJitterBackoff(cap=2.0, base=0.1))
    redis = Redis.from_url(url, decode_responses=True, retry=first, socket_connect_timeout=5,
                           socket_timeout=COMMAND_TIMEOUT)  # fmt: skip
    try:
        await redis.ping()
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
    redis.set_retry(_retry(RECONNECT_RETRIES, _Reconnecting(cap=2.0, base=0.1)))
    return redis


def _said(exc: BaseException) -> str:
    """What an error says, without the period redis-py ends it with: the fix follows."""
    return str(exc).rstrip(".")


def at_start(failure: FatalError) -> InviteWorkerError:
    """A failure before anything was read: a refusal is a usage error (exit 2)."""
    return failure.as_usage() if isinstance(failure, RedisRefused) else failure


async def run_stream(
    config: Config,
    options: StreamOptions,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult[QueueRead]:
    """Consume the stream as one member of the group; returns the exit code and summary."""
    with hold_report(config.report_path):
        return await _run_stream(config, options, clock or SystemClock(), rng,
                                 stop or asyncio.Event())  # fmt: skip


async def _run_stream(
    config: Config,
    options: StreamOptions,
    clock: Clock,
    rng: random.Random | None,
    stop: asyncio.Event,
) -> RunResult[QueueRead]:
    # Messages trickle in for hours: a dashboard check is good for a minute, not a day.
    config = dataclasses.replace(config, preflight_ttl=config.preflight_ttl or PREFLIGHT_TTL)
    redis = await connect(options.url, options.where, lambda r: RedisFailures(
        r, options.where, options.stream, options.group, options.dead_letter))  # fmt: skip
    metrics = metrics_for(config, mode="queue", consumer=options.consumer)
    try:
        try:
            queue = _queue(redis, options)
            try:
                if await queue.ensure_group():
                    # Waiting for the stream is right when producers create it later, and
                    # silent forever when --stream has a typo: say which it may have meant.
                    closest, _ = await closest_streams(redis, options.stream)
                    log.warning("queue.stream_created", stream=options.stream,
                                other_streams=closest, action="waiting for messages; "
                                "if --stream has a typo, stop; name one of these")  # fmt: skip
            except RedisError as exc:
                raise at_start(await queue.failure(exc, "XGROUP CREATE")) from None
            # A queue worker's report is its log: each run appends to it.
            report = Report(config.report_path, overwrite=config.overwrite, resume=True)
            started = clock.time()
            log.info("run.started", source=options.where, group=options.group,
                     consumer=options.consumer, until_empty=options.until_empty,
                     report=str(config.report_path))  # fmt: skip
            report.metrics = metrics
            shared = SharedBudget(redis, urlsplit(config.api_url).netloc, options.where,
                                  queue.failure)  # fmt: skip
            mode = StreamMode(config, options, queue, report, clock, stop)
        except BaseException:
            metrics.close()  # no run follows
            raise
        return await assemble(config, mode, report=report, intents=mode.intents,
                              metrics=metrics, state=mode.state, clock=clock, rng=rng,
                              source=options.where, started=started, shared=shared)  # fmt: skip
    finally:
        await redis.aclose()


def _queue(redis: Redis, options: StreamOptions) -> StreamQueue:
    return StreamQueue(redis, options.stream, options.group, options.consumer,
                       options.dead_letter, options.where)  # fmt: skip


def command_failures(
    stream: str, where: str, dead_letter: str = ""
) -> Callable[[Redis], RedisFailures]:
    """What Redis errors mean to ``enqueue`` and ``dead-letter`` (no pending messages)."""
    return lambda redis: RedisFailures(redis, where, stream, "", dead_letter, worker=False)


async def enqueue(source: Source, url: str, stream: str, where: str) -> dict[str, Any]:
    """Load valid rows of a file into a stream as ``token``/``email`` messages.

    Rejected rows are logged (``enqueue.rejected`` with line and reason) and counted. A
    Redis error ends it with the failure it means, saying how many rows were added.
    """
    failures = command_failures(stream, where)
    redis = await connect(url, where, failures)
    validator = Validator()
    enqueued = 0
    rejected: Counter[str] = Counter()
    try:
        async for chunk in source.chunks():
            valid, rejections, _ = validator.check_rows(chunk)
            for line, reason, _token, _email in rejections:
                rejected[str(reason)] += 1
                log.warning("enqueue.rejected", line=line, reason=str(reason))
            for start in range(0, len(valid), ENQUEUE_SLICE):
                rows = valid[start : start + ENQUEUE_SLICE]
                try:
                    enqueued += await enqueue_rows(redis, stream, rows)
                except RedisError as exc:
                    failure = at_start(await failures(redis)(exc, "EVALSHA (XADD)"))
                    again = (" (the whole file again would add those a second time: "
                             "enqueue only the rest)") if enqueued else ""  # fmt: skip
                    failure.args = (f"{failure}; {enqueued:,} row(s) had been added to the "
                                    f"stream, the rest of the input was not{again}",)  # fmt: skip
                    raise failure from None
    finally:
        source.close()
        await redis.aclose()
    summary = {"stream": stream, "enqueued": enqueued, "rejected": sum(rejected.values()),
               "rejected_by_reason": dict(sorted(rejected.items()))}  # fmt: skip
    log.info("enqueue.finished", **summary)
    return summary
