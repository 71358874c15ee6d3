"""What the command line says: the command list, help layout, shared options, messages.

Every command has a description and examples; every option says what it does, its default
(added here, from the option itself, so the two cannot disagree) and an example.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import textwrap
from typing import Any, NoReturn

from worker.errors import UsageError
from worker.exits import EXIT_USAGE
from worker.logs import LEVELS, choose_level
from worker.start import json_stderr as json_stderr
from worker.start import say as say

#: Every command and its one-line description (``invite-worker`` alone lists them).
COMMANDS = {
    "run": "send the invitations listed in a CSV or JSONL file, or queued in a Redis Stream",
    "enqueue": "load a CSV or JSONL file into a Redis Stream",
    "dead-letter": "list a stream's dead letters, or put fixed ones back on the stream",
    "report": "read a report: summarize it, or list what failed",
    "emulator": "serve the Datadog API emulator for rehearsals",
}

LOG_FORMATS = ("auto", "json", "console")


def commands_overview() -> str:
    """What ``invite-worker`` alone prints: each command on one line."""
    lines = ["usage: invite-worker COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    lines += ["", "'invite-worker COMMAND --help' shows a command's options and examples; "
              "'invite-worker --version' the version."]  # fmt: skip
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default appended to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, "", [], argparse.SUPPRESS) and action.nargs != 0
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are JSON lines when stderr is in JSON mode."""

    def error(self, message: str) -> NoReturn:
        """One line naming the mistake and where the options are: no usage dump."""
        message = _negative_value(message, sys.argv[1:]) or message
        if json_stderr(sys.argv[1:]):
            say("cli.usage_error", f"{self.prog}: {message}", json_lines=True)
            raise SystemExit(EXIT_USAGE)
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _negative_value(message: str, argv: list[str]) -> str | None:
    """argparse takes ``--resend-after -1d`` for an option missing its value (``-1d``
    looks like an option): say what was given instead."""
    missing = re.fullmatch(r"argument (\S+): expected one argument", message)
    if missing is None:
        return None
    names = missing.group(1).split("/")
    for option, value in itertools.pairwise(argv):
        if option in names and re.match(r"-\.?\d", value):
            example = f"{option} {value.lstrip('-')}"
            return f"argument {missing.group(1)}: {value!r} is negative; use e.g. {example}"
    return None


def command(sub: Any, name: str, description: str, examples: str, **extra: Any) -> Parser:
    """A subcommand parser with its description and an ``examples:`` section."""
    # Paragraphs filled to a terminal's width; the examples are kept as written.
    text = "\n\n".join(textwrap.fill(" ".join(p.split()), 88) for p in description.split("\n\n"))
    parser: Parser = sub.add_parser(
        name, help=extra.pop("help", None) or COMMANDS.get(name), description=text,
        epilog="examples:\n" + examples.strip("\n"), formatter_class=HelpFormatter, **extra,
    )  # fmt: skip
    return parser


def add_log_format(p: argparse._ActionsContainer) -> None:
    """``--log-format``, which every command that logs takes."""
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="auto: readable lines on a terminal, JSON lines otherwise (all on stderr); "
        "e.g. --log-format json for a log shipper",
    )
    how_much = p.add_mutually_exclusive_group()
    how_much.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show info events too, such as one line per batch (by default a run on a "
        "terminal shows only warnings and errors; JSON lines show info events anyway)",
    )
    how_much.add_argument(
        "-q", "--quiet", action="store_true", help="show only errors and the end summary"
    )
    how_much.add_argument(
        "--log-level",
        choices=tuple(LEVELS),
        default=None,
        metavar="LEVEL",
        help="show events from LEVEL up: debug, info, warning or error (the summary is "
        "always shown); e.g. --log-level warning",
    )


def log_level(args: argparse.Namespace, *, watched: bool = False) -> int:
    """The level ``-v``/``-q``/``--log-level`` ask for; ``watched``: a run's bar is shown."""
    return choose_level(watched=watched, verbose=args.verbose, quiet=args.quiet,
                        log_level=args.log_level)  # fmt: skip


def add_column_options(p: argparse._ActionsContainer) -> None:
    """``--token-column`` and ``--email-column``, for ``run`` and ``enqueue``."""
    p.add_argument(
        "--token-column",
        default="token",
        metavar="NAME",
        help="the CSV column (any case) or JSONL field holding the token; "
        "e.g. --token-column dashboard_token",
    )
    p.add_argument(
        "--email-column",
        default="email",
        metavar="NAME",
        help="the CSV column (any case) or JSONL field holding the address; "
        "e.g. --email-column user_email",
    )


def add_format(p: argparse._ActionsContainer) -> None:
    """``--format``, for a file whose name does not say it."""
    p.add_argument(
        "--format",
        choices=("csv", "jsonl"),
        help="the input's format when its name does not end in .csv or .jsonl (stdin, "
        "for one); e.g. --format jsonl",
    )


def columns_of(args: argparse.Namespace) -> tuple[str, str]:
    """The token and email column (or field) names, checked: ``--token-column`` and co."""
    token, email = args.token_column.strip(), args.email_column.strip()
    if not token or not email:
        raise UsageError("--token-column and --email-column must not be empty")
    if token.lower() == email.lower():
        raise UsageError(f"--token-column and --email-column both name {token!r}")
    return token, email
