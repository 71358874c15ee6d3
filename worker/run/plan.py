"""``--dry-run``: read, validate and batch everything; send nothing; say what a run would do."""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

import structlog

from worker.config import Config
from worker.errors import UsageError
from worker.exits import EXIT_INCOMPLETE, EXIT_OK
from worker.record.lock import hold_report
from worker.record.report import Report
from worker.run.files import read_batches
from worker.run.summary import FileCounts, RunResult
from worker.sources import Source

log = structlog.get_logger("worker.plan")


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
    out: TextIO | None = None,
) -> RunResult:  # fmt: skip
    """Plan the run: ``planned`` batches and rejected rows to the report, the plan to ``out``."""
    with hold_report(config.report_path):
        return await _plan(config, source, assume_limit, out)


async def _plan(
    config: Config, source: Source, assume_limit: tuple[int, float] | None, out: TextIO | None
) -> RunResult:
    report = Report(config.report_path, overwrite=config.overwrite)
    counts = FileCounts()
    requests = 0
    try:
        async for batch in read_batches(config, source, report.rejected, counts):
            report.planned(batch.token, batch.emails)
            requests += 1
    finally:
        source.close()
    seconds = estimate(requests, config.rate, assume_limit)
    summary: dict[str, Any] = {
        "source": source.description,
        "dry_run": True,
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
        "exit_code": EXIT_INCOMPLETE if report.rejected_total else EXIT_OK,
    }
    report.summary(summary)
    log.info("plan.ready", **{k: v for k, v in summary.items() if k != "rejected_by_reason"})
    print_plan(summary, out or sys.stdout)
    return RunResult(summary["exit_code"], summary)


def print_plan(plan: dict[str, Any], out: TextIO) -> None:
    """The plan for a person."""
    reasons = ", ".join(f"{k}: {v}" for k, v in plan["rejected_by_reason"].items())
    seconds = plan["estimated_seconds"]
    if seconds is None:
        when = "unknown: give --rate R or --assume-limit L/P"
    else:
        basis = []
        if plan["rate"]:
            basis.append(f"--rate {plan['rate']:g}/s")
        if plan["assume_limit"]:
            limit, period = plan["assume_limit"]
            basis.append(f"{limit} requests per {period:g} s window")
        when = f"{_duration(seconds)} at {' and '.join(basis)}" if basis else _duration(seconds)
    rows = [
        ("rows read", f"{plan['rows']:,}"),
        ("valid", f"{plan['valid']:,}"),
        ("rejected", f"{plan['rejected']:,}" + (f"   ({reasons})" if reasons else "")),
        ("tokens", f"{plan['tokens']:,}"),
        ("requests needed", f"{plan['requests']:,}   (batches of up to {plan['batch_size']})"),
        ("estimated time", when),
    ]
    print(f"Dry run of {plan['source']}: nothing was sent.", file=out)
    for name, value in rows:
        print(f"  {name:<16} {value}", file=out)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
