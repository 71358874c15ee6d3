"""``invite-worker report summarize|failed``: reading a report after the fact.

A report may hold several runs (``--resume``): a pair's *last* batch record is its state.
"""

from __future__ import annotations

import csv
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, TextIO

from worker.dedupe import locate
from worker.errors import UsageError
from worker.outcome import Status
from worker.record.files import read_records
from worker.record.records import (
    REPORT_LINE,
    BatchRecord,
    RejectedRecord,
    ReportRecord,
    SummaryRecord,
)
from worker.validate import pair_key

#: Request counters summed over the runs' summaries.
RUN_COUNTERS = ("requests", "retries", "rate_limited", "ratelimit_waits", "duration_ms")


def records(path: Path) -> Iterator[ReportRecord]:
    """The report's records; a line cut short by a crash is skipped."""
    try:
        yield from read_records(path, REPORT_LINE)
    except OSError as exc:
        raise UsageError(f"cannot read the report {str(path)!r}: {exc.strerror}") from None


@dataclass
class Review:
    """What a report says, pair by pair and run by run.

    A report can hold millions of pairs, so their final states are kept compact: one
    64-bit key per pair (see :func:`pair_key`) with the number of the batch record that
    holds its last state, in two numpy arrays sorted by key.
    """

    #: (status, error code, token) of every batch record, in the report's order
    batches: list[tuple[str, str | None, str]] = field(default_factory=list)
    rejected: dict[Any, str] = field(default_factory=dict)  # line or stream id -> reason
    runs: list[SummaryRecord] = field(default_factory=list)
    ends_with_summary: bool = False
    _keys: Any = None  # sorted pair keys, each once
    _last: Any = None  # for each, the number of its last batch record

    @classmethod
    def read(cls, path: Path) -> Review:
        review = cls()
        keys, owners = array("q"), array("i")  # 8 + 4 bytes a pair
        last: ReportRecord | None = None
        for record in records(path):
            last = record
            if isinstance(record, BatchRecord):
                token, emails = record.token, record.emails
                owners.extend(repeat(len(review.batches), len(emails)))
                review.batches.append((record.status, record.code, token))
                keys.extend(pair_key(token, email) for email in emails)
            elif isinstance(record, RejectedRecord):
                review.rejected.setdefault(record.where, record.reason)
            else:
                review.runs.append(record)
        review.ends_with_summary = isinstance(last, SummaryRecord)
        review._index(keys, owners)
        return review

    def _index(self, keys: array[int], owners: array[int]) -> None:
        import numpy as np

        all_keys = np.frombuffer(keys, dtype=np.int64) if keys else np.empty(0, np.int64)
        all_owners = np.frombuffer(owners, dtype=np.intc) if owners else np.empty(0, np.intc)
        order = np.argsort(all_keys, kind="stable")  # equal keys stay in report order
        sorted_keys, sorted_owners = all_keys[order], all_owners[order]
        last = np.ones(len(sorted_keys), dtype=bool)  # the last of each run of equal keys
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        self._keys, self._last = sorted_keys[last], sorted_owners[last]

    def last_records(self, keys: list[int]) -> list[int]:
        """For each key, the number of the batch record holding its last state (-1: none)."""
        import numpy as np

        if not len(self._keys) or not keys:
            return [-1] * len(keys)
        at, found = locate(self._keys, np.array(keys, dtype=np.int64))
        result: list[int] = np.where(found, self._last[at], -1).tolist()
        return result

    def summary(self) -> dict[str, Any]:
        """Totals over the whole history (emails by final state, rows rejected)."""
        import numpy as np

        statuses: Counter[str] = Counter()
        failed_by_code: Counter[str] = Counter()
        failed_by_token: Counter[str] = Counter()
        finals = np.bincount(self._last, minlength=len(self.batches)).tolist()
        for (status, code, token), pairs in zip(self.batches, finals, strict=True):
            if pairs:
                statuses[status] += pairs
                if status == "failed":
                    failed_by_code[code or "?"] += pairs
                    failed_by_token[token] += pairs
        totals: dict[str, Any] = {
            "sent": statuses["sent"],
            "failed": statuses["failed"],
            "planned": statuses["planned"],
            "rejected": len(self.rejected),
            "runs": len(self.runs),
            "complete": self.ends_with_summary,
        }
        for name in RUN_COUNTERS:
            totals[name] = sum(getattr(run, name) for run in self.runs)
        totals["duration_ms"] = round(totals["duration_ms"], 1)
        totals["failed_by_code"] = dict(failed_by_code.most_common())
        totals["failed_by_token"] = dict(failed_by_token.most_common())
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
    written = 0
    number = -1  # of the batch record, counted as Review.read counts them
    for record in records(path):
        if not isinstance(record, BatchRecord):
            continue
        number += 1
        if record.status != Status.FAILED:
            continue
        token, emails = record.token, record.emails
        keys = [pair_key(token, email) for email in emails]
        here: set[int] = set()  # an address twice in one record is written once
        for email, key, last in zip(emails, keys, review.last_records(keys), strict=True):
            if last == number and key not in here:
                here.add(key)
                writer.writerow([token, email])
                written += 1
    return written
