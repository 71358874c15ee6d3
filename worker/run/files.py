"""A run over a file: source -> validation -> batching, driven through the runner.

:func:`run` sets up the report and journal around the batches of
:func:`~worker.run.reading.read_batches`; its :class:`_FileMode` is what the
run's one assembly (:mod:`worker.run.assembly`) is told of the file: settle first what an
earlier run left unknown (``--resume``), send the batches, then ``--prune``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from array import array
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from worker.batching import Batch
from worker.clock import Clock, SystemClock
from worker.config import Config
from worker.errors import UsageError
from worker.metrics import metrics_for
from worker.record.journal import Journal, empty_journal, journal_path
from worker.record.lock import hold_report
from worker.record.report import Report
from worker.run.assembly import Ending, Mode, assemble
from worker.run.counts import FileCounts, FileRead
from worker.run.prechecks import (
    check_nothing_open,
    check_resumable,
    require_report,
    unreadable,
)
from worker.run.prune import ListedInput, prune
from worker.run.reading import read_batches
from worker.run.resume import History, load_history, settle_unknowns
from worker.run.rows import InputRows
from worker.run.runner import OutcomeHook, Runner, Service
from worker.run.summary import RunResult
from worker.send import pruner_for
from worker.send.client import InvitationClient
from worker.send.edit_lock import LocalEdits
from worker.send.prune import Pruner
from worker.send.recheck import named_in, recheck
from worker.send.sender import Sender
from worker.sources import Source
from worker.sources.csvfile import CsvSource
from worker.state import RunState
from worker.validate import address_key

if TYPE_CHECKING:
    from worker.validate.dedupe import PairIndex

log = structlog.get_logger("worker.run")


async def run(
    config: Config,
    source: Source,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult[FileRead]:
    """Send every valid pair of ``source`` and write the report; returns the exit code.

    The report's lock is held throughout: a second run on the same report is refused
    (:class:`ReportLocked`) before it reads or writes anything.
    """
    if config.resume:
        require_report(config.report_path)
    with hold_report(config.report_path):
        if config.resume:
            check_resumable(config.report_path)
        else:
            check_nothing_open(config.report_path)
        return await _run(config, source, clock or SystemClock(), rng, stop or asyncio.Event())


async def _run(
    config: Config, source: Source, clock: Clock, rng: random.Random | None, stop: asyncio.Event
) -> RunResult[FileRead]:
    jpath = journal_path(config.report_path)
    # --resend/--resend-after: a pair skipped as served earlier may be due now; check again.
    served_again = config.resend or config.resend_after is not None
    try:
        history = (
            load_history(config.report_path, jpath, resend=served_again, looks=_looks(config))
            if config.resume
            else None
        )
    except OSError as exc:  # a journal made a directory, unreadable for this user, ...
        raise unreadable(exc) from None
    report = Report(config.report_path, overwrite=config.overwrite, resume=config.resume)
    try:
        journal = Journal(jpath, durable=config.durable_journal, truncate=not config.resume)
    except UsageError:
        report.close()
        raise
    started = clock.time()
    log.info("run.started", source=source.description, api=_public_origin(config.api_url),
             batch_size=config.batch_size, concurrency=config.concurrency, rate=config.rate,
             report=str(config.report_path), resume=config.resume)  # fmt: skip
    mode = _FileMode(config, source, report, journal, history, clock, rng, stop)
    report.metrics = metrics = metrics_for(config, mode="file")
    result = await assemble(config, mode, report=report, intents=journal, metrics=metrics,
                            state=mode.state, clock=clock, rng=rng, source=source.description,
                            started=started)  # fmt: skip
    if mode.left_nothing_open(result):
        await empty_journal(config.report_path, jpath)
    return result


class _FileMode(Mode[FileRead]):
    """A file run: read and batch the input; settle ``--resume``'s unknowns first and
    ``--prune`` once everything is sent."""

    def __init__(self, config: Config, source: Source, report: Report, journal: Journal,
                 history: History | None, clock: Clock, rng: random.Random | None,
                 stop: asyncio.Event) -> None:  # fmt: skip
        self.config, self.source, self.report, self.journal = config, source, report, journal
        self.history, self.clock, self.rng, self.stop = history, clock, rng, stop
        self._counts = FileCounts(
            input=InputRows.of(source.description, header=isinstance(source, CsvSource))
        )
        self.state = RunState(stop)
        self.listed = ListedInput() if config.prune else None
        self.pruner: Pruner | None = None
        self._sender: Sender | None = None
        self._named: list[PairIndex] = []  # the input's pairs (the validator's index)

    @property
    def counts(self) -> FileCounts:
        """What reading the file found."""
        return self._counts

    def hooks(self, sender: Sender) -> tuple[OutcomeHook, ...]:
        """``--resume``: the history learns what this run settles, and the sender keeps
        the pairs it leaves unknown, for the job's totals."""
        if self.history is None:
            return ()
        sender.stats.unknown_keys = set()
        self.report.on_revoked = self.history.on_revoked
        return (self.history.on_outcome,)

    async def prepare(self, runner: Runner, client: InvitationClient) -> None:
        """Before any batch: ``--resume`` settles what the earlier run left unknown; the
        dashboards' edits take turns with other runs; ``--add-invitees`` keeps what its
        look at the end covers."""
        preflight = runner.sender.preflight
        if _looks(self.config):
            # What earlier runs added and no run looked at since (killed, stopped) is
            # looked at with this run's own adds; so are the sends settled below: a run
            # killed with its POST out recorded no add.
            preflight.vouched = self.history.unlooked if self.history is not None else {}
        if self.history is not None:
            await runner.supervise("reconciler", _settle(runner, self.history, self.clock))
        runner.recorded = 0  # settling is not this run's reading
        self._sender = runner.sender
        # Runs of this machine edit a dashboard one at a time (a queue's workers take
        # turns through Redis instead).
        edits = LocalEdits(self.config.api_url, self.state.stop, self.clock)
        preflight.edits = edits.hold
        if self.listed is not None:
            sender = runner.sender
            self.pruner = pruner_for(self.config, client, sender.pacer, sender.retry,
                                     self.clock, self.rng, sender.cap.size,
                                     self.state.stop)  # fmt: skip
            self.pruner.edits = edits.hold

    def feed(self) -> tuple[AsyncGenerator[Batch, None], Sequence[tuple[str, Service]]]:
        """The input's batches, its rejected rows written before each chunk's go out."""
        batches = read_batches(self.config, self.source, self.report.rejected, self.counts,
                               self.history, self.stop, self.listed,
                               named=self._named.append)  # fmt: skip
        return _flushed(self.report, batches), ()

    async def after(self, runner: Runner, client: InvitationClient) -> None:
        """Once the whole list is read and sent (not after a stop): with
        ``--add-invitees``, a look at the entries the run made (``send.recheck``); with
        ``--prune``, the prune (whose survey looks at every dashboard anyway)."""
        state = self.state
        finished = self.counts.read_all and not (state.stop.is_set() or state.aborted)
        preflight = runner.sender.preflight
        if preflight.vouched is not None and finished:
            vouched, preflight.vouched = preflight.vouched, None  # its own adds: not again
            self.report.invitees_lost = self.report.invitees_unchecked = 0
            if vouched:
                await runner.supervise("recheck", self._recheck(vouched, runner))
        if self.listed is not None and self.pruner is not None and finished:
            pruning = prune(self.config, self.pruner, self.listed, self.report,
                            stop=state.stop, abort=state.abort,
                            restore=runner.sender.preflight.add)  # fmt: skip
            await runner.supervise("prune", pruning)

    async def _recheck(self, vouched: dict[str, array[int]], runner: Runner) -> None:
        sender, index = runner.sender, self._named[0] if self._named else None
        looked = await recheck(
            vouched, sender.preflight, sender.reconciler, self.report, self.clock,
            named=named_in(index), concurrency=self.config.concurrency, stop=self.state.stop,
        )  # fmt: skip
        self.report.invitees_lost, self.report.invitees_unchecked = looked.lost, looked.unchecked

    def close(self) -> None:
        """The input and the journal."""
        self.source.close()
        self.journal.close()

    def left_nothing_open(self, result: RunResult[FileRead]) -> bool:
        """The run went to its end, every request it made has a known outcome, and nothing
        an earlier run left unknown is unknown still: the journal holds nothing to settle."""
        sender, history = self._sender, self.history
        return (
            result.exit_code in (0, 1)  # not a stop (exit 3), nor a usage error (2)
            and sender is not None
            and sender.stats.unknown_left == sender.stats.open_intents == 0
            and not (history is not None and history.blocked)
        )

    async def ending(self) -> Ending[FileRead]:
        """The file's counts, the job's totals (``--resume``), what ``--prune`` did."""
        read = FileRead(self.counts.skipped, self.counts.tokens)
        return Ending(read, history=self.history, resumed=self.config.resume,
                      pruner=self.pruner)  # fmt: skip


