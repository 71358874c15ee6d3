"""The ``invite-worker`` argument parser, and messages that respect the log format."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from worker import __version__
from worker.cli.stream_and_emulator import COMMANDS, add_emulator_parser, add_stream_options
from worker.config import DEFAULT_SITE
from worker.exits import EXIT_USAGE


def json_stderr(argv: Sequence[str]) -> bool:
    """Whether stderr carries JSON lines for this command line (``--log-format``, or auto)."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--log-format" and i + 1 < len(args):
            return args[i + 1] == "json" or (args[i + 1] == "auto" and not sys.stderr.isatty())
        if arg.startswith("--log-format="):
            value = arg.split("=", 1)[1]
            return value == "json" or (value == "auto" and not sys.stderr.isatty())
    return bool(args) and args[0] in ("run", "enqueue", "emulator") and not sys.stderr.isatty()


def say(event: str, message: str, *, json_lines: bool, level: str = "error") -> None:
    """One message on stderr: a JSON line in JSON mode, plain text otherwise."""
    if json_lines:
        line = {"event": event, "level": level, "message": message,
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}  # fmt: skip
        print(json.dumps(line), file=sys.stderr)
    else:
        print(f"invite-worker: {message}", file=sys.stderr)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90m``, ``12h``, ``7d`` (or plain seconds) as seconds."""
    value, unit = text.strip(), "s"
    if value and value[-1].lower() in _UNITS:
        value, unit = value[:-1], value[-1].lower()
    try:
        seconds = float(value) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 90m, 12h, 7d)"
        ) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return seconds


def add_column_options(p: argparse.ArgumentParser) -> None:
    """``--token-column`` and ``--email-column``, for ``run`` and ``enqueue``."""
    p.add_argument(
        "--token-column",
        default="token",
        metavar="NAME",
        help="the CSV column (any case) or JSONL field holding the token (default: token), "
        "e.g. --token-column dashboard_token",
    )
    p.add_argument(
        "--email-column",
        default="email",
        metavar="NAME",
        help="the CSV column (any case) or JSONL field holding the address (default: email), "
        "e.g. --email-column user_email",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are JSON lines when stderr is in JSON mode."""

    def error(self, message: str) -> NoReturn:
        if json_stderr(sys.argv[1:]):
            say("cli.usage_error", f"{self.prog}: {message}", json_lines=True)
            raise SystemExit(EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the README's option table and tests)."""
    parser = _Parser(
        prog="invite-worker",
        description="Send Datadog shared-dashboard invitations in bulk.",
    )
    parser.add_argument("--version", action="version", version=f"invite-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help=COMMANDS["run"])
    r.add_argument(
        "source",
        metavar="SOURCE",
        help="a .csv or .jsonl path, - for stdin, or redis://HOST:PORT/DB (with --stream)",
    )
    r.add_argument("--format", choices=("csv", "jsonl"), help="override the input format")
    add_column_options(r)
    r.add_argument(
        "--report",
        type=Path,
        default=None,
        help="the JSONL report (default: invite-report.jsonl; for a --dry-run, "
        "invite-report.plan.jsonl, so the plan never blocks the run that follows)",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing report instead of refusing to start",
    )
    r.add_argument(
        "--site",
        default=os.environ.get("DD_SITE") or DEFAULT_SITE,
        help="Datadog site (env DD_SITE, default datadoghq.com)",
    )
    r.add_argument(
        "--api-url",
        default=os.environ.get("DD_API_URL") or None,
        help="base URL override (env DD_API_URL): a proxy or an emulator",
    )
    r.add_argument(
        "--api-key-file",
        type=Path,
        help="read the API key from this file (also env DD_API_KEY_FILE; else DD_API_KEY)",
    )
    r.add_argument(
        "--app-key-file",
        type=Path,
        help="read the application key from this file (env DD_APP_KEY_FILE; else DD_APP_KEY)",
    )
    r.add_argument("--batch-size", type=int, default=100, help="emails per request (100)")
    r.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    r.add_argument(
        "--rate",
        type=float,
        default=None,
        help="cap in requests per second (default: only the server's limits)",
    )
    r.add_argument(
        "--max-attempts", type=int, default=5, help="attempts per batch for retryable failures (5)"
    )
    r.add_argument(
        "--timeout", type=float, default=30.0, help="per-request timeout in seconds (30)"
    )
    r.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="the longest single wait for the rate limit, in seconds, whatever the "
        "service's headers say (60)",
    )
    r.add_argument(
        "--resend",
        action="store_true",
        help="send to everyone, even those the service lists as already invited or in a "
        "session (default: skip them)",
    )
    r.add_argument(
        "--resend-after",
        type=duration,
        default=None,
        metavar="DURATION",
        help="invite again those whose last invitation is older than this (90m, 12h, 7d) and "
        "who have no open session",
    )
    r.add_argument(
        "--add-invitees",
        action="store_true",
        help="add addresses the dashboard does not allow to its invitees first (read, merge, "
        "write, read back; nothing existing is removed or changed), then invite them",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --report: skip what was sent, check unknown "
        "outcomes, send the rest",
    )
    r.add_argument(
        "--fsync",
        action="store_true",
        help="fdatasync each journal intent before its request: survive power loss too, "
        "at one sync per request",
    )
    r.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish (20)",
    )
    r.add_argument(
        "--reconcile-delay",
        type=float,
        default=5.0,
        help="after an unknown outcome, seconds to wait before listing what the service "
        "created (5)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="read, validate and batch everything, send nothing, print the plan",
    )
    r.add_argument(
        "--preflight",
        action="store_true",
        help="with --dry-run: read each dashboard and list its invitations (GETs only; keys "
        "needed) and say per token what would be sent, skipped and refused",
    )
    r.add_argument(
        "--assume-limit",
        metavar="L/P",
        help="for the dry run's estimate: L requests per P-second window, e.g. 25/1",
    )
    r.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress events when no progress bar is shown (10)",
    )
    r.add_argument(
        "--statsd",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="send metrics to the Datadog Agent's DogStatsD: HOST:PORT, udp://HOST:PORT or "
        "unix:///path (alone: the Agent's environment, else 127.0.0.1:8125). On by itself "
        "when DD_DOGSTATSD_URL or DD_AGENT_HOST is set; e.g. --statsd datadog-agent:8125",
    )
    r.add_argument(
        "--no-statsd",
        dest="statsd",
        action="store_const",
        const="off",
        help="send no metrics, even if DD_DOGSTATSD_URL or DD_AGENT_HOST is set",
    )
    r.add_argument(
        "--sandbox",
        action="store_true",
        help="run against the built-in emulator; no keys needed, nothing is emailed",
    )
    r.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: console on a terminal, JSON lines otherwise",
    )

    add_stream_options(r)

    n = sub.add_parser("enqueue", help=COMMANDS["enqueue"])
    n.add_argument(
        "file",
        metavar="FILE",
        help="a .csv or .jsonl path, or - for stdin",
    )
    n.add_argument("url", metavar="URL", help="redis://HOST:PORT/DB")
    n.add_argument("--stream", required=True, help="the stream to add to")
    n.add_argument("--format", choices=("csv", "jsonl"), help="override the input format")
    add_column_options(n)
    n.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")

    rp = sub.add_parser("report", help=COMMANDS["report"])
    rsub = rp.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    rs = rsub.add_parser("summarize", help="totals, failures by code and token, rejections")
    rs.add_argument("report", metavar="REPORT", type=Path)
    rs.add_argument("--json", action="store_true", help="print one JSON object")
    rf = rsub.add_parser("failed", help="CSV (token,email) of every email that failed")
    rf.add_argument("report", metavar="REPORT", type=Path)
    rf.add_argument("--output", type=Path, help="write the CSV here (default: stdout)")
    rf.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    rf.add_argument(
        "--include-refused",
        action="store_true",
        help="also list emails the dashboard check refused (not on the share list, no "
        "dashboard, paused, not invite-only): a re-run fails them again until it changes",
    )

    add_emulator_parser(sub)
    return parser
