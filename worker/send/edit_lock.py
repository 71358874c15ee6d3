"""Edits of a shared dashboard one at a time across the runs of one machine.

``--add-invitees`` and ``--prune`` read a dashboard and write it back changed. The API
has no version field or ETag, so of two runs editing one dashboard at once, the one
writing from an older read takes the other's new entries away unseen (a queue's workers
take turns through Redis, see ``worker.queue.edits``). Runs over files on one machine
share a file system, so each edit of a dashboard holds an ``flock`` on a file of its
own: ``invite-worker-<uid>/<hash of the API origin and token>.lock`` in the temporary
directory, created private (0700, 0600) and refused if it is not the user's own. The
kernel drops the lock when its holder ends, even by ``kill -9``, so nobody is held up by
a dead run; a stopped holder (SIGSTOP) holds the others up until it goes on, and they
say so once a wait passes :data:`SAY_AFTER`.

Runs on other machines, and people editing by hand, are not held back by it: the checks
of ``worker.send.invitees`` and the look at a run's end (``worker.send.recheck``) are
what stand between them. Where the directory cannot be used (a read-only file system),
edits go on without the lock, said once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from worker.clock import Clock
from worker.errors import Stopped

log = structlog.get_logger("worker.invitees")

#: How often a run waiting for another's edit tries the lock again, in seconds.
POLL = 0.02
#: A wait longer than this is said (once per edit), in seconds.
SAY_AFTER = 10.0


def default_directory() -> Path:
    """Where the locks of this user's runs live: ``invite-worker-<uid>`` in the
    temporary directory (``TMPDIR``)."""
    return Path(tempfile.gettempdir()) / f"invite-worker-{os.getuid()}"


class LocalEdits:
    """Per dashboard, a lock held around each edit (see the module's docstring)."""

    def __init__(self, api_url: str, stop: asyncio.Event, clock: Clock,
                 directory: Path | None = None) -> None:  # fmt: skip
        # The origin, as every spelling of it names one lock (never the user-info, which
        # may hold secrets).
        parts = urlsplit(api_url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        self._origin = f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
        self._stop, self._clock = stop, clock
        self._dir = directory or default_directory()
        self._usable: bool | None = None  # None: not tried yet
        self._said = False  # whether a lock that could not be had was said

    @contextlib.asynccontextmanager
    async def hold(self, token: str) -> AsyncIterator[None]:
        """Hold ``token``'s lock for the block (or nothing, where locks cannot be had)."""
        fd = self._open(token)
        if fd is None:
            yield
            return
        try:
            await self._take(fd, token)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _take(self, fd: int, token: str) -> None:
        started, said = self._clock.time(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:  # who holds it, for whoever waits (the file is this user's alone)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
                return
            if self._stop.is_set():
                raise Stopped("stopping: another run was editing the dashboard")
            if not said and self._clock.time() - started >= SAY_AFTER:
                said = True
                holder = os.pread(fd, 200, 0).decode(errors="replace") or "another run"
                log.warning("invitees.edit_waiting", token=token, holder=holder,
                            action="waiting for that run on this machine to finish its edit "
                            "of the dashboard (a stopped one holds it until it goes on or "
                            "ends)")  # fmt: skip
            await asyncio.sleep(POLL)

    def _open(self, token: str) -> int | None:
        """The lock file of ``token``, opened; None where locks cannot be had."""
        if self._usable is False:
            return None
        # One dashboard, however the token's letters are cased.
        name = hashlib.sha256(f"{self._origin}\n{token.lower()}".encode()).hexdigest()[:32]
        try:
            if self._usable is None:
                self._dir.mkdir(mode=0o700, exist_ok=True)
                info = os.lstat(self._dir)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                    raise OSError(errno.EPERM, "not a directory of this user's own")
                if info.st_mode & 0o077:  # made open by hand: private again
                    os.chmod(self._dir, 0o700)
                self._usable = True
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(self._dir / f"{name}.lock", flags, 0o600)
        except OSError as exc:
            # The directory is unusable for the run; a file (a symlink planted, no file
            # descriptor left) only for this edit. Said once either way.
            if self._usable is None:
                self._usable = False
            if not self._said:
                self._said = True
                log.warning("invitees.edit_lock_unavailable", directory=str(self._dir),
                            error=exc.strerror or str(exc),
                            consequence="dashboard edits go on without the lock between "
                            "runs of this machine")  # fmt: skip
            return None
