"""``invite-worker report summarize|failed``: a report's replay, shown to a person."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from worker.cli.guards import check_failed_output
from worker.cli.help import command, json_stderr, say
from worker.errors import UsageError, keeps_pending, pending_codes
from worker.exits import EXIT_ABORTED
from worker.outcome import REFUSED, Status
from worker.record.files import reads_as_report
from worker.record.journal import journal_path
from worker.record.records import BatchRecord, ErrorInfo, SkippedRecord, SummaryRecord, restored
from worker.record.replay import Replay, records
from worker.validate import pair_key


def print_summary(path: Path, totals: dict[str, Any], out: TextIO, *, queued: bool = False) -> None:
    """The summary for a person (``queued``: a queue worker's report)."""
    runs, last = totals["runs"], totals["last_run"]
    state = "" if totals["complete"] else "; the last run did not finish: no summary"
    stopped = last is not None and last["exit_code"] == EXIT_ABORTED
    if stopped:
        state = "; the last run stopped before the end (exit 3)"
    print(f"Report {path} ({runs} run{'s' if runs != 1 else ''}{state})", file=out)
    lines = [
        ("emails sent", totals["sent"]),
        ("emails failed", totals["failed"]),
        ("rows rejected", totals["rejected"]),
        ("emails skipped", totals["skipped"]),
        ("requests", totals["requests"]),
        ("retries", totals["retries"]),
        ("429 answers", totals["rate_limited"]),
        ("rate-limit waits", totals["ratelimit_waits"]),
    ]
    if totals["planned"]:
        lines.insert(0, ("emails planned", totals["planned"]))
    if totals["revoked"] or totals["prunes_refused"]:
        lines.insert(4, ("emails revoked", totals["revoked"]))
        lines.insert(5, ("prunes refused", totals["prunes_refused"]))
    if totals["invitees_added"]:  # --add-invitees: access granted
        lines.insert(4, ("invitees added", totals["invitees_added"]))
    if totals["invitees_lost"]:  # the last run's: see invitees.lost
        lines.insert(5, ("invitees lost", totals["invitees_lost"]))
    if totals["invitees_unchecked"]:  # the last run's: see invitees.recheck_failed
        lines.insert(5, ("invitees unchecked", totals["invitees_unchecked"]))
    if totals["unknown"]:  # sent for all anyone knows: never to be sent again blindly
        lines.insert(2, ("emails unknown", totals["unknown"]))
    if totals["pending"]:  # a queue worker's, left in the stream for a claimer
        lines.insert(2, ("emails pending", totals["pending"]))
    for name, value in lines:
        print(f"  {name:<18} {value:,}", file=out)
    print(f"  {'duration':<18} {totals['duration_ms'] / 1000:,.1f} s", file=out)
    for title, key in (
        ("Failures by error code", "failed_by_code"),
        ("Failures by token", "failed_by_token"),
        ("Rejected rows by reason", "rejected_by_reason"),
        ("Skipped emails by reason", "skipped_by_reason"),
        ("Revoked emails by what was removed", "revoked_by_what"),
        ("Refused prunes by code", "prune_refused_by_code"),
    ):
        if totals[key]:
            print(title, file=out)
            for name, count in totals[key].items():
                print(f"  {name:<18} {count:,}", file=out)
    if totals["pending"]:
        print(f"{totals['pending']:,} email(s) failed in a way that leaves their stream "
              f"message pending ({', '.join(pending_codes())}): the worker that claims it "
              "settles it, in its own report; `report failed` leaves them out.",
              file=out)  # fmt: skip
    if stopped:
        left = [f"{last['unsent']:,} email(s) read but not sent"] if last["unsent"] else []
        left += [f"{last['unread']:,} row(s) not read"] if last["unread"] else []
        finish = ("what it did not settle stays pending in the stream, for the next worker"
                  if queued else "run it again with --resume to finish")  # fmt: skip
        detail = f" ({', '.join(left)})" if left else ""
        print(f"The last run stopped before the end{detail}: {finish}.", file=out)
    if totals["unknown"]:
        print(f"{totals['unknown']:,} email(s) with an unknown outcome: a run stopped with "
              "their requests out (or is still running). `run --resume` with this report "
              "finds out by listing the invitations, and sends only those not created.",
              file=out)  # fmt: skip


def read_failed(path: Path) -> tuple[Replay, set[int], bool]:
    """What :func:`write_failed` reads: the report replayed, the keys of the pairs still
    open in its journal, and whether it has none (read before any output is opened: a
    journal that cannot be read must not leave an emptied ``--output`` behind).

    A file run always leaves a journal, emptied once nothing is open; a queue worker
    keeps none (its pending messages are its intents)."""
    review, journal = Replay.read(path, strict=True), journal_path(path)
    return review, set(review.open_in(journal).tolist()), not journal.exists()


def write_failed(
    path: Path, out: TextIO, *, include_refused: bool = False,
    left_out: Counter[str] | None = None, read: tuple[Replay, set[int], bool] | None = None,
) -> int:  # fmt: skip
    """``token,email`` of every email whose last outcome is failed; returns how many.

    Refusals a re-run cannot fix (see ``REFUSED``) are left out unless ``include_refused``;
    ``left_out`` counts them by code. So are emails that are still to be settled
    (:data:`UNSETTLED`): a request still open in the journal, which may have created
    them (``--resume`` settles it), and, in a report with no journal (a queue worker's),
    a failure that leaves the message pending (``outcome_unknown``, ``forbidden``,
    ``aborted``: a worker that claims it settles it). A run of the CSV on a new report
    could invite them again. A file run's ``outcome_unknown`` whose intent a
    ``--resume`` cleared is known not created: it is listed. ``read``:
    :func:`read_failed`'s answer, if already read.
    """
    review, unsettled, queued = read if read is not None else read_failed(path)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["token", "email", "error_code", "error_message"])
    written = 0
    number = -1  # of the batch or skipped record, counted as Replay.read counts them
    for record in records(path):
        if not isinstance(record, BatchRecord | SkippedRecord) or restored(record) is not None:
            continue
        number += 1
        if isinstance(record, SkippedRecord) or record.status != Status.FAILED:
            continue
        skip = record.code in REFUSED and not include_refused
        token, emails = record.token, record.emails
        keys = [pair_key(token, email) for email in emails]
        here: set[int] = set()  # an address twice in one record is written once
        for email, key, last in zip(emails, keys, review.last_records(keys), strict=True):
            if last == number and key not in here:
                here.add(key)
                if key in unsettled or (queued and keeps_pending(record.code or "")):
                    if left_out is not None:
                        left_out[UNSETTLED] += 1
                    continue
                if skip:
                    if left_out is not None:
                        left_out[record.code or ""] += 1
                    continue
                writer.writerow([token, email, record.code or "", _message(record)])
                written += 1
    return written


