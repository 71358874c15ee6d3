"""The runner: batches in, outcomes recorded; one supervisor for every task of a run.

Whatever feeds it — a file read, validated and batched, or a Redis Stream consumer — is an
async iterator of batches. ``--concurrency`` senders drain a small bounded queue of them
(a fast reader waits for the senders instead of piling batches up), and every outcome a
sender returns goes through :meth:`Runner.record`: the report, then the journal clears it
allows, then the resume history and the queue's acknowledger.

The producer, the senders and the run's services (the queue's flusher, the progress) run
in one :class:`asyncio.TaskGroup` that :meth:`Runner.drive` owns. Whatever any of them
raises halts the run here, in one place (:meth:`Runner.supervise`): recorded as
``halted`` with its cause, exit 3, never a task that dies silently nor a reader left
waiting on a full queue.

When ``stop`` is set (SIGTERM, a halt, refused keys in a queue worker), reading stops,
batches not yet sent are left for ``--resume`` (or pending in the stream), and in-flight
requests get ``--grace`` seconds to finish and be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import structlog

from worker.batching import Batch
from worker.config import Config
from worker.errors import Stopped, StorageError
from worker.outcome import Outcome
from worker.record.journal import IntentLog
from worker.record.report import Report
from worker.send.sender import Sender
from worker.state import RunState

log = structlog.get_logger("worker.runner")

OutcomeHook = Callable[[Outcome], None]
#: A task that runs beside the senders until the event is set, then ends (after its last
#: round: the queue's flusher acknowledges what the last outcomes settle).
Service = Callable[[asyncio.Event], Awaitable[None]]
Queue = asyncio.Queue[Batch | None]


class Runner:
    """Drives batches through a pool of senders and records every outcome.

    ``state`` is the run's: it is the sender's too (that is how a sender sees a stop and
    reports refused keys), but only the runner halts the run.
    """

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
        self.state: RunState = sender.state
        self.stop = self.state.stop
        self._hooks = hooks
        #: Emails recorded (sent, failed or skipped) by this run.
        self.recorded = 0

    def record(self, outcome: Outcome) -> None:
        """Record one outcome: report first, then what may only follow it.

        An outcome with no emails carries only journal clears (a listing found nothing).
        """
        if outcome.emails:
            try:
                self.report.batch(outcome)
            except StorageError:
                if outcome.clears:  # (a send's): not in the report, its intent stays open
                    self.sender.stats.cut(outcome.token, outcome.emails)
                raise
            self.recorded += len(outcome.emails)
        for intent in outcome.clears:
            self.journal.clear(intent)
        for hook in self._hooks:
            hook(outcome)

    async def supervise(self, role: str, work: Awaitable[Any]) -> None:
        """Run ``work``; whatever it raises halts the run (a stop is a normal end).

        The one place a failure becomes a halt: a :class:`FatalError` (storage, an
        unreachable service, a lost queue) with its own message, anything else as a bug of
        ``role`` (``internal_error``). Cancellation passes through.
        """
        try:
            await work
        except Stopped:
            pass
        except Exception as exc:  # every failure ends the run, none silently
            self.state.halt(exc, role)

    async def drive(
        self, batches: AsyncGenerator[Batch, None], *, services: Sequence[tuple[str, Service]] = ()
    ) -> None:
        """Send every batch ``batches`` yields, until it ends or the run stops.

        ``services`` (name, service) run beside the senders and end after them. Returns
        once every task has ended; a failure of any of them has halted the run.
        """
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=self.config.concurrency * 2)
        finished = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tasks:
                for name, service in services:  # they end on ``finished``
                    tasks.create_task(self.supervise(name, service(finished)))
                senders = {tasks.create_task(self.supervise("sender", self._drain(queue)))
                           for _ in range(self.config.concurrency)}  # fmt: skip
                producer = tasks.create_task(
                    self.supervise("reader", self._produce(batches, queue))
                )
                await self._oversee(producer, senders, queue)
                finished.set()
        except* Exception as failed:  # the supervision itself failed: still a halt
            self.state.halt(failed.exceptions[0], "runner")

    async def _produce(self, batches: AsyncGenerator[Batch, None], queue: Queue) -> None:
        """Queue every batch, then one end mark per sender. The stream is always closed."""
        async with contextlib.aclosing(batches):
            async for batch in batches:
                await queue.put(batch)
        for _ in range(self.config.concurrency):
            await queue.put(None)

    async def _drain(self, queue: Queue) -> None:
        """One sender: send and record batches until the end mark."""
        while (batch := await queue.get()) is not None:
            if self.stop.is_set():
                continue  # left for --resume (or pending in the stream)
            out: list[Outcome] = []
            try:
                await self.sender.send(batch, out)
            finally:  # what was reached before a fault is recorded all the same
                for outcome in out:
                    self.record(outcome)

    async def _oversee(
        self, producer: asyncio.Task[None], senders: set[asyncio.Task[None]], queue: Queue
    ) -> None:
        """Until the senders are done: on a stop, end reading, and give them the grace."""
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({producer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():
                log.warning("run.stopping", grace=self.config.grace)
                producer.cancel()
                await asyncio.wait({producer})
            pending: set[asyncio.Future[Any]] = set(senders)
            while pending and not self.stop.is_set():
                _, pending = await asyncio.wait(pending | {stopped},
                                                return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                pending.discard(stopped)
            if pending:  # stopping: the senders finish what they hold, within the grace
                _end_marks(queue, len(senders))
                _, pending = await asyncio.wait(pending, timeout=self.config.grace)
            if pending:
                log.warning("run.grace_expired", senders=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        finally:
            stopped.cancel()


def _end_marks(queue: Queue, senders: int) -> None:
    """After a stop: drop the batches not yet taken (left for ``--resume``) and tell every
    sender to end once it is done with what it holds."""
    while not queue.empty():
        queue.get_nowait()
    for _ in range(senders):
        queue.put_nowait(None)
