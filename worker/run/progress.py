"""Live progress of a run: a bar redrawn in place on a terminal, or periodic events.

On a terminal (console logs, stderr a TTY) a tqdm bar on stderr shows emails done, and
rows read, sent, skipped, failed, requests, 429 answers and pacing waits; for a file, once
every row is read, the total and an ETA; for a stream, the messages this worker has
pending and those it dead-lettered. Log lines are written above it. Otherwise a
``progress`` event is logged every ``--progress-every`` seconds with the same numbers.

The rate and ETA are taken over the last minute, not from one redraw to the next: a run
paced to a rate limit sends in bursts, and an instant rate would swing the ETA with each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker import logs
from worker.run.bar import BARS, COUNTS, SteadyRate, columns, duration_text, fit, frame
from worker.run.counts import FileCounts, QueueCounts
from worker.run.rows import InputRows
from worker.run.runner import Runner

log = structlog.get_logger("worker.progress")

#: How often the bar is redrawn.
BAR_REFRESH = 0.25
Snapshot = Callable[[], dict[str, int]]


def snapshot_of(
    runner: Runner, counts: FileCounts | QueueCounts, pending: Callable[[], int] | None = None
) -> Snapshot:
    """What the progress shows of a run; ``pending``: a stream worker's unsettled messages."""
    report, sender = runner.report, runner.sender

    def snapshot() -> dict[str, int]:
        snap = {"rows": counts.rows, "valid": counts.valid,
                "sent": report.emails["sent"], "failed": report.emails["failed"],
                "skipped": report.emails["skipped"], "refused": report.refused,
                "requests": sender.stats.requests + sender.reconciler.requests
                + sender.preflight.requests + sender.preflight.validations,
                "limited": sender.stats.rate_limited, "waits": sender.pacer.waits}  # fmt: skip
        if isinstance(counts, FileCounts):
            snap["read_all"] = int(counts.read_all)
            estimate = counts.input.estimate() if counts.input is not None else None
            snap["expected"] = -1 if estimate is None else estimate
        else:
            snap.update(read_all=0, pending=pending() if pending else 0,
                        dead=counts.dead_lettered)  # fmt: skip
        return snap

    return snapshot


def _total(snap: dict[str, int], done: int) -> int | None:
    """Emails the run will have done: exact once every row is read, else estimated.

    The estimate is the input's rows (counted beside the run, or scaled from its size)
    times the share of rows read so far that were valid.
    """
    if snap["read_all"]:
        return snap["valid"]
    expected = snap.get("expected", -1)
    if expected < 0:
        return None
    if snap["rows"]:
        expected = round(expected * snap["valid"] / snap["rows"])
    return max(expected, done)


