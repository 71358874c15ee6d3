"""The ``invite-worker`` command's entry point: signals are held while the command loads.

The command's modules take a good part of a second to import. A SIGTERM meanwhile (a
CronJob's pod deleted as it starts) would kill it with no line, and a Ctrl-C would print
a traceback. So SIGTERM and SIGINT are blocked until everything is loaded: one that came
meanwhile is then taken as an interrupt (exit 3, one line), and once the command runs it
hears them itself. This module loads nothing of the command's, and holds the one-line
messages every command prints.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType

#: The exit code of a stop (worker.exits.EXIT_ABORTED; this module loads nothing else).
_STOPPED = 3


def json_stderr(argv: Sequence[str]) -> bool:
    """Whether stderr carries JSON lines for this command line (``--log-format``, or auto)."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--log-format" and i + 1 < len(args):
            return args[i + 1] == "json" or (args[i + 1] == "auto" and not sys.stderr.isatty())
        if arg.startswith("--log-format="):
            value = arg.split("=", 1)[1]
            return value == "json" or (value == "auto" and not sys.stderr.isatty())
    logging = ("run", "enqueue", "emulator", "dead-letter", "report")
    return bool(args) and args[0] in logging and not sys.stderr.isatty()


def say(event: str, message: str, *, json_lines: bool, level: str = "error") -> None:
    """One message on stderr: a JSON line in JSON mode, plain text otherwise."""
    if json_lines:
        line = {"event": event, "level": level, "message": message,
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}  # fmt: skip
        print(json.dumps(line), file=sys.stderr)
    else:
        print(f"invite-worker: {message}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the command; a SIGTERM or Ctrl-C before it starts is exit 3 with a line."""
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        try:
            from worker.cli import main as command
        finally:
            # Before the command sets its own: SIGTERM as Ctrl-C is (an interrupt). One
            # held meanwhile is delivered as the mask is lifted, raised from here.
            signal.signal(signal.SIGTERM, _interrupt)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        code = command()
        # Done: held again, so that one coming as the interpreter shuts down (which puts
        # the default handlers back) does not kill the process and change the exit code
        # the command's summary gave.
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except KeyboardInterrupt:  # (once a command runs, it says so itself)
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        done = getattr(sys.modules.get("worker.cli.signals"), "finished_code", None)
        finished: int | None = done() if done is not None else None
        if finished is not None:  # heard as the command returned: its result stands
            return finished
        say("cli.interrupted", "interrupted before it started: nothing was done; run the "
            "same command again", json_lines=json_stderr(sys.argv[1:]))  # fmt: skip
        code = _STOPPED
    return code
