"""One run: source -> validation -> batching -> senders -> report.

The reader fills a small queue of ready batches; ``--concurrency`` sender tasks drain it.
The queue is bounded, so a fast reader waits for the senders instead of piling batches up.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from worker.batching import Batch, Batcher
from worker.clock import Clock, SystemClock
from worker.config import Config
from worker.report import Report, iso
from worker.send.client import InvitationClient
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
) -> RunResult:
    """Send every valid pair of ``source`` and write the report; returns the exit code."""
    clock = clock or SystemClock()
    report = Report(config.report_path, overwrite=config.overwrite)
    started = clock.time()
    log.info(
        "run.started",
        source=source.description,
        api=_public_origin(config.api_url),
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        rate=config.rate,
        report=str(config.report_path),
    )
    try:
        async with InvitationClient(
            config.api_url,
            config.api_key,
            config.app_key,
            timeout=config.timeout,
            pool_size=config.concurrency + 1,
        ) as client:
            pacer = Pacer(
                clock,
                rate=config.rate,
                jitter=config.ratelimit_jitter,
                default_wait=config.ratelimit_default_wait,
                rng=rng,
            )
            sender = Sender(client, pacer, report, config, clock, rng)
            counts = await _pump(config, source, report, sender)
    finally:
        source.close()
        report.flush()
    finished = clock.time()
    aborted = sender.abort_error is not None
    failed_emails = report.emails["failed"]
    if aborted:
        exit_code = EXIT_ABORTED
    elif failed_emails or report.rejected_total:
        exit_code = EXIT_INCOMPLETE
    else:
        exit_code = EXIT_OK
    summary: dict[str, Any] = {
        "source": source.description,
        **counts,
        "rejected": report.rejected_total,
        "rejected_by_reason": dict(sorted(report.rejected_by_reason.items())),
        "emails_sent": report.emails["sent"],
        "emails_failed": failed_emails,
        "batches_sent": report.batches["sent"],
        "batches_failed": report.batches["failed"],
        "requests": sender.stats.requests,
        "retries": sender.stats.retries,
        "rate_limited": sender.stats.rate_limited,
        "ratelimit_waits": pacer.waits,
        "splits": sender.stats.splits,
        "aborted": aborted,
        "abort_reason": sender.abort_error.message if sender.abort_error else None,
        "exit_code": exit_code,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_ms": round((finished - started) * 1000, 1),
    }
    report.summary(summary)
    log_summary = {k: v for k, v in summary.items() if k not in ("started_at", "finished_at")}
    if aborted:
        log.error("run.aborted", **log_summary)
    else:
        log.info("run.finished", **log_summary)
    return RunResult(exit_code, summary)


async def _pump(config: Config, source: Source, report: Report, sender: Sender) -> dict[str, int]:
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=config.concurrency * 2)

    async def drain() -> None:
        while (batch := await queue.get()) is not None:
            await sender.send(batch)

    rows = valid = 0
    async with asyncio.TaskGroup() as group:
        for _ in range(config.concurrency):
            group.create_task(drain())
        try:
            validator = Validator()
            batcher = Batcher(config.batch_size, config.max_buffered_rows)
            check, add, rejected = validator.check, batcher.add, report.rejected
            async for chunk in source.chunks():
                ready: list[Batch] = []
                for line, raw_token, raw_email, reason in chunk:
                    rows += 1
                    if reason is None:
                        token, email, reason = check(raw_token, raw_email)
                        if reason is None:
                            valid += 1
                            batch = add(token, email)
                            if batch is not None:
                                ready.append(batch)
                            continue
                        rejected(line, reason, token, email)
                    else:
                        rejected(line, reason, raw_token, raw_email)
                report.flush()
                for batch in ready:
                    await queue.put(batch)
            for batch in batcher.drain():
                await queue.put(batch)
        finally:
            # Always let the senders finish what they hold, then stop them.
            for _ in range(config.concurrency):
                await queue.put(None)
    return {"rows": rows, "valid": valid}


def _public_origin(url: str) -> str:
    """Scheme, host and port only: a URL's user-info could carry credentials."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
