"""What a run checks of its report and journal before it starts: that ``--resume`` has a
run to continue, and that a run that does not continue one leaves no send unsettled.
"""

from __future__ import annotations

from pathlib import Path

from worker.errors import UsageError
from worker.record.files import read_records, reads_as_report
from worker.record.journal import journal_path
from worker.record.records import JOURNAL_LINE, REPORT_LINE
from worker.record.replay import Replay


def require_report(report_path: Path) -> None:
    """``--resume`` needs the report of an earlier run: a mistyped path must never turn a
    resume into a fresh run that invites everyone again (checked before the lock, which
    would otherwise leave a ``.lock`` file beside the typo)."""
    if not report_path.exists():
        raise UsageError(
            f"--resume: there is no report at {str(report_path)!r}. Point --report at the "
            f"report the earlier run wrote (its journal, {journal_path(report_path).name}, "
            "lies beside it); to start a new run instead, drop --resume"
        )


def check_nothing_open(report_path: Path, *, plan: bool = False) -> None:
    """Before a run that does not continue the report (a new one, or ``--overwrite``), or
    a dry run's plan (``plan``): a UsageError when the journal beside it holds sends whose
    outcome is unknown.

    A run stopped or killed with requests out leaves them open there (before its first
    record, the report is even empty). A new run would empty the journal, and its check
    lists only the invitations already created: one still being created by the service
    would be sent again. ``--resume`` settles them first. A plan would replace the record
    of what was sent before them.
    """
    journal = journal_path(report_path)
    try:
        if not journal.stat().st_size or not reads_as_report(report_path):
            return  # (not a report: the report's own check says so)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot read the journal {str(journal)!r}: {exc.strerror}") from None
    replay = Replay.read(report_path) if report_path.exists() else Replay()
    unknown = len(replay.open_in(journal))
    if unknown:
        raise UsageError(
            f"the journal beside the report, {str(journal)!r}, holds {unknown:,} email(s) "
            "whose request was out when a run stopped or was killed: their outcome is "
            + (
                "unknown, and a plan written there would replace the report that records "
                "that run. Pass --resume to settle them first, or write the plan to "
                "another --report path"
                if plan
                else "unknown, and a new run could invite them again. Pass --resume to "
                "settle them first (it lists what was created, and sends only the rest); "
                "to discard them anyway, delete the journal"
            )
        )


def check_resumable(report_path: Path) -> None:
    """The report (or its journal) holds a record of an earlier run; else a UsageError."""
    require_report(report_path)
    journal = journal_path(report_path)
    try:
        if any(True for _ in read_records(report_path, REPORT_LINE, missing_ok=True)) or any(
            True for _ in read_records(journal, JOURNAL_LINE, missing_ok=True)
        ):
            return
    except OSError as exc:
        raise unreadable(exc) from None
    raise UsageError(
        f"--resume: the report {str(report_path)!r} holds no run (neither it nor its journal "
        "has a record), so there is nothing to continue; drop --resume to start a run"
    )


def unreadable(exc: OSError) -> UsageError:
    """``--resume`` could not read the report or its journal: which file, and why."""
    return UsageError(f"--resume: cannot read {exc.filename!r}: {exc.strerror}; nothing was "
                      "sent. Fix it, then run the same command again")  # fmt: skip
