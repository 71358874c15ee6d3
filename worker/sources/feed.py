"""Reading an input's bytes so that stopping never waits for the writer.

A pipe, a FIFO or a terminal can stay silent for ever. Reading one through a buffered file
object holds that object's lock while it waits, and closing the object takes the same
lock: a stop would then hang on whoever feeds the input. Here the descriptor itself is
read, only once ``poll`` says there is something to read (or an end), and ``close`` wakes
that wait. No lock is held across a wait, so ``close`` returns at once from any thread.

Reads that may wait happen in a daemon thread per read (:func:`in_thread`), not in the
event loop's executor: a read still waiting when the run ends is left behind instead of
being joined at exit. A regular file is read on the loop: a disk that stalls (a network
mount) stalls the run with it, and a second SIGTERM still exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

T = TypeVar("T")


class InputClosed(OSError):
    """The input was closed while (or before) it was read: the read has no data to give."""


class Feed:
    """Blocks of bytes from a stream; :meth:`close` never waits for a read in progress.

    A stream with a file descriptor is read with ``os.read`` on it (the stream object is
    only closed at the end); one without (``io.BytesIO`` in tests) never waits and is read
    as it is.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        try:
            fd: int | None = stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
        self._fd = fd
        self._lock = threading.Lock()  # held only to change the state below, never to wait
        self._reading = False
        self._closed = False
        self._released = False
        # Anything but a regular file may keep us waiting: wait in poll, with a pipe that
        # close() writes to, to be woken.
        self._wake: tuple[int, int] | None = None
        self._poll: select.poll | None = None
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            self._wake = os.pipe()
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
            self._poll.register(self._wake[0], select.POLLIN)

    @property
    def may_wait(self) -> bool:
        """Whether a read can wait on a writer (a pipe, a FIFO, a terminal, a socket).

        A regular file (or an in-memory stream) always has its bytes, or its end, at hand.
        """
        return self._poll is not None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, as soon as any are there; ``b""`` at the end of the input.

        Raises :class:`InputClosed` if :meth:`close` was called before or during the wait.
        """
        with self._lock:
            if self._closed:
                raise InputClosed("the input is closed")
            self._reading = True
        try:
            if self._fd is None:
                return self._stream.read(size)
            return self._read_fd(self._fd, size)
        finally:
            self._done_reading()

    def _done_reading(self) -> None:
        with self._lock:
            self._reading = False
            if self._closed:  # by close() in another thread, meanwhile
                self._release()

    def _read_fd(self, fd: int, size: int) -> bytes:
        while True:
            if self._poll is not None:
                ready = {ready_fd for ready_fd, _ in self._poll.poll()}
                if self._wake is not None and self._wake[0] in ready:
                    raise InputClosed("the input was closed while it was read")
            try:
                return os.read(fd, size)
            except BlockingIOError:  # a descriptor left non-blocking by whoever passed it
                if self._poll is None:
                    raise

    def close(self) -> None:
        """Release the input (idempotent); wakes a read that is waiting, without waiting."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._wake is not None:
                os.write(self._wake[1], b"\0")
            if not self._reading:
                self._release()
            # Otherwise the read in progress releases it as it returns: closing the
            # descriptor under it could hand its number to another file before it reads.

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._wake is not None:
            os.close(self._wake[0])
            os.close(self._wake[1])
        self._stream.close()


async def in_thread(work: Callable[[], T]) -> T:
    """``work()`` in a daemon thread of its own; its result, or its exception.

    If the caller is cancelled, the thread is left to finish (or to be woken by a
    :meth:`Feed.close`) on its own, and the process can exit without it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():
            return  # the caller was cancelled: nobody wants it
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)

    def run() -> None:
        try:
            result: tuple[bool, object] = (True, work())
        except StopIteration as exc:  # a future cannot hold one
            error = RuntimeError(f"StopIteration in {work!r}")
            error.__cause__ = exc
            result = (False, error)
        except BaseException as exc:  # handed to the caller, whatever it is
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name="invite-worker-read", daemon=True).start()
    return await future