def require_report(path: Path) -> None:
    """A file that is not a report, said before reading it (not as torn lines)."""
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a folder; give the report file, e.g. "
                         f"{str(path / 'invite-report.jsonl')!r}")  # fmt: skip
    if path.exists() and not reads_as_report(path):
        raise UsageError(
            f"{str(path)!r} is not an invite-worker report (its first line is not a report "
            "record); give the file a run wrote with --report (default invite-report.jsonl)"
        )


def _sources(path: Path) -> list[str]:
    """The inputs of the runs the report holds, as each run's summary names it."""
    return [record.source for record in records(path)
            if isinstance(record, SummaryRecord) and isinstance(record.source, str)]  # fmt: skip


#: ``write_failed``'s ``left_out`` key for the emails still to be settled elsewhere.
UNSETTLED = "not settled"


def _left_out_note(left_out: Counter[str]) -> str:
    refused = Counter({code: n for code, n in left_out.items() if code != UNSETTLED})
    note = ""
    if left_out[UNSETTLED]:
        note += (f"; {left_out[UNSETTLED]:,} not settled yet left out (a request that may "
                 "have created them, or a stream message still pending): settle them first, "
                 "with the same run and --resume (a queue worker settles its own as it "
                 "claims their messages)")  # fmt: skip
    if refused:
        codes = ", ".join(f"{code} {n:,}" for code, n in sorted(refused.items()))
        note += (f"; {refused.total():,} refused by the dashboard check left out ({codes}): "
                 "add --include-refused to list them too")  # fmt: skip
    return note


