"""One run: source -> validation -> batching -> senders -> report.

The reader fills a small queue of ready batches; ``--concurrency`` sender tasks drain it.
The queue is bounded, so a fast reader waits for the senders instead of piling batches up.
When ``stop`` is set (SIGTERM), reading stops, batches not yet sent are left for
``--resume``, and in-flight requests get ``grace`` seconds to finish and be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from worker.batching import Batch, Batcher
from worker.clock import Clock, SystemClock
from worker.config import Config
from worker.errors import FatalError, StorageError, UsageError
from worker.journal import Journal, journal_path
from worker.lock import hold_report
from worker.progress import Progress
from worker.report import Report, iso
from worker.resume import (
    History,
    check_resumable,
    load_history,
    require_report,
    settle_unknowns,
)
from worker.send import client_for, pacer_for
from worker.send.pacing import Pacer
from worker.send.sender import Sender
from worker.sources import Source
from worker.validate import Validator

log = structlog.get_logger("worker.pipeline")

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: its exit code and the summary written last to the report."""

    exit_code: int
    summary: dict[str, Any]


async def run(
    config: Config,
    source: Source,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult:
    """Send every valid pair of ``source`` and write the report; returns the exit code.

    The report's lock is held throughout: a second run on the same report is refused
    (:class:`ReportLocked`) before it reads or writes anything.
    """
    if config.resume:
        require_report(config.report_path)
    with hold_report(config.report_path):
        if config.resume:
            check_resumable(config.report_path)
        return await _run(config, source, clock or SystemClock(), rng, stop or asyncio.Event())


async def _run(
    config: Config,
    source: Source,
    clock: Clock,
    rng: random.Random | None,
    stop: asyncio.Event,
) -> RunResult:
    jpath = journal_path(config.report_path)
    history = load_history(config.report_path, jpath) if config.resume else None
    report = Report(config.report_path, overwrite=config.overwrite, resume=config.resume)
    try:
        journal = Journal(jpath, durable=config.durable_journal, truncate=not config.resume)
    except UsageError:
        report.close()
        raise
    if history is not None:
        report.on_batch = history.on_batch
    started = clock.time()
    log.info(
        "run.started",
        source=source.description,
        api=_public_origin(config.api_url),
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        rate=config.rate,
        report=str(config.report_path),
        resume=config.resume,
    )
    try:
        async with client_for(config) as client:
            pacer = pacer_for(config, clock, rng)
            sender = Sender(client, pacer, report, journal, config, clock, rng, stop)
            if history is not None:
                try:
                    await settle_unknowns(history, sender.reconciler, report, journal, clock)
                except FatalError as exc:
                    sender.halt(exc)
            settled_first = report.emails["sent"] + report.emails["failed"]
            counts = new_counts()

            def snapshot() -> dict[str, int]:
                return {"rows": counts["rows"], "valid": counts["valid"],
                        "read_all": counts["read_all"], "sent": report.emails["sent"],
                        "failed": report.emails["failed"], "requests": sender.stats.requests,
                        "waits": pacer.waits}  # fmt: skip

            progress = Progress(snapshot, config.progress, config.progress_every)
            progress.start()
            try:
                await _pump(config, source, report, sender, history, stop, counts)
            finally:
                await progress.close()
            counts["recorded"] = report.emails["sent"] + report.emails["failed"] - settled_first
    finally:
        source.close()
        try:
            report.flush()
        except StorageError as exc:
            sender.halt(exc)
        journal.close()
    summary = build_summary(
        config, source.description, report, sender, pacer, history, counts, started, clock
    )
    return finish(report, summary)


def finish(report: Report, summary: dict[str, Any]) -> RunResult:
    """Write the summary as the report's last record, log it, and return the result.

    When the report cannot be written (the disk that stopped the run), the summary is
    still logged; ``--resume`` does not need it.
    """
    try:
        report.summary(summary)
    except StorageError as exc:
        log.error("run.summary_not_written", path=str(exc.path), cause=exc.cause.strerror)
    log_summary = {k: v for k, v in summary.items() if k not in ("started_at", "finished_at")}
    if summary["aborted"] or summary["exit_code"] == EXIT_ABORTED:
        log.error("run.aborted", **log_summary)
    else:
        log.info("run.finished", **log_summary)
    return RunResult(summary["exit_code"], summary)


async def _pump(
    config: Config,
    source: Source,
    report: Report,
    sender: Sender,
    history: History | None,
    stop: asyncio.Event,
    counts: dict[str, int],
) -> None:
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=config.concurrency * 2)

    async def drain() -> None:
        while (batch := await queue.get()) is not None:
            if not stop.is_set():
                await sender.send(batch)

    async def produce() -> None:
        try:
            async for batch in read_batches(config, source, report, counts, history, stop):
                await queue.put(batch)
        except FatalError as exc:  # the report cannot take the rejected rows
            sender.halt(exc)

    drains = [asyncio.create_task(drain()) for _ in range(config.concurrency)]
    producer = asyncio.create_task(produce())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({producer, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if producer.done():
            producer.result()  # a reader failure ends the run here
        else:
            log.warning("run.stopping", grace=config.grace)
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        for _ in drains:
            await queue.put(None)
        # Senders finish what they hold; after a stop, only for the grace period.
        pending: set[asyncio.Task[None]] = set(drains)
        while pending:
            wait_for_stop = not stop.is_set()
            waiters: set[asyncio.Task[Any]] = pending | ({stopped} if wait_for_stop else set())
            done, _ = await asyncio.wait(
                waiters,
                timeout=None if wait_for_stop else config.grace,
                return_when=asyncio.FIRST_COMPLETED if wait_for_stop else asyncio.ALL_COMPLETED,
            )
            for task in done & pending:
                task.result()
            pending -= done
            if not wait_for_stop and pending:
                log.warning("run.grace_expired", senders=len(pending))
                break
    finally:
        stopped.cancel()
        for task in (producer, *drains):
            task.cancel()
        await asyncio.gather(producer, *drains, return_exceptions=True)


def new_counts() -> dict[str, int]:
    """The counters :func:`read_batches` keeps up to date."""
    return {"rows": 0, "valid": 0, "skipped": 0, "tokens": 0, "read_all": 0}


async def read_batches(
    config: Config,
    source: Source,
    report: Report,
    counts: dict[str, int],
    history: History | None = None,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[Batch]:
    """Read, validate and batch ``source``: the batches to send, rejections to the report.

    Updates ``counts`` (rows, valid, skipped, tokens) as it goes; on ``--resume`` skips
    settled pairs and does not record already-rejected lines again.
    """
    validator = Validator()
    batcher = Batcher(config.batch_size, config.max_buffered_rows)
    known_rejected = history.rejected_lines if history is not None else set()
    settled = history.settled if history is not None else None
    tokens: set[str] = set()
    try:
        async for chunk in source.chunks():
            valid, rejections, skipped = validator.check_rows(chunk, settled)
            counts["rows"] += len(chunk)
            counts["valid"] += len(valid)
            counts["skipped"] += skipped
            for line, reason, token, email in rejections:
                if line not in known_rejected:
                    report.rejected(line, reason, token, email)
            report.flush()
            for batch in batcher.add_many(valid):
                tokens.add(batch.token)
                yield batch
            if stop is not None and stop.is_set():
                return
        counts["read_all"] = 1  # every row is read: the total is known from here on
        for batch in batcher.drain():
            tokens.add(batch.token)
            yield batch
    finally:
        counts["tokens"] = len(tokens)
        report.flush()


def build_summary(
    config: Config,
    description: str,
    report: Report,
    sender: Sender,
    pacer: Pacer,
    history: History | None,
    counts: dict[str, int],
    started: float,
    clock: Clock,
    *,
    stopping_is_normal: bool = False,
) -> dict[str, Any]:
    """The ``summary`` record of a run. ``counts`` holds rows, valid and recorded.

    ``stopping_is_normal``: a queue worker stopped by SIGTERM has lost nothing (what it did
    not settle stays pending in the group), so an interruption alone does not make exit 3.
    """
    finished = clock.time()
    halted = sender.fatal
    interrupted = sender.stopping.is_set() and halted is None
    aborted = sender.aborted
    recorded = counts.pop("recorded", 0)
    counts.pop("read_all", None)
    # Valid pairs read but neither sent nor failed (left for --resume after a stop).
    unsent = max(0, counts["valid"] - recorded)
    totals = history.totals() if history is not None else {
        "emails_failed": report.emails["failed"],
        "rejected": report.rejected_total,
        "unknown": 0,
    }  # fmt: skip
    if aborted or halted is not None or (interrupted and not stopping_is_normal):
        exit_code = EXIT_ABORTED
    elif totals["emails_failed"] or totals["rejected"] or totals["unknown"] or unsent:
        exit_code = EXIT_INCOMPLETE
    else:
        exit_code = EXIT_OK
    summary: dict[str, Any] = {
        "source": description,
        **counts,
        "rejected": report.rejected_total,
        "rejected_by_reason": dict(sorted(report.rejected_by_reason.items())),
        "emails_sent": report.emails["sent"],
        "emails_failed": report.emails["failed"],
        "batches_sent": report.batches["sent"],
        "batches_failed": report.batches["failed"],
        "requests": sender.stats.requests,
        "retries": sender.stats.retries,
        "rate_limited": sender.stats.rate_limited,
        "ratelimit_waits": pacer.waits,
        "splits": sender.stats.splits,
        "unknown_outcomes": sender.stats.unknown_outcomes,
        "reconciled_sent": sender.stats.reconciled_sent,
        "reconcile_requests": sender.reconciler.requests,
        "unsent": unsent,
        "aborted": aborted,
        "abort_reason": sender.abort_error.message if sender.abort_error else None,
        "interrupted": interrupted,
        "halted": {"code": halted.code, "message": str(halted)} if halted is not None else None,
        "resumed": config.resume,
        "exit_code": exit_code,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_ms": round((finished - started) * 1000, 1),
    }
    if history is not None:
        summary["job"] = history.totals()
    return summary


def _public_origin(url: str) -> str:
    """Scheme, host and port only: a URL's user-info could carry credentials."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
