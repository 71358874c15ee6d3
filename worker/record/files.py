"""The JSONL files a run keeps: appended safely, owner-only, and read back tolerantly.

Both the report and the journal are appended to with direct ``write(2)`` calls, created
owner-only (0600) because they hold addresses, and read back skipping any line a crash or
a full disk cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import structlog

from worker.errors import StorageError

PRIVATE_MODE = 0o600
T = TypeVar("T")

log = structlog.get_logger("worker.report")


def read_records(
    path: Path,
    decoder: msgspec.json.Decoder[T],
    *,
    missing_ok: bool = False,
    check: Callable[[T], bool] | None = None,
) -> Iterator[T]:
    """Every record of a JSONL file (report or journal), typed by ``decoder``, in order.

    A line that does not decode (cut short by a crash or a full disk, glued to another,
    edited by hand), or that fails ``check``, is skipped; once the file is read, one
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
                record = decoder.decode(line)
            except ValueError:  # msgspec's errors, or a UnicodeError inside a string
                if line.strip():
                    first_bad, bad = first_bad or number, bad + 1
                continue
            if check is None or check(record):
                yield record
            else:
                first_bad, bad = first_bad or number, bad + 1
    if bad:
        log.warning(
            "records.torn_line", path=str(path), line=first_bad, skipped=bad,
            hint="a line cut short (a crash or a full disk) or edited by hand; it was skipped",
        )  # fmt: skip


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

    async def sync_off_loop(self) -> None:
        """:meth:`sync` with only the ``fdatasync`` itself in a thread.

        Everything else — the broken state, the size, the writes — stays on the caller's
        (the loop's) thread: a thread that touched them would race with the writes the loop
        goes on making meanwhile.
        """
        if self._broken is not None:
            raise StorageError(self.path, self._broken)
        try:
            await asyncio.to_thread(os.fdatasync, self.fd)
        except OSError as exc:
            self._broken = exc
            raise StorageError(self.path, exc) from None

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: The ``kind`` of every report record.
REPORT_KINDS = frozenset({"batch", "rejected", "skipped", "summary", "revoked", "prune_refused"})


class _Kind(msgspec.Struct):
    kind: str = ""
    status: str = ""
    dry_run: bool = False
    planned: bool = False  # a revoked record: --prune's dry run


_KIND = msgspec.json.Decoder(_Kind)


def _first_object(path: Path) -> tuple[dict[object, object] | None, bool]:
    """The first line of ``path`` that decodes as a JSON object, and whether any line was
    not blank; lines that do not decode are skipped, as :func:`read_records` skips them.

    A crash can tear any line, the first one too (a run cut short while writing it, then
    resumed): the next whole record says what the file is.
    """
    text = False
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            text = True
            try:
                found = msgspec.json.decode(line)
            except ValueError:  # msgspec's errors, or a UnicodeError inside a string
                continue
            if isinstance(found, dict):
                return found, text
    return None, text


def reads_as_report(path: Path) -> bool:
    """Whether ``path`` is empty or its first record is a report record (of any run).

    What ``--overwrite`` may replace: a CSV, a JSONL input, anything else is not. The
    first line that decodes as a JSON object decides (a CSV has none; a JSONL input's
    lack a report ``kind``); a blank file reads as an empty report.
    """
    try:
        first, text = _first_object(path)
    except OSError:
        return False
    if first is None:
        return not text
    kind = first.get("kind")
    return isinstance(kind, str) and kind in REPORT_KINDS  # a list or object: no report's


def holds_only_a_plan(path: Path) -> bool:
    """Whether ``path`` holds a dry run's plan and nothing a real run wrote.

    A plan may be replaced by the next dry run: it records no outcome anyone relies on.
    Only positive evidence counts -- a ``planned`` batch or a dry run's summary -- since
    a real run that crashed early may have written nothing but ``rejected`` records.
    """
    if not reads_as_report(path):
        return False
    planned = text = False
    try:
        with path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                text = True
                try:
                    record = _KIND.decode(line)
                except (msgspec.ValidationError, msgspec.DecodeError, UnicodeError):
                    continue  # a torn line of an interrupted dry run
                if record.kind == "skipped" or (record.kind == "batch" and
                                                record.status != "planned"):  # fmt: skip
                    return False
                if record.kind == "summary" and not record.dry_run:
                    return False
                if record.kind == "revoked" and not record.planned:
                    return False  # a run took access away: its record is kept
                planned = planned or record.kind in ("batch", "summary", "revoked")
    except OSError:
        return False
    return planned or not text  # a blank file holds nothing to lose
