"""Entry points of queue mode: ``run redis://...`` and ``enqueue``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.clock import Clock, SystemClock
from worker.config import Config
from worker.errors import FatalError, InviteWorkerError
from worker.metrics import metrics_for
from worker.queue.connect import connect
from worker.queue.failures import (
    RedisFailures,
    RedisRefused,
)
from worker.queue.lease import ConsumerLease
from worker.queue.mode import StreamMode
from worker.queue.names import closest_streams, wrong_type
from worker.queue.options import StreamOptions
from worker.queue.ratelimit import SharedBudget
from worker.queue.stream import StreamQueue, enqueue_rows
from worker.record.lock import hold_report
from worker.record.report import Report
from worker.run.assembly import assemble
from worker.run.counts import QueueRead
from worker.run.summary import RunResult
from worker.sources import RawRow, Source
from worker.validate import Validator

log = structlog.get_logger("worker.queue")


#: Rows added by one script call: Redis runs a script alone, so a slice keeps that short.
ENQUEUE_SLICE = 2000
#: Seconds a token's dashboard check (who is allowed, invited, in a session) is reused.
PREFLIGHT_TTL = 60.0


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
    connected: Callable[[], object] | None = None,
) -> RunResult[QueueRead]:
    """Consume the stream as one member of the group; returns the exit code and summary.

    ``connected`` is called once Redis answered: until then ``stop`` is not looked at
    (the command line exits at once on a signal then: nothing was read)."""
    with hold_report(config.report_path):
        return await _run_stream(config, options, clock or SystemClock(), rng,
                                 stop or asyncio.Event(), connected)  # fmt: skip


async def _run_stream(
    config: Config,
    options: StreamOptions,
    clock: Clock,
    rng: random.Random | None,
    stop: asyncio.Event,
    connected: Callable[[], object] | None,
) -> RunResult[QueueRead]:
    # Messages trickle in for hours: a dashboard check is good for a minute, not a day.
    config = dataclasses.replace(config, preflight_ttl=config.preflight_ttl or PREFLIGHT_TTL)
    redis = await connect(options.url, options.where, lambda r: RedisFailures(
        r, options.where, options.stream, options.group, options.dead_letter))  # fmt: skip
    queue = _queue(redis, options)
    lease = ConsumerLease(queue)
    try:
        # Before anything is read, and before a signal is looked at: a wait for a killed
        # holder's lease is cut short by a signal at once, as a connection's is.
        await lease.take()
    except FatalError as failure:
        await redis.aclose()
        raise at_start(failure) from None
    except BaseException:
        await redis.aclose()
        raise
    if connected is not None:
        connected()
    metrics = metrics_for(config, mode="queue", consumer=options.consumer)
    try:
        try:
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
            mode = StreamMode(config, options, queue, report, clock, stop, lease)
        except BaseException:
            metrics.close()  # no run follows
            raise
        return await assemble(config, mode, report=report, intents=mode.intents,
                              metrics=metrics, state=mode.state, clock=clock, rng=rng,
                              source=options.where, started=started, shared=shared)  # fmt: skip
    finally:
        await lease.let_go()
        await redis.aclose()


def _queue(redis: Redis, options: StreamOptions) -> StreamQueue:
    return StreamQueue(redis, options.stream, options.group, options.consumer,
                       options.dead_letter, options.where)  # fmt: skip


def command_failures(
    stream: str, where: str, dead_letter: str = ""
) -> Callable[[Redis], RedisFailures]:
    """What Redis errors mean to ``enqueue`` and ``dead-letter`` (no pending messages)."""
    return lambda redis: RedisFailures(redis, where, stream, "", dead_letter, worker=False)


async def enqueue(
    source: Source,
    url: str,
    stream: str,
    where: str,
    stop: asyncio.Event | None = None,
    connected: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Load valid rows of a file into a stream as ``token``/``email`` messages.

    Rejected rows are logged (``enqueue.rejected`` with line and reason) and counted. A
    Redis error ends it with the failure it means, saying how many rows were added.
    ``stop`` set (a signal; ``connected`` is called once it can be) ends it between two
    chunks of the input: the summary then says ``interrupted`` and ``last_line``, the
    input's last line added or rejected (every one before it was too, none after).
    """
    failures = command_failures(stream, where)
    redis = await connect(url, where, failures)
    if connected is not None:
        connected()
    stop = stop or asyncio.Event()
    validator = Validator()
    enqueued, last_line, interrupted = 0, 0, False
    rejected: Counter[str] = Counter()
    chunks = source.chunks()
    try:
        await _require_stream_or_none(redis, stream, failures)
        while (chunk := await _next_unless_stopped(chunks, stop)) is not None:
            if chunk is STOPPED:
                interrupted = True
                break
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
            last_line = chunk[-1][0] if chunk else last_line
    finally:
        source.close()
        await redis.aclose()
    summary = {"stream": stream, "enqueued": enqueued, "rejected": sum(rejected.values()),
               "rejected_by_reason": dict(sorted(rejected.items()))}  # fmt: skip
    if interrupted:
        summary.update(interrupted=True, last_line=last_line)
    log.info("enqueue.finished", **summary)
    return summary


async def _require_stream_or_none(
    redis: Redis, stream: str, failures: Callable[[Redis], RedisFailures]
) -> None:
    """``stream`` is a stream or nothing yet (XADD creates it); a key of another type is
    a mistyped name, refused before any row is read (exit 2)."""
    try:
        refused = wrong_type(stream, str(await redis.type(stream)))
    except RedisError as exc:
        raise at_start(await failures(redis)(exc, "TYPE")) from None
    if refused is not None:
        raise refused


#: Seconds a stopped enqueue still waits for its input's next read: the end of a file
#: comes at once, a silent pipe's next row may never.
END_GRACE = 0.05
#: What :func:`_next_unless_stopped` returns once stopped: no chunk is this object.
STOPPED = cast(Sequence[RawRow], object())


async def _next_unless_stopped(
    chunks: AsyncIterator[Sequence[RawRow]], stop: asyncio.Event
) -> Sequence[RawRow] | None:
    """The next chunk (None at the end), or :data:`STOPPED` once ``stop`` is set first:
    the read is then cancelled, since a pipe's writer may be silent for hours. Stopped,
    it still looks a moment (:data:`END_GRACE`) whether the input has ended: a stop
    during the last chunk leaves nothing to finish, and must not say otherwise."""
    read = asyncio.ensure_future(anext(chunks, None))
    try:
        if not stop.is_set():
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((read, stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
        if not read.done():
            await asyncio.wait((read,), timeout=END_GRACE)
    finally:
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
    if read.cancelled():
        return STOPPED
    chunk: Sequence[RawRow] | None = read.result()
    # Rows read once stopped are not added: the summary's last_line stays before them.
    return STOPPED if chunk is not None and stop.is_set() else chunk
