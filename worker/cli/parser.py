"""The ``invite-worker`` argument parser: each command's options come from its module."""

from __future__ import annotations

import argparse

from worker import __version__
from worker.cli.deadletter import add_dead_letter_parser
from worker.cli.emulator import add_emulator_parser
from worker.cli.help import HelpFormatter, Parser, command
from worker.cli.queue import add_enqueue_parser, add_stream_options
from worker.cli.review import add_report_parser
from worker.cli.run_options import RUN_DESCRIPTION, RUN_EXAMPLES, add_run_options

EXAMPLES = """\
examples:
  invite-worker run invites.csv --sandbox          # rehearse against the built-in emulator
  invite-worker run invites.csv --report /data/report.jsonl
  invite-worker report summarize /data/report.jsonl
  invite-worker COMMAND --help                     # a command's options and examples"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the option table in docs/running.md and tests)."""
    parser = Parser(
        prog="invite-worker",
        description="Send Datadog shared-dashboard invitations in bulk: grouped per dashboard "
        "into list requests, paced to the rate limit, every outcome in a JSONL report.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"invite-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = command(sub, "run", RUN_DESCRIPTION, RUN_EXAMPLES)
    add_run_options(r)
    add_stream_options(r)
    add_enqueue_parser(sub)
    add_dead_letter_parser(sub)
    add_report_parser(sub)
    add_emulator_parser(sub)
    return parser
