"""One assembly for every run, a file's and a stream worker's alike.

:func:`assemble` builds the client, pacer, sender, runner and progress, drives the batches,
and finishes the run: the summary (built once), its record last in the report, the
metrics' last word. What differs between the modes is a :class:`Mode`: where batches come
from, what runs before and after sending (``--resume`` settling, ``--prune``; the queue's
acknowledgements and give-backs), and what the summary adds. Its methods are called in
the order they are listed.
"""

from __future__ import annotations

import abc
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol

import structlog

from worker.batching import Batch
from worker.clock import Clock
from worker.config import Config
from worker.errors import StorageError
from worker.exits import EXIT_ABORTED
from worker.metrics import Metrics
from worker.record.journal import IntentLog
from worker.record.report import Report
from worker.run.counts import FileCounts, QueueCounts
from worker.run.progress import Progress, snapshot_of
from worker.run.resume import History
from worker.run.runner import OutcomeHook, Runner, Service
from worker.run.summary import R, RunResult, Summary, build_summary
from worker.send import client_for, pacer_for
from worker.send.client import InvitationClient
from worker.send.pacing import SharedLimit
from worker.send.prune import Pruner
from worker.send.sender import Sender
from worker.state import RunState

log = structlog.get_logger("worker.run")


class SettlingLimit(SharedLimit, Protocol):
    """A budget shared with other workers, whose last updates are awaited after sending."""

    async def settle(self) -> None:
        """Wait for the updates still in flight."""


@dataclass(frozen=True, slots=True)
class Ending(Generic[R]):
    """What a mode adds to the summary, once the run is over."""

    read: R
    history: History | None = None  # --resume: the job's totals
    resumed: bool = False
    pruner: Pruner | None = None  # --prune: its requests and what it did
    usage_error: bool = False  # a stream worker's refused Redis user: exit 2


class Mode(abc.ABC, Generic[R]):
    """What one kind of run brings to the assembly."""

    #: A stream worker's unsettled messages, for its progress (None: a file).
    pending: Callable[[], int] | None = None

    @property
    @abc.abstractmethod
    def counts(self) -> FileCounts | QueueCounts:
        """What the run read (the progress shows it; the summary counts it)."""

    @abc.abstractmethod
    def hooks(self, sender: Sender) -> tuple[OutcomeHook, ...]:
        """The sender is built: what the runner calls on each outcome (the metrics last)."""

    async def prepare(self, runner: Runner, client: InvitationClient) -> None:
        """The runner is built, nothing is sent or shown yet."""

    @abc.abstractmethod
    def feed(self) -> tuple[AsyncGenerator[Batch, None], Sequence[tuple[str, Service]]]:
        """The batches to send, and the services to run beside the senders."""

    async def after(self, runner: Runner, client: InvitationClient) -> None:
        """Sending is over (the progress closed, a shared budget settled); the client is
        still open."""

    def close(self) -> None:
        """The client is closed, however the run ended."""

    @abc.abstractmethod
    async def ending(self) -> Ending[R]:
        """The run ended without a raise: what the summary adds."""


async def assemble(
    config: Config,
    mode: Mode[R],
    *,
    report: Report,
    intents: IntentLog,
    metrics: Metrics,
    state: RunState,
    clock: Clock,
    rng: random.Random | None,
    source: str,
    started: float,
    shared: SettlingLimit | None = None,
) -> RunResult[R]:
    """Build, drive and finish one run of ``mode``; returns the exit code and summary.

    ``intents`` is where requests are announced before they go out (a file's journal, the
    stream's pending list); ``shared`` joins a rate-limit budget kept with other workers.
    ``metrics`` are closed however the run ends.
    """
    try:
        try:
            async with client_for(config, metrics) as client:
                sender = Sender(client, pacer_for(config, clock, rng, shared), intents, config,
                                clock, rng, state)  # fmt: skip
                runner = Runner(config, sender, report, intents,
                                hooks=(*mode.hooks(sender), metrics.outcome))  # fmt: skip
                await mode.prepare(runner, client)
                progress = _progress(config, runner, mode)
                progress.start()
                batches, services = mode.feed()
                try:
                    await runner.drive(batches, services=[*services, ("progress", progress.run)])
                finally:
                    progress.close()
                    if shared is not None:
                        await shared.settle()
                await mode.after(runner, client)
        finally:
            mode.close()
        ending = await mode.ending()
        summary = build_summary(runner, source, mode.counts, ending.read, started, clock.time(),
                                history=ending.history, resumed=ending.resumed,
                                pruner=ending.pruner, usage_error=ending.usage_error)  # fmt: skip
        result = finish(report, summary, for_people=config.progress == "bar")
        metrics.finished(result.exit_code, summary.outcome)
        return result
    finally:
        metrics.close()


def _progress(config: Config, runner: Runner, mode: Mode[R]) -> Progress:
    counts = mode.counts
    if isinstance(counts, QueueCounts):
        # A bar for a person watching; no periodic events: a worker's log stays as it was.
        shown = "bar" if config.progress == "bar" else "off"
        return Progress(snapshot_of(runner, counts, mode.pending), shown, config.progress_every,
                        queue=True)  # fmt: skip
    return Progress(snapshot_of(runner, counts), config.progress, config.progress_every,
                    rows=counts.input)  # fmt: skip


def finish(report: Report, summary: Summary[R], *, for_people: bool = False) -> RunResult[R]:
    """Write the summary as the report's last record, log it, and return the result.

    When the report cannot be written (the disk that stopped the run), the summary is
    still logged; ``--resume`` does not need it. ``for_people`` (a terminal, which gets
    the table of :mod:`worker.run.human` instead) leaves the thirty-field event out.
    """
    record = summary.record()
    try:
        report.summary(record)
    except StorageError as exc:
        log.error("run.summary_not_written", path=str(exc.path), cause=exc.cause.strerror)
    fields = {k: v for k, v in record.items() if k not in ("started_at", "finished_at")}
    if not for_people:
        # run.aborted is the refused keys' event (aborted=true); a signal or a fault ends
        # with run.finished, at warning or error level, its interrupted or halted set.
        if summary.aborted:
            log.error("run.aborted", **fields)
        elif summary.halted is not None:
            log.error("run.finished", **fields)
        elif summary.exit_code == EXIT_ABORTED:
            log.warning("run.finished", **fields)
        else:
            log.info("run.finished", **fields)
    return RunResult(summary.exit_code, summary)
