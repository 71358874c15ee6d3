"""The ``invite-worker`` command line: one module per command, dispatched here."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Sequence

from worker.cli import signals
from worker.cli.commands import run_command
from worker.cli.deadletter import dead_letter_command
from worker.cli.emulator import emulator_command
from worker.cli.help import commands_overview, json_stderr, say
from worker.cli.parser import build_parser
from worker.cli.queue import enqueue_command
from worker.cli.review import report_command
from worker.errors import FatalError, UsageError
from worker.exits import EXIT_ABORTED, EXIT_USAGE

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    if not (sys.argv[1:] if argv is None else list(argv)):
        print(commands_overview())
        return EXIT_USAGE
    signals.forget_finished()
    args = build_parser().parse_args(argv)
    # A run allocates millions of short-lived rows and dicts; collecting every 700
    # allocations (the default) costs over 10% of its CPU. Collect far less often, and
    # leave everything imported so far out of the collector's walks.
    gc.set_threshold(50_000, 20, 20)
    gc.freeze()
    # numpy (the duplicate index) never multiplies a matrix here, but its OpenBLAS would
    # start a thread per core that spins for a while after start: measurable CPU for nothing.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        if args.command == "run":
            return asyncio.run(run_command(args))
        if args.command == "enqueue":
            return asyncio.run(enqueue_command(args))
        if args.command == "dead-letter":
            return asyncio.run(dead_letter_command(args))
        if args.command == "report":
            return report_command(args)
        return asyncio.run(emulator_command(args))
    except UsageError as exc:
        say("cli.usage_error", f"error: {exc}", json_lines=json_stderr(argv or sys.argv[1:]))
        return EXIT_USAGE
    except FatalError as exc:  # before a run started, or a command with no run (enqueue)
        say("cli.fatal", f"error: {exc}", json_lines=json_stderr(argv or sys.argv[1:]))
        return EXIT_ABORTED
    except KeyboardInterrupt:
        if (code := signals.finished_code()) is not None:
            return code  # heard once the command was done: its result stands
        say("cli.interrupted", "interrupted", json_lines=json_stderr(argv or sys.argv[1:]))
        return EXIT_ABORTED
    except BrokenPipeError:
        # The reader went away (``report failed ... | head``): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not fail on the closed pipe. A
        # command done before its last words (enqueue's summary) keeps its own code.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = signals.finished_code()
        return 0 if code is None else code
