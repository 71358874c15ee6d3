"""The write-ahead journal: what was about to be sent, made durable before it is sent.

It lives beside the report (``<report>.journal``) and holds two kinds of line:

- ``{"i": ID, "token": T, "emails": [...], "at": EPOCH, "t": SECONDS}`` — an *intent*,
  written and ``fdatasync``\\ ed before request ``ID`` goes out, with the time it was sent
  and the ``--timeout`` it was sent with (so a later run knows until when it could still
  be in progress; journals written before ``t`` existed lack it);
- ``{"c": ID}`` — a *clear*: the intent is resolved, because the service answered that it
  created nothing (4xx, 429, no connection), or because the outcome was settled by listing
  the token's invitations and recorded in the report.

A 2xx needs no clear: the report's ``sent`` record settles those pairs. So after any crash
an intent that is neither cleared nor covered by a ``sent`` record is an *unknown* outcome,
and ``--resume`` lists the token's invitations before sending those pairs again.

A run that ends with nothing open (see :func:`empty_journal`) empties the journal once
the report is durable: otherwise a daily job continuing one report with ``--resume`` would
read every intent of every earlier day, each already settled by the report.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from msgspec import UNSET

from worker.errors import UsageError
from worker.record.files import AppendFile, read_records
from worker.record.records import JOURNAL_LINE, JournalLine, encode

log = structlog.get_logger("worker.journal")


def journal_path(report_path: Path) -> Path:
    """Where the journal of a report lives: beside the real file when the report is given
    by a symbolic link (as its lock is), so that every name of a report finds the same
    unsettled sends."""
    if report_path.is_symlink():
        report_path = report_path.resolve()
    return report_path.with_name(report_path.name + ".journal")


class Claimed(Exception):
    """Some of a request's emails are no longer this worker's to send: another claimed
    their messages (it was stalled past ``--claim-idle``), or their entries were trimmed
    from the stream meanwhile (``trimmed``: whether another sent them cannot be told).
    ``ident`` is the intent of the rest, recorded; the request goes without them."""

    def __init__(self, ident: str, emails: list[str], trimmed: list[str]) -> None:
        super().__init__(f"{len(emails)} email(s) claimed by another worker")
        self.ident, self.emails, self.trimmed = ident, emails, trimmed


class IntentLog(Protocol):
    """Where the sender records what it is about to send, before it sends it."""

    async def intent(
        self, token: str, emails: list[str], at: float, request_timeout: float | None = None
    ) -> str:
        """Durably record the intent (sent at ``at``, ``request_timeout`` the longest it may
        take); returns its id. Raises :class:`Claimed` when some emails are not to be sent."""
        ...

    def clear(self, ident: str) -> None:
        """The intent is resolved (its outcome is recorded)."""
        ...

    def answered(self, ident: str) -> None:
        """The request created nothing (the service said so, or a listing made after it
        could no longer be in progress found nothing): nothing is left to settle."""
        ...


@dataclass(frozen=True, slots=True)
class Intent:
    """A request that was (about to be) sent."""

    id: str
    token: str
    emails: list[str]
    at: float
    #: The request timeout it was sent with; None: not recorded (an older journal).
    timeout: float | None = None

    def in_progress_until(self, timeout: float, delay: float) -> float:
        """When a request sent at ``at`` can no longer be in progress: its send time, its
        timeout (``timeout`` when none was recorded) and ``delay`` for the service to
        finish what it was doing (the reconcile delay)."""
        return self.at + (self.timeout if self.timeout is not None else timeout) + delay


class Journal:
    """Appends intents and clears; intents are durable before :meth:`intent` returns."""

    def __init__(self, path: Path, *, durable: bool = True, truncate: bool = False) -> None:
        self.path = path
        try:
            self._file = AppendFile(path, truncate=truncate)
        except OSError as exc:
            raise UsageError(f"cannot write the journal {str(path)!r}: {exc.strerror}") from None
        self._durable = durable
        self._run = secrets.token_hex(4)
        self._seq = 0
        self._written = 0
        self._synced = 0
        self._syncing: asyncio.Future[None] | None = None

    async def intent(
        self, token: str, emails: list[str], at: float, request_timeout: float | None = None
    ) -> str:
        """Record that ``emails`` are about to be sent to ``token`` at ``at``, with
        ``request_timeout``; returns the intent id."""
        self._seq += 1
        ident = f"{self._run}-{self._seq}"
        t = UNSET if request_timeout is None else request_timeout
        self._write(JournalLine(i=ident, token=token, emails=emails, at=at, t=t))
        if self._durable:
            await self._sync(self._written)
        return ident

    def clear(self, ident: str) -> None:
        """Mark an intent resolved (no sync needed: losing a clear only costs a re-check)."""
        self._write(JournalLine(c=ident))

    def answered(self, ident: str) -> None:
        """The request created nothing: its intent is resolved."""
        self.clear(ident)

    def _write(self, record: JournalLine) -> None:
        self._file.write(encode(record) + b"\n")  # StorageError if it fails
        self._written += 1

    async def _sync(self, target: int) -> None:
        """Group commit: one fdatasync in a thread covers every line written before it."""
        while self._synced < target:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync_upto(self._written))
            await asyncio.shield(self._syncing)

    async def _sync_upto(self, upto: int) -> None:
        # The task itself publishes what it covered, before anyone awaiting it resumes;
        # otherwise a waiter could find the finished future and spin without yielding.
        try:
            await self._file.sync_off_loop()
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()


def read_journal(
    path: Path, pending: Callable[[Intent], Intent | None] | None = None
) -> dict[str, Intent]:
    """Every intent of a journal that was never cleared (an absent journal has none).

    ``pending`` sees each intent as it is read and returns what is still open of it (or
    None): a journal keeps the intents of every sent batch, so a long job's journal holds
    millions of addresses, and only the few still open should be held in memory.
    """
    intents: dict[str, Intent] = {}
    # A line cut short by a crash is skipped: that intent was never acted on.
    for line in read_records(path, JOURNAL_LINE, missing_ok=True, check=_readable):
        if isinstance(line.c, str):
            intents.pop(line.c, None)
            continue
        timeout = float(line.t) if isinstance(line.t, int | float) else None
        intent = Intent(str(line.i), str(line.token), list(line.emails or ()),
                        float(line.at or 0), timeout)  # fmt: skip
        still_open = pending(intent) if pending is not None else intent
        if still_open is not None:
            intents[intent.id] = still_open
    return intents


def _readable(line: JournalLine) -> bool:
    return line.is_clear() or line.is_intent()


async def empty_journal(report: Path, journal: Path) -> bool:
    """Make ``report`` durable, then empty ``journal``; whether it was emptied.

    Only for a run that left nothing open: every request it made has its outcome in the
    report, and nothing an earlier run left unknown is unknown still. The report is
    synced first, so no power loss can keep the emptied journal and lose the records
    that settle its intents. A failure keeps the journal: the next ``--resume`` reads it
    as before, only slower.
    """

    def sync_then_empty() -> None:
        fd = os.open(report, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(journal, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        await asyncio.to_thread(sync_then_empty)
    except OSError as exc:
        log.warning("journal.kept", path=str(journal), cause=exc.strerror,
                    consequence="the next --resume reads it again; nothing is lost")  # fmt: skip
        return False
    return True