def _looks(config: Config) -> bool:
    """Whether the run looks at the entries it made, at its end (``send.recheck``):
    ``--add-invitees``, but not ``--prune``, whose survey reads every dashboard anyway."""
    return config.add_invitees and not config.prune


async def _settle(runner: Runner, history: History, clock: Clock) -> None:
    """``--resume``: record what unknown outcomes of the earlier run actually created."""
    unknowns = settle_unknowns(history, runner.sender.reconciler, clock,
                               request_timeout=runner.config.timeout,
                               delay=runner.config.reconcile_delay)  # fmt: skip
    vouched = runner.sender.preflight.vouched
    async for outcome in unknowns:
        if outcome.reconciled:  # counted as the sender counts what a listing settles
            runner.sender.stats.reconciled_sent += len(outcome.emails)
            if vouched is not None:  # --add-invitees: its add may have gone unrecorded
                vouched.setdefault(outcome.token, array("q")).extend(
                    map(address_key, outcome.emails)
                )
        runner.record(outcome)


async def _flushed(
    report: Report, batches: AsyncGenerator[Batch, None]
) -> AsyncGenerator[Batch, None]:
    """The batches, with the rejected rows of each chunk written before it is sent (and
    those of the last, however reading ends)."""
    async with contextlib.aclosing(batches):
        try:
            async for batch in batches:
                report.flush()
                yield batch
        finally:
            report.flush()


def _public_origin(url: str) -> str:
    """Scheme, host and port only: a URL's user-info could carry credentials."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
