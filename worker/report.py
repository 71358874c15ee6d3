"""The JSONL report: one record per batch outcome, per rejected row, and a final summary.

Records are appended with a direct ``write(2)`` as each outcome is known, so a crash leaves a
valid prefix. The file holds people's addresses, so it is created owner-only (0600).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from worker.errors import UsageError

PRIVATE_MODE = 0o600

_encode = msgspec.json.encode


class Invitation(msgspec.Struct, frozen=True):
    """What the report keeps of one invitation the service returns."""

    email: str
    created_at: str | None = None
    invitation_expiry: str | None = None


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


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
    if second != _second[0]:  # formatting the date part is the slow bit: once a second
        _second[0] = second
        _second[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{micros // 1000:03d}+00:00"


def read_records(path: Path, *, missing_ok: bool = False) -> Iterator[dict[str, Any]]:
    """Every JSON object of a JSONL file (report or journal), streamed in order.

    A line cut short by a crash, or that is not an object, is skipped. A missing file is
    an empty one when ``missing_ok``; otherwise ``OSError`` propagates.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    with handle:
        for line in handle:
            try:
                record = msgspec.json.decode(line)
            except ValueError:  # msgspec.DecodeError, or a UnicodeError inside a string
                continue
            if isinstance(record, dict):
                yield record


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may write fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_private_append(path: Path, *, truncate: bool = False) -> int:
    """Open ``path`` for appending, owner-only (0600), starting on a fresh line.

    An existing file keeps its mode on open, hence the explicit chmod. If a crash cut the
    last line short, a newline is added so the next record is not glued onto it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":
                    os.write(fd, b"\n")
    except OSError:
        os.close(fd)
        raise
    return fd


class Report:
    """Appends records to the report file and keeps the counts the summary needs."""

    def __init__(self, path: Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.path = path
        try:
            if not (overwrite or resume) and path.exists() and path.stat().st_size > 0:
                raise UsageError(
                    f"the report {str(path)!r} already exists and holds an earlier run; pass "
                    "--resume to continue that run, --overwrite to replace it, or choose "
                    "another --report path"
                )
            self._fd = open_private_append(path, truncate=overwrite and not resume)
        except OSError as exc:
            raise UsageError(f"cannot write the report {str(path)!r}: {exc.strerror}") from None
        self._pending: list[bytes] = []
        self.rejected_by_reason: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.emails: Counter[str] = Counter()
        self.closed = False
        #: Called with (token, emails, status, error) for every batch record (resume uses
        #: it to keep each pair's final state).
        self.on_batch: Callable[[str, list[str], str, dict[str, str] | None], None] | None = None

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
        where = "line" if isinstance(line, int) else "stream_id"
        record: dict[str, Any] = {"kind": "rejected", where: line, "reason": reason}
        if token:
            record["token"] = token[:200]
        if email:
            record["email"] = email[:320]
        self.rejected_by_reason[reason] += 1
        self._pending.append(_encode(record))

    def batch(
        self,
        *,
        token: str,
        emails: list[str],
        status: str,
        http_status: int | None,
        attempts: int,
        error: dict[str, str] | None,
        invitations: Sequence[Invitation],
        started_at: float,
        finished_at: float,
        rate_limited: int = 0,
        reconciled: bool = False,
    ) -> None:
        """Write one final batch outcome (``sent``, ``failed``) at once.

        ``reconciled`` marks emails found created by listing the token's invitations after
        an unknown outcome, rather than confirmed by the POST's own answer.
        """
        record: dict[str, Any] = {
            "kind": "batch",
            "token": token,
            "emails": emails,
            "status": status,
            "http_status": http_status,
            "attempts": attempts,
            "rate_limited": rate_limited,
            "error": error,
            "invitations": invitations,
            "started_at": iso(started_at),
            "finished_at": iso(finished_at),
            "duration_ms": round((finished_at - started_at) * 1000, 1),
        }
        if reconciled:
            record["reconciled"] = True
        self.batches[status] += 1
        self.emails[status] += len(emails)
        self._pending.append(_encode(record))
        self.flush()
        if self.on_batch is not None:  # after the write: a queue acknowledges on this
            self.on_batch(token, emails, status, error)

    def planned(self, token: str, emails: list[str]) -> None:
        """A batch a dry run would send."""
        self.batches["planned"] += 1
        self.emails["planned"] += len(emails)
        record = {"kind": "batch", "token": token, "emails": emails, "status": "planned"}
        self._pending.append(_encode(record))

    def summary(self, fields: dict[str, Any]) -> None:
        """Write the one ``summary`` record, last, and close the file."""
        self._pending.append(_encode({"kind": "summary", **fields}))
        self.flush()
        self.close()

    def sync(self) -> None:
        """Make everything written so far durable (before acknowledging it to a queue)."""
        self.flush()
        os.fdatasync(self._fd)

    def flush(self) -> None:
        """Write everything queued in one system call."""
        if self._pending:
            data = b"\n".join(self._pending) + b"\n"
            self._pending.clear()
            write_all(self._fd, data)

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self.closed:
            self.flush()
            os.close(self._fd)
            self.closed = True

    @property
    def rejected_total(self) -> int:
        """Rows rejected so far."""
        return sum(self.rejected_by_reason.values())
