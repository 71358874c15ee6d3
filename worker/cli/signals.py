"""SIGTERM and SIGINT during ``run`` (and ``enqueue``, ``dead-letter``), heard by a thread
of their own.

The event loop cannot be relied on to hear a signal: a callback that blocks keeps it from
running, and every handler it would run with it. So the interpreter's C-level handler only
writes the signal's number to a pipe (``signal.set_wakeup_fd``, whichever thread the
kernel picked), and a daemon thread reading that pipe acts on it:

- before the run has started (the input is being opened, its header waited for): exit 3
  at once; nothing was sent, and nothing is lost;
- the first signal of a run: ``stop`` is set on the loop: reading stops, batches not yet
  sent are left for ``--resume``, in-flight requests get ``--grace`` seconds;
- a second signal: exit 3 at once, from that thread, whatever the loop is doing. The
  journal lets ``--resume`` settle everything. A run that is already stopping on its own
  (a halt, refused keys) takes the first signal as a first one: it keeps its grace.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import NoReturn

import structlog

from worker.exits import EXIT_ABORTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CLOSE = 0  # not a signal number: tells the listening thread to end

_current: StopSignals | None = None
#: The exit code of the command last done under :class:`StopSignals` (see :func:`finish`).
_finished: int | None = None


def finish(code: int) -> int:
    """The command is done, with ``code`` (returned): a signal heard from now on, as the
    handlers are put back and the loop closes, leaves it as it is (the summary already
    holds it), rather than turning it into exit 3 "interrupted"."""
    global _finished
    _finished = code
    return code


def finished_code() -> int | None:
    """The code given to :func:`finish` since :func:`forget_finished` (a command's start)."""
    return _finished


def forget_finished() -> None:
    """A command starts: no code is recorded for it yet."""
    global _finished
    _finished = None


def current() -> StopSignals:
    """The :class:`StopSignals` installed now (the CLI installs one around a run)."""
    if _current is None:
        raise RuntimeError("no StopSignals installed")
    return _current


class StopSignals:
    """While entered, SIGTERM/SIGINT are acted on as the module describes."""

    def __init__(self, *, json_lines: bool, early: str = "nothing was sent yet") -> None:
        self.json_lines = json_lines
        #: What a signal before :meth:`run_started` leaves, said as it exits at once.
        self.early = early
        #: Names of the signals that stopped the run, in order.
        self.received: list[str] = []
        self._stop: asyncio.Event | None = None
        self._again = ""
        self._stopping = False

    def run_started(self, stop: asyncio.Event, again: str) -> list[str]:
        """From now on the first signal sets ``stop``; ``again`` is the command that
        finishes the run, said if a second signal cuts it short. Returns :attr:`received`."""
        self._again, self._stop = again, stop
        return self.received

    def __enter__(self) -> StopSignals:
        global _current
        self._loop = asyncio.get_running_loop()
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)  # the C handler must never block on it
        # The pipe first: a signal between the two steps still meets the old handlers.
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _heard_by_thread) for sig in SIGNALS}
        self._thread = threading.Thread(
            target=self._listen, name="invite-worker-signals", daemon=True
        )
        self._thread.start()
        _current = self
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _current
        _current = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._pipe[1], bytes([_CLOSE]))
        self._thread.join(timeout=5)
        os.close(self._pipe[0])
        os.close(self._pipe[1])

    def _listen(self) -> None:
        while True:
            for number in os.read(self._pipe[0], 64):
                if number == _CLOSE:
                    return
                self._heard(signal.Signals(number).name)

    def _heard(self, name: str) -> None:
        stop = self._stop
        if stop is None:
            self._exit_now("run.stopped", f"{name}, stopping at once: {self.early}")
        # Only a signal heard before is a second one: a run that halted or was refused its
        # keys is already stopping, and the first SIGTERM (a scale-down, say) must still
        # leave it its grace, its last acknowledgements and its summary.
        if self._stopping:
            self._exit_now("run.exiting_now", "second signal, exiting now; nothing is lost. "
                           f"Finish with: {self._again}")  # fmt: skip
        self._stopping = True
        try:
            self._loop.call_soon_threadsafe(self._stop_run, name, stop)
        except RuntimeError:  # the loop has ended: there is nothing left to stop gently
            self._exit_now("run.exiting_now", f"{name}, exiting now")

    def _stop_run(self, name: str, stop: asyncio.Event) -> None:
        self.received.append(name)
        structlog.get_logger("worker.cli").warning("run.signal", signal=name)
        stop.set()

    def _exit_now(self, event: str, message: str) -> NoReturn:
        """Say why, straight to the descriptor (the loop thread may hold stderr's lock),
        and leave."""
        if self.json_lines:
            stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            line = json.dumps({"event": event, "level": "error", "message": message,
                               "timestamp": stamp})  # fmt: skip
        else:
            line = f"invite-worker: {message}"
        try:
            os.write(2, (line + "\n").encode())
        finally:
            os._exit(EXIT_ABORTED)


def _heard_by_thread(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do, the listening thread has the number."""
