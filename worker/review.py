"""``invite-worker report summarize|failed``: reading a report after the fact.

A report may hold several runs (``--resume``): a pair's *last* batch record is its state.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from worker.errors import UsageError
from worker.report import read_records
from worker.validate import pair_key

#: Request counters summed over the runs' summaries.
RUN_COUNTERS = ("requests", "retries", "rate_limited", "ratelimit_waits", "duration_ms")


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The report's records; a line cut short by a crash is skipped."""
    try:
        yield from read_records(path)
    except OSError as exc:
        raise UsageError(f"cannot read the report {str(path)!r}: {exc.strerror}") from None


@dataclass
class Review:
    """What a report says, pair by pair and run by run."""

    #: pair -> (status, error code, token) of its last batch record
    final: dict[int, tuple[str, str | None, str]] = field(default_factory=dict)
    rejected: dict[Any, str] = field(default_factory=dict)  # line or stream id -> reason
    runs: list[dict[str, Any]] = field(default_factory=list)
    ends_with_summary: bool = False

    @classmethod
    def read(cls, path: Path) -> Review:
        review = cls()
        last_kind = None
        for record in records(path):
            last_kind = kind = record.get("kind")
            if kind == "batch":
                error = record.get("error") or {}
                state = (record["status"], error.get("code"), record["token"])
                for email in record["emails"]:
                    review.final[pair_key(record["token"], email)] = state
            elif kind == "rejected":
                where = record.get("line", record.get("stream_id"))
                review.rejected.setdefault(where, record["reason"])
            elif kind == "summary":
                review.runs.append(record)
        review.ends_with_summary = last_kind == "summary"
        return review

    def summary(self) -> dict[str, Any]:
        """Totals over the whole history (emails by final state, rows rejected)."""
        statuses = Counter(status for status, _, _ in self.final.values())
        failed = [(code, token) for status, code, token in self.final.values()
                  if status == "failed"]  # fmt: skip
        totals: dict[str, Any] = {
            "sent": statuses["sent"],
            "failed": statuses["failed"],
            "planned": statuses["planned"],
            "rejected": len(self.rejected),
            "runs": len(self.runs),
            "complete": self.ends_with_summary,
        }
        for name in RUN_COUNTERS:
            totals[name] = sum(run.get(name) or 0 for run in self.runs)
        totals["duration_ms"] = round(totals["duration_ms"], 1)
        totals["failed_by_code"] = dict(Counter(code or "?" for code, _ in failed).most_common())
        totals["failed_by_token"] = dict(Counter(token for _, token in failed).most_common())
        totals["rejected_by_reason"] = dict(Counter(self.rejected.values()).most_common())
        return totals


def print_summary(path: Path, totals: dict[str, Any], out: TextIO) -> None:
    """The summary for a person."""
    runs = totals["runs"]
    state = "" if totals["complete"] else "; the last run did not finish (no summary)"
    print(f"Report {path} ({runs} run{'s' if runs != 1 else ''}{state})", file=out)
    lines = [
        ("emails sent", totals["sent"]),
        ("emails failed", totals["failed"]),
        ("rows rejected", totals["rejected"]),
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
                       ("Rejected rows by reason", "rejected_by_reason")):  # fmt: skip
        if totals[key]:
            print(title, file=out)
            for name, count in totals[key].items():
                print(f"  {name:<18} {count:,}", file=out)


def write_failed(path: Path, out: TextIO) -> int:
    """``token,email`` of every email whose last outcome is failed; returns how many."""
    review = Review.read(path)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["token", "email"])
    written: set[int] = set()
    for record in records(path):
        if record.get("kind") != "batch" or record.get("status") != "failed":
            continue
        for email in record["emails"]:
            key = pair_key(record["token"], email)
            if key not in written and review.final.get(key, ("",))[0] == "failed":
                written.add(key)
                writer.writerow([record["token"], email])
    return len(written)
