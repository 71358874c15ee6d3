"""The ``summary`` that ends every run: a typed record, built once, and the run's result.

:class:`Summary` holds everything the report's last record says; :meth:`Summary.record`
is that record, key for key. What only one mode has is its :attr:`Summary.read`: a
file's :class:`~worker.run.counts.FileRead`, a stream worker's
:class:`~worker.run.counts.QueueRead` (its group and consumer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from worker.exits import EXIT_USAGE, exit_code
from worker.record.report import Report, iso
from worker.run.counts import FileCounts, FileRead, QueueCounts, QueueRead

if TYPE_CHECKING:
    from worker.run.resume import History
    from worker.run.runner import Runner
    from worker.send.prune import Pruner


#: A mode's share of the summary.
R = TypeVar("R", bound=FileRead | QueueRead)


@dataclass(frozen=True, slots=True)
class Halt:
    """The fault that halted a run."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PruneTotals:
    """What ``--prune`` did: emails revoked (by what was removed), dashboards refused."""

    emails_revoked: int
    revoked_by_what: Mapping[str, int]
    prunes_refused: int
    prune_refused_by_code: Mapping[str, int]

    @classmethod
    def of(cls, report: Report) -> PruneTotals:
        """The totals the report counted."""
        return cls(report.revoked_emails, dict(sorted(report.revoked_by_what.items())),
                   sum(report.prunes_refused.values()),
                   dict(sorted(report.prunes_refused.items())))  # fmt: skip

    def fields(self) -> dict[str, Any]:
        """The summary record's keys for them."""
        return {"emails_revoked": self.emails_revoked,
                "revoked_by_what": dict(self.revoked_by_what),
                "prunes_refused": self.prunes_refused,
                "prune_refused_by_code": dict(self.prune_refused_by_code)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class JobTotals:
    """``--resume``: email and row counts over the whole job so far."""

    emails_sent: int
    emails_failed: int
    #: Already served when the job came to them (invited, or in a session).
    emails_skipped: int
    rejected: int
    #: Emails whose request went out with its outcome still unknown: left open by an
    #: earlier run and not settled yet, cut by this run's stop, or whose listing this
    #: run could not read to settle them (recorded failed, ``outcome_unknown``).
    unknown: int


@dataclass(frozen=True, slots=True)
class Summary(Generic[R]):
    """How a run went: every figure of the report's ``summary`` record, typed."""

    source: str
    rows: int
    valid: int
    read: R
    rejected: int
    rejected_by_reason: Mapping[str, int]
    emails_sent: int
    emails_failed: int
    emails_skipped: int
    refused_by_code: Mapping[str, int]
    invitees_added: int
    invitees_lost: int | None
    invitees_unchecked: int | None
    skipped_by_reason: Mapping[str, int]
    batches_sent: int
    batches_failed: int
    requests: int
    retries: int
    rate_limited: int
    ratelimit_waits: int
    splits: int
    unknown_outcomes: int
    reconciled_sent: int
    reconcile_requests: int
    list_pages: int
    requests_by_kind: Mapping[str, int]
    #: Valid pairs read but neither sent nor failed (left for ``--resume``).
    unsent: int
    #: Rows never read because the run stopped first (None: a pipe, it cannot be told).
    unread: int | None
    aborted: bool
    abort_reason: str | None
    interrupted: bool
    halted: Halt | None
    resumed: bool
    exit_code: int
    started_at: str
    finished_at: str
    duration_ms: float
    prune: PruneTotals | None = None  # ``--prune``
    job: JobTotals | None = None  # ``--resume``

    @property
    def outcome(self) -> str:
        """How the run ended, one word: ``done`` (exit 0), ``incomplete`` (1: some failed
        or were rejected), or the kind of stop behind exit 3: ``aborted`` (the keys were
        refused), ``halted`` (a fault: a full disk, no API, Redis gone) or ``interrupted``
        (a signal)."""
        if self.aborted:
            return "aborted"
        if self.halted is not None:
            return "halted"
        if self.interrupted:
            return "interrupted"
        return "done" if self.exit_code == 0 else "incomplete"

    def record(self) -> dict[str, Any]:
        """The report's ``summary`` record (without its ``kind``), in its key order."""
        halted = self.halted
        out: dict[str, Any] = {
            "source": self.source, "rows": self.rows, "valid": self.valid,
            **self.read.counts(),
            "rejected": self.rejected, "rejected_by_reason": dict(self.rejected_by_reason),
            "emails_sent": self.emails_sent, "emails_failed": self.emails_failed,
            "emails_skipped": self.emails_skipped, "refused_by_code": dict(self.refused_by_code),
            "invitees_added": self.invitees_added, "invitees_lost": self.invitees_lost,
            "invitees_unchecked": self.invitees_unchecked,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "batches_sent": self.batches_sent, "batches_failed": self.batches_failed,
            "requests": self.requests, "retries": self.retries,
            "rate_limited": self.rate_limited, "ratelimit_waits": self.ratelimit_waits,
            "splits": self.splits, "unknown_outcomes": self.unknown_outcomes,
            "reconciled_sent": self.reconciled_sent,
            "reconcile_requests": self.reconcile_requests, "list_pages": self.list_pages,
            "requests_by_kind": dict(self.requests_by_kind),
            "unsent": self.unsent, "unread": self.unread,
            "aborted": self.aborted, "abort_reason": self.abort_reason,
            "interrupted": self.interrupted,
            "halted": asdict(halted) if halted is not None else None,
            "resumed": self.resumed, "exit_code": self.exit_code,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
        }  # fmt: skip
        if self.prune is not None:
            out.update(self.prune.fields())
        if self.job is not None:
            out["job"] = asdict(self.job)
        out.update(self.read.names())
        return out


@dataclass(frozen=True, slots=True)
class RunResult(Generic[R]):
    """How a run ended: its exit code and the summary written last to the report."""

    exit_code: int
    summary: Summary[R]


#: A run's summary, of either mode.
AnySummary = Summary[FileRead] | Summary[QueueRead]


def build_summary(
    runner: Runner,
    description: str,
    counts: FileCounts | QueueCounts,
    read: R,
    started: float,
    finished: float,
    *,
    history: History | None = None,
    resumed: bool = False,
    pruner: Pruner | None = None,
    usage_error: bool = False,
) -> Summary[R]:
    """The summary of a run; with ``pruner``, what ``--prune`` did.

    ``usage_error``: what stopped the run is the user's to fix (a stream worker's Redis
    user refused): exit 2 whatever else happened.
    """
    sender, report, state = runner.sender, runner.report, runner.state
    halted = state.fatal
    # Valid pairs read but neither sent nor failed (left for --resume after a stop); those
    # of requests that went out but whose outcome is unknown (cut by the stop) are not,
    # nor those another queue worker claimed to send.
    stats = sender.stats
    unsent = counts.valid - runner.recorded - stats.unknown_left - stats.claimed_elsewhere
    if isinstance(counts, FileCounts):
        unsent -= counts.settled_first  # recorded before reading began
    unsent = max(0, unsent)
    # The history knows what was open when this run began; what this run's stop cut in
    # flight is just as unknown, and the next --resume settles both.
    job = JobTotals(**history.totals(sender.stats.unknown_keys)) if history is not None else None
    rejected, by_reason = report.rejected_total, report.rejected_by_reason
    if isinstance(counts, FileCounts):  # --resume: rows an earlier run recorded count too
        rejected, by_reason = counts.rejected, counts.rejected_by_reason
    failed, unknown = report.emails["failed"], 0
    if history is not None:
        # What this input still holds decides, not the whole history: a daily list's row
        # fixed since, or a pair no longer on it, no longer makes the run incomplete.
        failed += len(history.failed_in_input)
        unknown = len(history.blocked)
    incomplete = bool(failed or rejected or unknown or unsent or report.prunes_refused
                      or report.invitees_lost or report.invitees_unchecked)  # fmt: skip
    # One code per kind of stop, in both modes: a signal is exit 3 for a queue worker too
    # (what it did not settle stays pending for the next one, nothing is lost).
    code = exit_code(aborted=state.aborted, halted=halted is not None,
                     interrupted=state.interrupted, incomplete=incomplete)  # fmt: skip
    reads = sender.reconciler.tally  # the check's listings and dashboard reads
    by_kind = {
        "invite": sender.stats.requests,
        "list_invitations": sender.reconciler.requests,
        "dashboard": sender.preflight.requests,
    }
    if sender.preflight.validations:  # asked only when a 404 came before any answer
        by_kind["validate"] = sender.preflight.validations
    for kind, n in (pruner.requests if pruner is not None else {}).items():
        by_kind[kind] = by_kind.get(kind, 0) + n  # --prune's reads, PUTs and DELETEs
    return Summary(
        source=description, rows=counts.rows, valid=counts.valid, read=read,
        rejected=rejected, rejected_by_reason=dict(sorted(by_reason.items())),
        emails_sent=report.emails["sent"], emails_failed=report.emails["failed"],
        emails_skipped=report.emails["skipped"],
        refused_by_code=dict(sorted(report.refused_by_code.items())),
        invitees_added=sender.preflight.invitees_added, invitees_lost=report.invitees_lost,
        invitees_unchecked=report.invitees_unchecked,
        skipped_by_reason=dict(sorted(report.skipped_by_reason.items())),
        batches_sent=report.batches["sent"], batches_failed=report.batches["failed"],
        requests=sum(by_kind.values()), retries=sender.stats.retries + reads.retries,
        rate_limited=sender.stats.rate_limited + reads.limited,
        ratelimit_waits=sender.pacer.waits,
        splits=sender.stats.splits + (pruner.splits if pruner is not None else 0),
        unknown_outcomes=sender.stats.unknown_outcomes,
        reconciled_sent=sender.stats.reconciled_sent,
        reconcile_requests=sender.reconciler.requests,
        list_pages=sender.reconciler.pages + (pruner.pages if pruner is not None else 0),
        requests_by_kind=by_kind, unsent=unsent,
        unread=counts.unread() if isinstance(counts, FileCounts) else 0,
        aborted=state.aborted,
        abort_reason=state.abort_error.message if state.abort_error else None,
        interrupted=state.interrupted,
        halted=Halt(halted.code, str(halted)) if halted is not None else None,
        resumed=resumed, exit_code=EXIT_USAGE if usage_error else code,
        started_at=iso(started), finished_at=iso(finished),
        duration_ms=round((finished - started) * 1000, 1),
        prune=PruneTotals.of(report) if pruner is not None else None, job=job,
    )  # fmt: skip
