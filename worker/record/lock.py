"""One run per report: an exclusive lock held for the whole run.

Two runs on one report and journal would each read the other's intents as their own and
send the same pairs twice. So before a run reads or writes either file it takes an
exclusive ``flock(2)`` on ``<report>.lock``, non-blocking: a second run fails at once and
says who holds it. It locks the report file itself as well: a hard link reaches the same
file by another name, with a ``.lock`` of its own. The kernel drops the locks when the
holder's process ends, however it ends (SIGKILL, OOM), so a crash never leaves a stale
lock behind.

The lock file stays after the run: removing it would let a process that opened the old
file lock it while a third locks a new one.

On NFS, Linux maps ``flock`` onto the server's byte-range locks (NFSv4, or NLM for v3), so
runs on different clients exclude each other as long as locking works there; a mount with
``nolock`` or ``local_lock=flock`` keeps locks on one host only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from worker.errors import ReportLocked, UsageError

PRIVATE_MODE = 0o600


def lock_path(report_path: Path) -> Path:
    """Where the lock of a report lives: beside the real file, symbolic links resolved."""
    real = report_path.resolve()
    return real.with_name(real.name + ".lock")


class ReportLock:
    """An exclusive, non-blocking lock on a report; use :func:`hold_report`."""

    def __init__(self, report_path: Path) -> None:
        self.report_path = report_path
        self.path = lock_path(report_path)
        self._fd = -1
        self._file_fd = -1  # the report file's own lock, see _lock_the_file

    def acquire(self) -> None:
        """Take the lock or raise :class:`ReportLocked` naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
        except OSError as exc:
            elsewhere = Path(tempfile.gettempdir()) / self.report_path.name
            raise UsageError(
                f"cannot write in {str(self.path.parent)!r} ({exc.strerror}): the report, "
                "its journal and its lock go there. Choose a writable folder, e.g. "
                f"--report {str(elsewhere)!r}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ReportLocked(
                f"the report {str(self.report_path)!r} is in use by another run ({holder}). "
                "Two runs on one report would invite people twice: wait for that run to end, "
                "or stop it, then start this one again (with --resume to continue it)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise UsageError(
                f"cannot lock {str(self.path)!r}: {exc.strerror}. The filesystem does not "
                "support locks (NFS mounted with 'nolock'?); put the report on one that does"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self._fd = fd
        self._lock_the_file()

    def _lock_the_file(self) -> None:
        """Lock the report file itself too: a hard link is the same file under another
        name, whose ``.lock`` beside it another run would take. A report not there yet is
        made (empty, as the run would make it), so a link made to it later is locked too."""
        try:
            fd = os.open(self.report_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            try:
                fd = os.open(self.report_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             PRIVATE_MODE)  # fmt: skip
            except OSError:
                return  # the run says what is wrong with the path when it writes there
        except OSError:
            return  # unreadable: said later
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: refused elsewhere
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.release()
            raise ReportLocked(
                f"the report {str(self.report_path)!r} is in use by another run under another "
                "name (a hard link to the same file). Two runs on one report would invite "
                "people twice: wait for that run to end, or stop it, then start this one again"
            ) from None
        except OSError:
            os.close(fd)
            return  # no locks on this filesystem: the lock file was taken, which must do
        self._file_fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays, see the module notes."""
        for name in ("_file_fd", "_fd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: pid, host and since when."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(info['pid'])} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting"


@contextlib.contextmanager
def hold_report(report_path: Path) -> Iterator[ReportLock]:
    """Hold the report's lock for the duration of the block."""
    lock = ReportLock(report_path)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
