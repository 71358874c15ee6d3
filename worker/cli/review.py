"""``invite-worker report summarize|failed``: a report's replay, shown to a person."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, TextIO

from worker.outcome import REFUSED, Status
from worker.record.records import BatchRecord, ErrorInfo
from worker.record.replay import Replay, records
from worker.validate import pair_key


def print_summary(path: Path, totals: dict[str, Any], out: TextIO) -> None:
    """The summary for a person."""
    runs = totals["runs"]
    state = "" if totals["complete"] else "; the last run did not finish (no summary)"
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
    for name, value in lines:
        print(f"  {name:<18} {value:,}", file=out)
    print(f"  {'duration':<18} {totals['duration_ms'] / 1000:,.1f} s", file=out)
    for title, key in (("Failures by error code", "failed_by_code"),
                       ("Failures by token", "failed_by_token"),
                       ("Rejected rows by reason", "rejected_by_reason"),
                       ("Skipped emails by reason", "skipped_by_reason")):  # fmt: skip
        if totals[key]:
            print(title, file=out)
            for name, count in totals[key].items():
                print(f"  {name:<18} {count:,}", file=out)


def write_failed(path: Path, out: TextIO, *, include_refused: bool = False) -> int:
    """``token,email`` of every email whose last outcome is failed; returns how many.

    Refusals a re-run cannot fix (see ``REFUSED``) are left out unless ``include_refused``.
    """
    review = Replay.read(path, strict=True)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["token", "email", "error_code", "error_message"])
    written = 0
    number = -1  # of the batch record, counted as Replay.read counts them
    for record in records(path):
        if not isinstance(record, BatchRecord):
            continue
        number += 1
        if record.status != Status.FAILED or (record.code in REFUSED and not include_refused):
            continue
        token, emails = record.token, record.emails
        keys = [pair_key(token, email) for email in emails]
        here: set[int] = set()  # an address twice in one record is written once
        for email, key, last in zip(emails, keys, review.last_records(keys), strict=True):
            if last == number and key not in here:
                here.add(key)
                writer.writerow([token, email, record.code or "", _message(record)])
                written += 1
    return written


def _message(record: BatchRecord) -> str:
    error = record.error
    return error.message if isinstance(error, ErrorInfo) else ""
