"""``--dry-run``: read, validate and batch everything; send nothing; say what a run would do."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from worker.clock import SystemClock
from worker.config import Config
from worker.errors import AuthError, FatalError, SendError, StorageError, UsageError
from worker.exits import EXIT_ABORTED, EXIT_INCOMPLETE, EXIT_OK
from worker.record.lock import hold_report
from worker.record.report import Report
from worker.run.counts import FileCounts
from worker.run.human import print_plan
from worker.run.prechecks import check_nothing_open
from worker.run.prune import ListedInput, prune
from worker.run.reading import read_batches
from worker.run.summary import PruneTotals
from worker.send import client_for, pacer_for, preflight_for, pruner_for, reconciler_for
from worker.send.preflight import Preflight
from worker.send.prune import Pruner
from worker.sources import Source

log = structlog.get_logger("worker.plan")

#: How a --preflight plan counts the people the check would refuse (by code).
REFUSE = "would refuse: "


@dataclass(frozen=True, slots=True)
class Planned:
    """How a dry run ended: its exit code and the plan (the report's ``summary`` record)."""

    exit_code: int
    plan: dict[str, Any]


def parse_limit(text: str) -> tuple[int, float]:
    """``"L/P"`` (requests per period in seconds), e.g. ``25/1`` or ``1000/3600``."""
    limit, _, period = text.partition("/")
    try:
        pair = int(limit), float(period or "1")
    except ValueError:
        pair = (0, 0.0)
    if pair[0] < 1 or not pair[1] > 0:
        raise UsageError(
            f"--assume-limit takes L/P, e.g. 25/1 (requests per seconds), got {text!r}"
        )
    return pair


def estimate(requests: int, rate: float | None, limit: tuple[int, float] | None) -> float | None:
    """Seconds a run of ``requests`` needs: the slower of ``--rate`` and the window floor."""
    if requests == 0:
        return 0.0
    bounds = []
    if rate:
        bounds.append(requests / rate)
    if limit:
        bounds.append(math.ceil(requests / limit[0]) * limit[1])
    return max(bounds) if bounds else None


async def dry_run(
    config: Config, source: Source, *, assume_limit: tuple[int, float] | None = None,
    out: TextIO | None = None, preflight: bool = False, for_people: bool = False,
) -> Planned:  # fmt: skip
    """Plan the run: ``planned`` batches and rejected rows to the report, the plan to ``out``.

    With ``preflight`` each token's dashboard is read and its invitations listed (GETs,
    never a write): the plan then says who would be sent, skipped and refused.
    ``for_people`` (a terminal, which reads the printed plan) leaves out the ``plan.ready``
    event that says the same, as a run leaves out ``run.finished`` for its end table.
    """
    with hold_report(config.report_path):
        check_nothing_open(config.report_path, plan=True)
        return await _plan(config, source, assume_limit, out, preflight, for_people)


async def _plan(
    config: Config,
    source: Source,
    assume_limit: tuple[int, float] | None,
    out: TextIO | None,
    preflight: bool,
    for_people: bool,
) -> Planned:
    report = Report(config.report_path, overwrite=config.overwrite, plan=True)
    counts = FileCounts()
    requests = 0
    checked: dict[str, Counter[str]] = {}
    refused: list[AuthError] = []  # the keys refused by a check (the run would stop)
    listed = ListedInput() if config.prune else None
    try:
        async with _checker(config, preflight) as (check, pruner):
            async for batch in read_batches(config, source, report.rejected, counts,
                                            listed=listed, whole=True):  # fmt: skip
                emails, added = batch.emails, list[str]()  # added: by --add-invitees
                if check is not None:
                    emails, added = await _screen(check, batch.token, emails, checked, refused)
                if emails:
                    if added:  # those it would add and then skip are in the counts only
                        sent = set(emails)
                        added = [e for e in added if e in sent]
                    report.planned(batch.token, emails, added)
                    requests += math.ceil(len(emails) / config.batch_size)
            report.flush()
            if listed is not None and pruner is not None:
                await prune(config, pruner, listed, report, stop=asyncio.Event(), plan=checked)
    except FatalError as exc:  # --preflight found no API at the URL: the plan says so too
        with contextlib.suppress(StorageError):
            report.summary({"source": source.description, "dry_run": True,
                            "report": str(config.report_path), "exit_code": EXIT_ABORTED,
                            "halted": {"code": exc.code, "message": str(exc)}})  # fmt: skip
        raise
    finally:
        source.close()
    seconds = estimate(requests, config.rate, assume_limit)
    summary: dict[str, Any] = {
        "source": source.description,
        "dry_run": True,
        "report": str(config.report_path),
        "rows": counts.rows,
        "valid": counts.valid,
        "rejected": report.rejected_total,
        "rejected_by_reason": dict(sorted(report.rejected_by_reason.items())),
        "tokens": counts.tokens,
        "requests": requests,
        "batch_size": config.batch_size,
        "rate": config.rate,
        "assume_limit": list(assume_limit) if assume_limit else None,
        "estimated_seconds": None if seconds is None else round(seconds, 1),
        "exit_code": EXIT_INCOMPLETE if report.rejected_total or report.prunes_refused else EXIT_OK,
    }
    if any(n for c in checked.values() for k, n in c.items() if k.startswith(REFUSE)):
        summary["exit_code"] = EXIT_INCOMPLETE  # the run would record them failed: exit 1
    if refused:  # the run itself would stop at its first check: say so, as it would end
        summary["exit_code"] = EXIT_ABORTED
        summary["keys_refused"] = True
    if listed is not None:
        summary["removals"] = sum(c["would remove"] for c in checked.values())
        summary.update(PruneTotals.of(report).fields())
    if preflight:
        summary["preflight"] = {token: dict(sorted(c.items())) for token, c in checked.items()}
    report.summary(summary)
    if not for_people:
        log.info("plan.ready", **{k: v for k, v in summary.items() if k != "rejected_by_reason"})
    print_plan(summary, out or sys.stdout)
    return Planned(summary["exit_code"], summary)


@contextlib.asynccontextmanager
async def _checker(
    config: Config, preflight: bool
) -> AsyncIterator[tuple[Preflight | None, Pruner | None]]:
    """A dashboard checker for ``--dry-run --preflight`` (None without it), and what
    surveys the dashboards for ``--prune`` (None without it): reads only."""
    if not preflight:
        yield None, None
        return
    clock = SystemClock()
    async with client_for(config) as client:
        pacer = pacer_for(config, clock)
        rng = random.Random()  # jitter
        reconciler = reconciler_for(config, client, pacer, clock, rng)
        pruner = None
        if config.prune:
            pruner = pruner_for(config, client, pacer, reconciler.retry, clock, rng)
        yield preflight_for(config, client, pacer, reconciler, clock, writes=False), pruner


async def _screen(
    check: Preflight,
    token: str,
    emails: list[str],
    checked: dict[str, Counter[str]],
    refused: list[AuthError],
) -> tuple[list[str], list[str]]:
    """What of a batch would be sent, and whom ``--add-invitees`` would add first; the
    counts per token of what would not be sent."""
    counts = checked.setdefault(token, Counter())
    try:
        screened = await check.screen(token, emails)
    except SendError as exc:
        return _unchecked(exc, emails, counts, refused), []
    if screened.added:
        counts["would add invitee"] += len(screened.added)
    counts["would send"] += len(screened.send)
    for reason, skipped in screened.skipped.items():
        counts[f"would skip: {reason}"] += len(skipped)
    for _, failure in screened.refused:
        counts[f"{REFUSE}{failure.code}"] += 1
    if screened.unread is not None:  # the served are skipped; the rest, unchecked
        return _unchecked(screened.unread[0], screened.unread[1], counts, refused), []
    return screened.send, screened.added


def _unchecked(
    exc: SendError, emails: list[str], counts: Counter[str], refused: list[AuthError]
) -> list[str]:
    """``emails`` could not be checked: planned as the run would try them, counted as
    unchecked; refused keys are noted for the plan's exit code (3, as the run's)."""
    counts[f"unchecked ({exc.code})"] += len(emails)
    if isinstance(exc, AuthError) and not refused:  # the first one says it
        refused.append(exc)
    return emails
