"""The runner: batches in, outcomes recorded, one place for stop, grace and progress.

Whatever feeds it — a file read, validated and batched, or a Redis Stream consumer — is an
async iterator of batches. ``--concurrency`` senders drain a small bounded queue of them
(a fast reader waits for the senders instead of piling batches up), and every outcome a
sender returns goes through :meth:`Runner.record`: the report, then the journal clears it
allows, then the resume history and the queue's acknowledger.

When ``stop`` is set (SIGTERM, or a fault that halts the run), reading stops, batches not
yet sent are left for ``--resume`` (or pending in the stream), and in-flight requests get
``--grace`` seconds to finish and be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from worker.batching import Batch
from worker.config import Config
from worker.errors import FatalError
from worker.outcome import Outcome
from worker.record.journal import IntentLog
from worker.record.report import Report
from worker.send.sender import Sender

log = structlog.get_logger("worker.runner")

OutcomeHook = Callable[[Outcome], None]


class Runner:
    """Drives batches through a pool of senders and records every outcome."""

    def __init__(
        self,
        config: Config,
        sender: Sender,
        report: Report,
        journal: IntentLog,
        *,
        hooks: tuple[OutcomeHook, ...] = (),
    ) -> None:
        self.config, self.sender, self.report, self.journal = config, sender, report, journal
        self.stop = sender.stopping
        self._hooks = hooks
        #: Emails recorded (sent, failed or skipped) by this run.
        self.recorded = 0

    def record(self, outcome: Outcome) -> None:
        """Record one outcome: report first, then what may only follow it.

        An outcome with no emails carries only journal clears (a listing found nothing).
        """
        if outcome.emails:
            self.report.batch(outcome)
            self.recorded += len(outcome.emails)
        for intent in outcome.clears:
            self.journal.clear(intent)
        for hook in self._hooks:
            hook(outcome)

    def record_all(self, outcomes: list[Outcome]) -> None:
        """Record outcomes in order; a storage failure halts the run instead of raising."""
        try:
            for outcome in outcomes:
                self.record(outcome)
        except FatalError as exc:
            self.sender.halt(exc)

    async def drive(self, batches: AsyncIterator[Batch]) -> None:
        """Send every batch ``batches`` yields, until it ends or the run stops."""
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=self.config.concurrency * 2)

        async def drain() -> None:
            while (batch := await queue.get()) is not None:
                if not self.stop.is_set():
                    self.record_all(await self.sender.send(batch))

        async def produce() -> None:
            try:
                async for batch in batches:
                    await queue.put(batch)
            except FatalError as exc:  # the report cannot take a rejection, Redis is gone
                self.sender.halt(exc)

        drains = [asyncio.create_task(drain()) for _ in range(self.config.concurrency)]
        producer = asyncio.create_task(produce())
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({producer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                producer.result()  # a reader failure ends the run here
            else:
                log.warning("run.stopping", grace=self.config.grace)
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
            for _ in drains:
                await queue.put(None)
            await self._finish(set(drains), stopped)
        finally:
            stopped.cancel()
            for task in (producer, *drains):
                task.cancel()
            await asyncio.gather(producer, *drains, return_exceptions=True)

    async def _finish(self, pending: set[asyncio.Task[None]], stopped: asyncio.Task[Any]) -> None:
        """Senders finish what they hold; after a stop, only for the grace period."""
        while pending:
            wait_for_stop = not self.stop.is_set()
            waiters: set[asyncio.Task[Any]] = pending | ({stopped} if wait_for_stop else set())
            done, _ = await asyncio.wait(
                waiters,
                timeout=None if wait_for_stop else self.config.grace,
                return_when=asyncio.FIRST_COMPLETED if wait_for_stop else asyncio.ALL_COMPLETED,
            )
            for task in done & pending:
                task.result()
            pending -= done
            if not wait_for_stop and pending:
                log.warning("run.grace_expired", senders=len(pending))
                return
