"""The JSONL report: one record per batch outcome, per rejected row, and a final summary.

Records are appended with a direct ``write(2)`` as each outcome is known, so a crash leaves a
valid prefix. The file holds people's addresses, so it is created owner-only (0600).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from worker.errors import StorageError, UsageError

if TYPE_CHECKING:
    from worker.outcome import Outcome

PRIVATE_MODE = 0o600

log = structlog.get_logger("worker.report")

_encode = msgspec.json.encode


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


def read_records(
    path: Path,
    *,
    missing_ok: bool = False,
    check: Callable[[dict[str, Any]], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every JSON object of a JSONL file (report or journal), streamed in order.

    A line that is not a JSON object (cut short by a crash or a full disk, or glued to
    another), or that fails ``check``, is skipped; once the file is read, one
    ``records.torn_line`` warning names the first such line and how many there were. A
    missing file is an empty one when ``missing_ok``; otherwise ``OSError`` propagates.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    first_bad, bad = 0, 0
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                record = msgspec.json.decode(line)
            except ValueError:  # msgspec.DecodeError, or a UnicodeError inside a string
                record = None
            if isinstance(record, dict) and (check is None or check(record)):
                yield record
            elif line.strip():
                first_bad, bad = first_bad or number, bad + 1
    if bad:
        log.warning(
            "records.torn_line", path=str(path), line=first_bad, skipped=bad,
            hint="a line cut short (a crash or a full disk) or edited by hand; it was skipped",
        )  # fmt: skip


def batch_shape(record: dict[str, Any]) -> bool:
    """Whether a report record can be read (a ``batch`` needs its token, emails, status)."""
    kind = record.get("kind")
    if kind == "batch":
        error = record.get("error")
        return (
            isinstance(record.get("token"), str)
            and isinstance(record.get("status"), str)
            and isinstance(record.get("emails"), list)
            and all(isinstance(e, str) for e in record["emails"])
            and (error is None or (isinstance(error, dict) and isinstance(error.get("code"), str)))
        )
    if kind == "rejected":
        return isinstance(record.get("reason"), str) and (
            isinstance(record.get("line"), int) or isinstance(record.get("stream_id"), str)
        )
    return isinstance(kind, str)  # a summary, or a kind a later version writes


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


class AppendFile:
    """An owner-only JSONL file we append to, whose first failed write ends all writing.

    A write that fails (ENOSPC, EIO, EDQUOT) raises :class:`StorageError` and its partial
    bytes are cut off again where possible, so no torn line is left for the next write to
    be glued onto. Every later write raises at once: after the disk failed us once, nothing
    more is recorded (and so, for the journal, nothing more is sent).
    """

    def __init__(self, path: Path, *, truncate: bool = False) -> None:
        self.path = path
        self.fd = open_private_append(path, truncate=truncate)
        self._size = os.fstat(self.fd).st_size
        self._broken: OSError | None = None

    def write(self, data: bytes) -> None:
        """Append ``data`` whole, or raise :class:`StorageError`."""
        if self._broken is not None:
            raise StorageError(self.path, self._broken)
        try:
            write_all(self.fd, data)
        except OSError as exc:
            self._broken = exc
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self._size)
            raise StorageError(self.path, exc) from None
        self._size += len(data)

    def sync(self) -> None:
        """``fdatasync``: what was written survives a power loss."""
        if self._broken is not None:
            raise StorageError(self.path, self._broken)
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self._broken = exc
            raise StorageError(self.path, exc) from None

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
            self._file = AppendFile(path, truncate=overwrite and not resume)
        except OSError as exc:
            raise UsageError(f"cannot write the report {str(path)!r}: {exc.strerror}") from None
        self._pending: list[bytes] = []
        self.rejected_by_reason: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.emails: Counter[str] = Counter()
        self.closed = False

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

    def batch(self, outcome: Outcome) -> None:
        """Write one final batch outcome (``sent``, ``failed``) at once.

        ``reconciled`` marks emails found created by listing the token's invitations after
        an unknown outcome, rather than confirmed by the POST's own answer.
        """
        error = outcome.error
        record: dict[str, Any] = {
            "kind": "batch",
            "token": outcome.token,
            "emails": outcome.emails,
            "status": outcome.status.value,
            "http_status": outcome.http_status,
            "attempts": outcome.attempts,
            "rate_limited": outcome.rate_limited,
            "error": {"code": error.code, "message": error.message} if error else None,
            "invitations": outcome.invitations,
            "started_at": iso(outcome.started_at),
            "finished_at": iso(outcome.finished_at),
            "duration_ms": round((outcome.finished_at - outcome.started_at) * 1000, 1),
        }
        if outcome.reconciled:
            record["reconciled"] = True
        self.batches[outcome.status] += 1
        self.emails[outcome.status] += len(outcome.emails)
        self._pending.append(_encode(record))
        self.flush()

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
        self._file.sync()

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
    def rejected_total(self) -> int:
        """Rows rejected so far."""
        return sum(self.rejected_by_reason.values())