def _message(record: BatchRecord) -> str:
    error = record.error
    return error.message if isinstance(error, ErrorInfo) else ""


def add_report_parser(sub: Any) -> None:
    """``invite-worker report summarize|failed REPORT``."""
    rp = command(
        sub,
        "report",
        "Read a run's JSONL report (every run on it, resumed ones "
        "included; a pair's last record counts).",
        """
  invite-worker report summarize invite-report.jsonl
  invite-worker report failed invite-report.jsonl --output retry.csv
""",
    )
    actions = rp.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    rs = command(
        actions,
        "summarize",
        "Totals (emails sent, failed, skipped; rows rejected; "
        "requests, retries, 429s, duration), failures by code and by token, "
        "rejections by reason. Exit 2 for a file that is not a report.",
        """
  invite-worker report summarize invite-report.jsonl
  invite-worker report summarize invite-report.jsonl --json | jq .failed
""",
        help="totals, failures by code and token, rejections",
    )
    rs.add_argument(
        "report", metavar="REPORT", type=Path, help="the report; e.g. invite-report.jsonl"
    )
    rs.add_argument("--json", action="store_true", help="print one JSON object")
    rf = command(
        actions,
        "failed",
        "A CSV (token,email,error_code,error_message) of every "
        "email whose last outcome is failed, ready for 'run' once the cause is "
        "fixed ('run' ignores the extra columns). Written owner-only (0600), never over "
        "the report. Refusals of the dashboard check are left out (it says how many) "
        "unless --include-refused.",
        """
  invite-worker report failed invite-report.jsonl --output retry.csv
  invite-worker run retry.csv --report retry-report.jsonl
""",
        help="CSV of every email that failed, to run again",
    )
    rf.add_argument(
        "report", metavar="REPORT", type=Path, help="the report; e.g. invite-report.jsonl"
    )
    rf.add_argument(
        "--output",
        type=Path,
        metavar="PATH",
        help="write the CSV here (default, or -: stdout); e.g. --output retry.csv",
    )
    rf.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    rf.add_argument(
        "--include-refused",
        action="store_true",
        help="also list emails the dashboard check refused (not on the share list, no "
        "dashboard, paused, not invite-only): a re-run fails them again until it changes",
    )


def report_command(args: argparse.Namespace) -> int:
    """``report summarize`` or ``report failed``."""
    require_report(args.report)
    if args.report_command == "summarize":
        # A run killed before its first record leaves a report with none, and a journal.
        journal = journal_path(args.report)
        queued = not journal.exists()  # a file run always leaves one (see read_failed)
        replay = Replay.read(args.report, strict=queued)
        totals = replay.summary(replay.open_in(journal), queued=queued)
        if args.json:
            print(json.dumps(totals))
        else:
            print_summary(args.report, totals, sys.stdout, queued=queued)
        return 0
    left_out: Counter[str] = Counter()
    if args.output is None or str(args.output) == "-":  # "-": standard output, as for input
        count = write_failed(args.report, sys.stdout, include_refused=args.include_refused,
                             left_out=left_out)  # fmt: skip
        if left_out:
            say("report.failed_listed", f"{count:,} failed email(s) listed"
                f"{_left_out_note(left_out)}", json_lines=json_stderr(sys.argv[1:]),
                level="info")  # fmt: skip
        return 0
    check_failed_output(args.report, args.output, _sources(args.report))
    read = read_failed(args.report)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.overwrite else os.O_EXCL)
    try:
        # Owner-only, like the report: the file holds addresses.
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{str(args.output)!r} exists; pass --overwrite to replace it, or "
            "choose another --output"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot write {str(args.output)!r}: {exc.strerror}") from None
    with open(fd, "w", newline="", encoding="utf-8") as out:
        count = write_failed(args.report, out, include_refused=args.include_refused,
                             left_out=left_out, read=read)  # fmt: skip
    say("report.failed_written", f"{count:,} failed email(s) written to {args.output}"
        f"{_left_out_note(left_out)}", json_lines=json_stderr(sys.argv[1:]),
        level="info")  # fmt: skip
    return 0
