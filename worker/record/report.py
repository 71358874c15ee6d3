"""The JSONL report: one record per batch outcome, per rejected row, and a final summary.

Records are appended with a direct ``write(2)`` as each outcome is known, so a crash leaves a
valid prefix. The file holds people's addresses, so it is created owner-only (0600).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msgspec import UNSET

from worker.clock import second_text
from worker.errors import UsageError
from worker.metrics import Metrics
from worker.outcome import REFUSED, Status
from worker.record.files import AppendFile, holds_only_a_plan, reads_as_report
from worker.record.records import (
    EMAIL_KEPT,
    TOKEN_KEPT,
    BatchRecord,
    ErrorInfo,
    PruneRefusedRecord,
    RejectedRecord,
    RevokedRecord,
    SkippedRecord,
    encode,
)

if TYPE_CHECKING:
    from worker.outcome import Outcome


def iso(ts: float) -> str:
    """An epoch timestamp as ISO 8601 UTC with milliseconds (``...T12:00:00.250+00:00``)."""
    # Round to microseconds first, exactly as datetime.fromtimestamp does.
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{second_text(second)}.{micros // 1000:03d}+00:00"


class Report:
    """Appends records to the report file and keeps the counts the summary needs."""

    def __init__(
        self, path: Path, *, overwrite: bool = False, resume: bool = False, plan: bool = False
    ) -> None:
        """Open the report; ``plan``: a dry run's (an earlier plan there is replaced)."""
        self.path = path
        try:
            held = path.exists() and path.stat().st_size > 0
            if plan and held and holds_only_a_plan(path):
                overwrite = True  # an earlier plan: dry runs repeat freely
            if held and not resume and not reads_as_report(path):
                raise UsageError(
                    f"{str(path)!r} is not a report (its first line is not a report record) "
                    "and is never replaced, --overwrite or not; choose another --report path"
                )
            if not (overwrite or resume) and held:
                hint = ("--overwrite to replace it with this plan, or choose another --report "
                        "path" if plan else "--resume to continue that run, --overwrite to "
                        "replace it, or choose another --report path")  # fmt: skip
                if not plan and holds_only_a_plan(path):  # a plan is no run to continue
                    raise UsageError(
                        f"the report {str(path)!r} holds a dry run's plan, not a run: "
                        "choose another --report path for the run (or --overwrite to "
                        "replace the plan)"
                    )
                raise UsageError(
                    f"the report {str(path)!r} already exists and holds an earlier run; pass "
                    + hint
                )
            self._file = AppendFile(path, truncate=overwrite and not resume)
        except OSError as exc:
            raise UsageError(f"cannot write the report {str(path)!r}: {exc.strerror}") from None
        self._pending: list[bytes] = []
        self.rejected_by_reason: Counter[str] = Counter()
        self.skipped_by_reason: Counter[str] = Counter()
        #: Emails the dashboard check refused, before any POST, by code.
        self.refused_by_code: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.emails: Counter[str] = Counter()
        #: ``--prune``: emails whose access was taken away, by what; refusals by code.
        self.revoked_emails = 0
        self.revoked_by_what: Counter[str] = Counter()
        self.prunes_refused: Counter[str] = Counter()
        #: ``--add-invitees``: people invited whose entry was gone at the run's end and
        #: could not be added back, and people whose dashboard the look could not read
        #: (see ``send.recheck``); None: the run made no look.
        self.invitees_lost: int | None = None
        self.invitees_unchecked: int | None = None
        self.closed = False
        #: Told of each revocation recorded (``--resume``: the job's totals follow it).
        self.on_revoked: Callable[[str, list[str]], None] | None = None
        #: Rejections are counted here too, whichever stage found them.
        self.metrics = Metrics()

    def rejected(
        self,
        line: int | str,
        reason: str,
        token: str | None = None,
        email: str | None = None,
    ) -> None:
        """Queue a ``rejected`` record; it is written by the next :meth:`flush` or batch.

        ``line`` is the input's line number, or a stream message id (``stream_id``).
        """
        record = RejectedRecord(reason, token=token[:TOKEN_KEPT] if token else UNSET,
                                email=email[:EMAIL_KEPT] if email else UNSET)  # fmt: skip
        if isinstance(line, int):
            record.line = line
        else:
            record.stream_id = line
        self.rejected_by_reason[str(reason)] += 1  # a Reason is a str: keep the plain text
        self.metrics.rejected(str(reason))
        self._pending.append(encode(record))

    def batch(self, outcome: Outcome) -> None:
        """Write one final batch outcome (``sent``, ``failed``, ``skipped``) at once."""
        count, error = len(outcome.emails), outcome.error
        record: BatchRecord | SkippedRecord
        if outcome.status is Status.SKIPPED:
            record = SkippedRecord(outcome.token, outcome.emails, outcome.reason or "skipped")
        else:
            record = BatchRecord(
                outcome.token, outcome.emails, outcome.status, outcome.http_status,
                outcome.attempts, outcome.rate_limited,
                ErrorInfo(error.code, error.message) if error else None,
                list(outcome.invitations), iso(outcome.started_at), iso(outcome.finished_at),
                round((outcome.finished_at - outcome.started_at) * 1000, 1),
                True if outcome.reconciled else UNSET,
                invitees_added=list(outcome.invitees_added) or UNSET,
                access_expiration=outcome.access_expiration if outcome.invitees_added
                else UNSET,
            )  # fmt: skip
        self._pending.append(encode(record))
        self.flush()
        # Counted once written: a record the disk refused is not in the report (a send's
        # intent stays open in the journal: an unknown outcome, for --resume to settle).
        self.batches[outcome.status] += 1
        self.emails[outcome.status] += count
        if outcome.status is Status.SKIPPED:
            self.skipped_by_reason[outcome.reason or "skipped"] += count
        elif error is not None and error.code in REFUSED and not outcome.attempts:
            self.refused_by_code[error.code] += count

    def restored(self, token: str, emails: list[str], until: str | None) -> None:
        """Emails already served whose invitee entries ``--prune --add-invitees`` added back
        (access until ``until``; None: for good), at once. Their rows were counted when
        they were skipped: nothing is counted again."""
        self._pending.append(encode(SkippedRecord(token, emails, "already_invited",
                                                  list(emails), until)))  # fmt: skip
        self.flush()

    def revoked(self, token: str, emails: list[str], removed: list[str], *,
                planned: bool = False) -> None:  # fmt: skip
        """Emails whose access ``--prune`` takes away (or, ``planned``, would), at once: an
        invitation's record is written as its DELETE leaves (see ``run.prune._revoke``)."""
        if not planned:
            if self.on_revoked is not None:
                self.on_revoked(token, emails)
            self.revoked_emails += len(emails)
            for what in removed:
                self.revoked_by_what[what] += len(emails)
            self.metrics.revoked(removed, len(emails))
        self._pending.append(encode(RevokedRecord(token, emails, sorted(removed),
                                                  True if planned else UNSET)))  # fmt: skip
        self.flush()

    def prune_refused(self, code: str, message: str, token: str | None = None,
                      people: int | None = None, remove: int | None = None) -> None:  # fmt: skip
        """A dashboard ``--prune`` left whole (or, no ``token``, the whole run), and why."""
        self.prunes_refused[code] += 1
        self.metrics.prune_refused(code)
        record = PruneRefusedRecord(code, message)
        if token is not None:
            record.token = token
        if people is not None and remove is not None:
            record.people, record.remove = people, remove
        self._pending.append(encode(record))
        self.flush()

    def planned(self, token: str, emails: list[str], to_add: list[str] | None = None) -> None:
        """A batch a dry run would send; ``to_add``: those of ``emails`` that
        ``--add-invitees`` would add to the dashboard's invitees first."""
        self.batches[Status.PLANNED] += 1
        self.emails[Status.PLANNED] += len(emails)
        record = BatchRecord(token, emails, Status.PLANNED, invitees_to_add=to_add or UNSET)
        self._pending.append(encode(record))

    def summary(self, fields: dict[str, Any]) -> None:
        """Write the one ``summary`` record, last, and close the file (even if the write
        fails: :class:`StorageError` is raised all the same)."""
        self._pending.append(encode({"kind": "summary", **fields}))
        try:
            self.flush()
        finally:
            self.close()

    async def sync(self) -> None:
        """Make everything written so far durable (before acknowledging it to a queue).

        The records are written here, on the loop's thread, like every other write; only
        the ``fdatasync`` goes to a thread. A thread that flushed would race with the
        records the loop keeps adding: one added between its join and its clear is lost.
        """
        self.flush()
        await self._file.sync_off_loop()

    def flush(self) -> None:
        """Write everything queued in one system call; :class:`StorageError` if it fails."""
        if self._pending:
            data = b"\n".join(self._pending) + b"\n"
            self._pending.clear()
            self._file.write(data)

    def close(self) -> None:
        """Flush and close (idempotent); the file is closed even if the flush fails."""
        if not self.closed:
            self.closed = True
            try:
                self.flush()
            finally:
                self._file.close()

    @property
    def refused(self) -> int:
        """Emails the dashboard check refused."""
        return sum(self.refused_by_code.values())

    @property
    def rejected_total(self) -> int:
        """Rows rejected so far."""
        return sum(self.rejected_by_reason.values())
