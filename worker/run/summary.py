"""The ``summary`` record that ends every run in the report, and the run's result."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import structlog

from worker.errors import StorageError
from worker.exits import EXIT_ABORTED, exit_code
from worker.record.report import Report, iso
from worker.run.resume import History
from worker.run.rows import InputRows
from worker.run.runner import Runner
from worker.send.prune import Pruner

log = structlog.get_logger("worker.run")


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: its exit code and the summary written last to the report."""

    exit_code: int
    summary: dict[str, Any]


@dataclass(slots=True)
class FileCounts:
    """What reading a file found (updated as it is read)."""

    rows: int = 0
    valid: int = 0
    skipped: int = 0
    tokens: int = 0
    read_all: bool = False  # every row is read: the total is known from here on
    #: The input file's rows, counted apart (None: standard input, a pipe).
    input: InputRows | None = None

    def fields(self) -> dict[str, int]:
        """The summary's share: the counts."""
        return {"rows": self.rows, "valid": self.valid, "skipped": self.skipped,
                "tokens": self.tokens}  # fmt: skip

    def unread(self) -> int | None:
        """Rows of the input never read (a stop came first); None when it cannot be told."""
        if self.read_all:
            return 0
        if self.input is None:
            return None
        total = self.input.total if self.input.total is not None else self.input.count()
        return max(0, total - self.rows)


@dataclass(slots=True)
class QueueCounts:
    """What a stream consumer read, claimed and dead-lettered."""

    rows: int = 0
    valid: int = 0
    claimed: int = 0
    dead_lettered: int = 0

    def fields(self) -> dict[str, int]:
        """The summary's share."""
        return asdict(self)


def build_summary(
    runner: Runner,
    description: str,
    counts: FileCounts | QueueCounts,
    started: float,
    finished: float,
    *,
    history: History | None = None,
    resumed: bool = False,
    pruner: Pruner | None = None,
) -> dict[str, Any]:
    """The ``summary`` record of a run; with ``pruner``, what ``--prune`` did."""
    sender, report, state = runner.sender, runner.report, runner.state
    halted = state.fatal
    interrupted = state.interrupted
    # Valid pairs read but neither sent nor failed (left for --resume after a stop); those
    # of requests that went out but whose outcome is unknown (cut by the stop) are not.
    unsent = max(0, counts.valid - runner.recorded - sender.stats.unknown_left)
    if history is not None:
        totals = history.totals()
    else:
        totals = {"emails_failed": report.emails["failed"], "rejected": report.rejected_total,
                  "unknown": 0}  # fmt: skip
    incomplete = bool(totals["emails_failed"] or totals["rejected"] or totals["unknown"] or unsent
                      or report.prunes_refused)  # fmt: skip
    # One code per kind of stop, in both modes: a signal is exit 3 for a queue worker too
    # (what it did not settle stays pending for the next one, nothing is lost).
    code = exit_code(aborted=state.aborted, halted=halted is not None, interrupted=interrupted,
                     incomplete=incomplete)  # fmt: skip
    by_kind = {
        "invite": sender.stats.requests,
        "list_invitations": sender.reconciler.requests,
        "dashboard": sender.preflight.requests,
    }
    for kind, n in (pruner.requests if pruner is not None else {}).items():
        by_kind[kind] = by_kind.get(kind, 0) + n  # --prune's reads, PUTs and DELETEs
    summary: dict[str, Any] = {
        "source": description,
        **counts.fields(),
        "rejected": report.rejected_total,
        "rejected_by_reason": dict(sorted(report.rejected_by_reason.items())),
        "emails_sent": report.emails["sent"],
        "emails_failed": report.emails["failed"],
        "emails_skipped": report.emails["skipped"],
        "refused_by_code": dict(sorted(report.refused_by_code.items())),
        "invitees_added": sender.preflight.invitees_added,
        "skipped_by_reason": dict(sorted(report.skipped_by_reason.items())),
        "batches_sent": report.batches["sent"],
        "batches_failed": report.batches["failed"],
        "requests": sum(by_kind.values()),
        "retries": sender.stats.retries,
        "rate_limited": sender.stats.rate_limited,
        "ratelimit_waits": sender.pacer.waits,
        "splits": sender.stats.splits,
        "unknown_outcomes": sender.stats.unknown_outcomes,
        "reconciled_sent": sender.stats.reconciled_sent,
        "reconcile_requests": sender.reconciler.requests,
        "list_pages": sender.reconciler.pages,
        "requests_by_kind": by_kind,
        "unsent": unsent,
        # Rows never read because the run stopped first (None: a pipe, it cannot be told).
        "unread": counts.unread() if isinstance(counts, FileCounts) else 0,
        "aborted": state.aborted,
        "abort_reason": state.abort_error.message if state.abort_error else None,
        "interrupted": interrupted,
        "halted": {"code": halted.code, "message": str(halted)} if halted is not None else None,
        "resumed": resumed,
        "exit_code": code,
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_ms": round((finished - started) * 1000, 1),
    }
    if pruner is not None:
        summary.update(prune_fields(report))
    if history is not None:
        summary["job"] = totals
    return summary


def outcome_of(summary: dict[str, Any]) -> str:
    """How a run ended, one word: ``done`` (exit 0), ``incomplete`` (1: some failed or were
    rejected), or the kind of stop behind exit 3: ``aborted`` (the keys were refused),
    ``halted`` (a fault: a full disk, no API, Redis gone) or ``interrupted`` (a signal)."""
    if summary["aborted"]:
        return "aborted"
    if summary["halted"]:
        return "halted"
    if summary["interrupted"]:
        return "interrupted"
    return "done" if summary["exit_code"] == 0 else "incomplete"


def prune_fields(report: Report) -> dict[str, Any]:
    """What ``--prune`` did: emails revoked (by what was removed), dashboards refused."""
    return {
        "emails_revoked": report.revoked_emails,
        "revoked_by_what": dict(sorted(report.revoked_by_what.items())),
        "prunes_refused": sum(report.prunes_refused.values()),
        "prune_refused_by_code": dict(sorted(report.prunes_refused.items())),
    }


def finish(report: Report, summary: dict[str, Any], *, for_people: bool = False) -> RunResult:
    """Write the summary as the report's last record, log it, and return the result.

    When the report cannot be written (the disk that stopped the run), the summary is
    still logged; ``--resume`` does not need it. ``for_people`` (a terminal, which gets
    the table of :mod:`worker.run.human` instead) leaves the thirty-field event out.
    """
    try:
        report.summary(summary)
    except StorageError as exc:
        log.error("run.summary_not_written", path=str(exc.path), cause=exc.cause.strerror)
    log_summary = {k: v for k, v in summary.items() if k not in ("started_at", "finished_at")}
    if not for_people:
        # run.aborted is the refused keys' event (aborted=true); a signal or a fault ends
        # with run.finished, at warning or error level, its interrupted or halted set.
        if summary["aborted"]:
            log.error("run.aborted", **log_summary)
        elif summary["halted"]:
            log.error("run.finished", **log_summary)
        elif summary["exit_code"] == EXIT_ABORTED:
            log.warning("run.finished", **log_summary)
        else:
            log.info("run.finished", **log_summary)
    return RunResult(summary["exit_code"], summary)