class Progress:
    """Shows a run's progress: :meth:`start`, :meth:`run` as a runner's service, :meth:`close`.

    ``mode``: ``bar``, ``events`` or ``off``.

    ``queue``: the snapshot is a stream worker's (no total; messages pending, dead-lettered).
    """

    def __init__(self, snapshot: Snapshot, mode: str, every: float, *, queue: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 rows: InputRows | None = None) -> None:  # fmt: skip
        self._snapshot = snapshot
        self._rows = rows  # counted beside the run: the total before the reader gets there
        # -q (errors only) on a terminal: no bar either, only the end table.
        quiet = mode == "bar" and logs.shown_level() > logging.WARNING
        self.mode = "off" if quiet else mode
        self.queue = queue
        self._every = BAR_REFRESH if self.mode == "bar" else max(every, 0.05)
        self._bar: Any = None  # a tqdm bar, in bar mode
        self.rate = SteadyRate(clock)

    def start(self) -> None:
        """Set up the display (a bar on a terminal); :meth:`run` then keeps it current."""
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm import tqdm  # only a terminal run pays for the import

            # Some terminals (and bare pseudo-terminals, `script` without a terminal of its
            # own) report a size of 0x0: then tqdm would draw nothing (no room, it thinks),
            # so fall back to a fixed size.
            try:
                width, height = os.get_terminal_size(sys.stderr.fileno())
            except (OSError, ValueError):
                width = height = 0
            self._bar = tqdm(total=None, unit="email", desc="invites", file=sys.stderr,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 120,
                             nrows=height or 24, bar_format=COUNTS[0], leave=True)  # fmt: skip
            bar = self._bar
            logs.STDERR.sink = lambda line: bar.write(line, file=sys.stderr)

    async def run(self, finished: asyncio.Event) -> None:
        """Redraw (or log) every interval until ``finished`` is set (a runner's service)."""
        if self.mode == "off":
            return
        rows = self._rows
        counting = None if rows is None else asyncio.ensure_future(rows.count_in_thread())
        try:
            while not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), self._every)
                if not finished.is_set():
                    self.update()
        finally:
            if rows is not None and counting is not None:
                rows.abandon()  # the thread stops at its next block
                counting.cancel()
                await asyncio.gather(counting, return_exceptions=True)

    def update(self) -> None:
        """Redraw the bar, or log one ``progress`` event."""
        snap = self._snapshot()
        done = snap["sent"] + snap["failed"] + snap["skipped"]
        rate = self.rate.add(done)
        total = None if self.queue else _total(snap, done)
        eta = None if total is None else SteadyRate.eta(total - done, rate)
        if self._bar is not None:
            self._draw(snap, done, total, rate, eta)
            return
        extra = ({"pending": snap["pending"], "dead_lettered": snap["dead"]} if self.queue
                 else {"valid": snap["valid"]})  # fmt: skip
        log.info("progress", rows=snap["rows"], sent=snap["sent"], failed=snap["failed"],
                 skipped=snap["skipped"], refused=snap["refused"], requests=snap["requests"],
                 rate_limited=snap["limited"], ratelimit_waits=snap["waits"],
                 emails_per_second=round(rate, 1),
                 eta_seconds=None if eta is None else round(eta, 1), **extra)  # fmt: skip

    def _draw(self, snap: dict[str, int], done: int, total: int | None, rate: float,
              eta: float | None) -> None:  # fmt: skip
        bar = self._bar
        if total is not None and bar.total != total:
            bar.total = total
        when = f", ETA {duration_text(eta)}" if eta is not None else ""
        # Most telling first: what does not fit the terminal's width is left out, so the
        # line is never cut (nor wrapped, which would stop it redrawing in place).
        speed = f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"
        # Refused emails are failures shown on their own, as the end table shows them.
        failed = snap["failed"] - snap["refused"]
        parts = [f"{speed} email/s{when}", f"sent {snap['sent']:,}", f"failed {failed:,}",
                 f"rows {snap['rows']:,}"]  # fmt: skip
        want = 0
        if self.queue:  # what a worker's watcher looks for first (its bar has no total)
            parts = [f"messages {snap['rows']:,}", f"pending {snap['pending']:,}",
                     f"dead-lettered {snap['dead']:,}", *parts[:3]]  # fmt: skip
            want = len(" | ".join(parts[:3]))  # worth a shorter frame
        parts += [f"{name} {snap[key]:,}" for name, key in
                  (("skipped", "skipped"), ("refused", "refused")) if snap[key]]  # fmt: skip
        parts += [f"requests {snap['requests']:,}", f"429s {snap['limited']:,}",
                  f"pacing waits {snap['waits']:,}"]  # fmt: skip
        elapsed = bar.format_interval(bar.format_dict["elapsed"])
        shown = max(total or 0, done)
        bar.bar_format, room = frame(
            COUNTS if bar.total is None else BARS, columns(), want=want, desc=bar.desc,
            n_fmt=done,
            total_fmt=shown, percentage=100 * done / shown if shown else 0, elapsed=elapsed,
        )  # fmt: skip
        bar.set_postfix_str(fit(parts, room), refresh=False)
        bar.update(done - bar.n)  # redraws in place

    def close(self) -> None:
        """A bar gets its final state, then goes back to plain stderr."""
        if self._bar is not None:
            self.update()
            self._bar.close()
            logs.STDERR.sink = None
