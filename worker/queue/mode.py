"""A stream worker's part in the run's one assembly (:mod:`worker.run.assembly`).

The consumer is made with the sender (it settles what the sender sends); its flusher
acknowledges and dead-letters beside the senders; deliveries not the messages' fault are
given back after them; the summary adds the group and the consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from worker.batching import Batch
from worker.clock import Clock
from worker.config import Config
from worker.queue.consumer import Consumer
from worker.queue.edits import DashboardEdits
from worker.queue.failures import RedisOutOfMemory, RedisRefused
from worker.queue.lease import ConsumerLease
from worker.queue.messages import MessageIndex, RedisIntents
from worker.queue.options import StreamOptions
from worker.queue.stream import StreamQueue
from worker.record.report import Report
from worker.run.assembly import Ending, Mode
from worker.run.counts import QueueCounts, QueueRead
from worker.run.runner import OutcomeHook, Runner, Service
from worker.send.client import InvitationClient
from worker.send.sender import Sender
from worker.state import RunState


class StreamMode(Mode[QueueRead]):
    """A stream worker: a consumer's batches; its acknowledgements beside the senders."""

    def __init__(self, config: Config, options: StreamOptions, queue: StreamQueue,
                 report: Report, clock: Clock, stop: asyncio.Event,
                 lease: ConsumerLease) -> None:  # fmt: skip
        self.config, self.options, self.queue, self.report = config, options, queue, report
        self.lease = lease
        self.clock = clock
        self.index = MessageIndex()
        self.pending = lambda: len(self.index)
        self.intents = RedisIntents(queue, self.index)
        # Refused keys stop a queue worker: its messages stay pending for a worker
        # with good keys, and reading more would only meet the same refusal.
        self.state = RunState(stop, stop_on_abort=True)
        self._consumer: Consumer | None = None

    @property
    def consumer(self) -> Consumer:
        """The stream's consumer (there once the sender is)."""
        if self._consumer is None:
            raise RuntimeError("the consumer is made with the sender")
        return self._consumer

    @property
    def counts(self) -> QueueCounts:
        """What the consumer read, claimed and dead-lettered."""
        return self.consumer.counts

    def hooks(self, sender: Sender) -> tuple[OutcomeHook, ...]:
        """The consumer acknowledges or dead-letters the messages of each outcome."""
        self._consumer = Consumer(self.config, self.options, self.queue, self.report, sender,
                                  self.index, self.clock)  # fmt: skip
        return (self._consumer.on_outcome,)

    async def prepare(self, runner: Runner, client: InvitationClient) -> None:
        """The consumer records what it settles itself (claimed messages) as the runner;
        the stream's workers edit a dashboard one at a time."""
        self.consumer.record = runner.record
        runner.sender.preflight.edits = DashboardEdits(self.queue, self.state.stop).hold

    def feed(self) -> tuple[AsyncGenerator[Batch, None], Sequence[tuple[str, Service]]]:
        """The consumer's batches; its flusher acknowledges what outcomes settle, last
        after the senders; the consumer name's lease is renewed beside them."""
        services = [("flusher", self.consumer.flush_until), ("lease", self.lease.keep)]
        return self.consumer.batches(), services

    async def after(self, runner: Runner, client: InvitationClient) -> None:
        """Refused keys, a stop, Redis or the disk failing: not the messages' fault."""
        await self.consumer.held.give_back(self.queue, self.state)

    async def ending(self) -> Ending[QueueRead]:
        """The consumer's counts and names; a refused Redis user is a usage error."""
        fatal = self.state.fatal
        if isinstance(fatal, RedisOutOfMemory):  # what the last flush left pending
            fatal.recount(await self.queue.failure.pending())
        counts = self.counts
        read = QueueRead(counts.claimed, counts.dead_lettered, self.options.group,
                         self.options.consumer)  # fmt: skip
        # The URL's user was refused: a usage error.
        return Ending(read, usage_error=isinstance(fatal, RedisRefused))
