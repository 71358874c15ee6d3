"""``invite-worker emulator``: the emulated Datadog API, served for rehearsals."""

from __future__ import annotations

import argparse
import asyncio
import errno
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from worker import logs
from worker.cli.help import add_log_format, command, log_level
from worker.errors import UsageError

#: The keys the sandbox (``run --sandbox``, and the emulator by default) expects.
SANDBOX_KEY = "sandbox"

EMULATOR_DESCRIPTION = """\
Serve an emulation of the shared-dashboard endpoints on this machine: invitations, the
shared dashboard object, rate-limit headers, and faults on demand. Point a run at it with
--api-url and DD_API_KEY=sandbox DD_APP_KEY=sandbox; nothing is ever emailed. Its counts
are at /_emulator/stats. SIGINT or SIGTERM stops it."""

EMULATOR_EXAMPLES = """\
  invite-worker emulator --port 8126 --limit 100 --period 60
  invite-worker emulator --error-rate 0.05 --drop-after-rate 0.02 --seed 7
  DD_API_KEY=sandbox DD_APP_KEY=sandbox invite-worker run invites.csv --api-url http://127.0.0.1:8126"""


def _port(text: str) -> int:
    """A TCP port number (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 0 to 65535")
    return port


def add_emulator_parser(sub: Any) -> None:
    """``invite-worker emulator``: serve the emulated API for rehearsals."""
    e = command(sub, "emulator", EMULATOR_DESCRIPTION, EMULATOR_EXAMPLES)
    e.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on; e.g. --host 0.0.0.0 inside a container",
    )
    e.add_argument("--port", type=_port, default=8126, help="the port; e.g. --port 9000")
    e.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="requests allowed per window (default: no limit); e.g. --limit 100",
    )
    e.add_argument(
        "--period",
        type=float,
        default=10.0,
        metavar="S",
        help="the rate-limit window, in seconds; e.g. --period 60",
    )
    e.add_argument(
        "--api-key",
        default=SANDBOX_KEY,
        metavar="KEY",
        help="the DD-API-KEY it accepts; e.g. --api-key rehearsal-key",
    )
    e.add_argument(
        "--app-key",
        default=SANDBOX_KEY,
        metavar="KEY",
        help="the DD-APPLICATION-KEY it accepts; e.g. --app-key rehearsal-app",
    )
    rates = e.add_argument_group("faults (shares of invitation POSTs, 0 to 1 in all)")
    for flag, what, example in (
        ("--error-rate", "answered 503 before anything is created", "0.05"),
        ("--drop-rate", "whose connection drops before anything is created", "0.02"),
        ("--slow-rate", "answered only after --slow-seconds", "0.1"),
        ("--error-after-rate", "answered 502 after the invitations were created", "0.02"),
        ("--drop-after-rate", "whose connection drops after the invitations were created", "0.02"),
        (
            "--session-rate",
            "of new invitations whose link is opened at once (a session starts)",
            "0.5",
        ),
    ):
        rates.add_argument(
            flag,
            type=float,
            default=0.0,
            metavar="SHARE",
            help=f"the share {what}; e.g. {flag} {example}",
        )
    rates.add_argument(
        "--slow-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="how late a slow answer comes; e.g. --slow-seconds 40",
    )
    rates.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="answer 400, naming no address, to lists longer than this "
        "(default: any length); e.g. --max-batch 50",
    )
    rates.add_argument(
        "--max-page-size",
        type=int,
        default=100,
        metavar="N",
        help="serve at most N invitations per listed page, whatever page_size asks "
        "(default 100); e.g. --max-page-size 50",
    )
    rates.add_argument(
        "--unnamed-refusals",
        action="store_true",
        help="a 400 for addresses off the share list does not name them",
    )
    rates.add_argument(
        "--ratelimit-headers",
        choices=("standard", "none", "nonsense"),
        default="standard",
        help="standard X-RateLimit-* headers; none (429s are a proxy's HTML page, the limit "
        "still holds); nonsense (Limit 0, Period abc, Remaining -3, Reset -5); "
        "e.g. --ratelimit-headers none",
    )
    rates.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the random faults, to repeat a rehearsal; e.g. --seed 7",
    )
    e.add_argument(
        "--dashboards",
        type=Path,
        default=None,
        metavar="FILE",
        help="a JSON list of shared dashboards to serve (token, share_type, status, "
        "invitees, share_list, and 'invited'/'sessions' address lists); other tokens follow "
        "the sandbox rule; e.g. --dashboards dashboards.json",
    )
    add_log_format(e)


async def emulator_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    from worker.emulator import Emulator, Faults, load_dashboards

    logs.configure(args.log_format, level=log_level(args))
    log = structlog.get_logger("worker.emulator")
    faults = Faults(
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        error_after_rate=args.error_after_rate,
        drop_after_rate=args.drop_after_rate,
        max_batch=args.max_batch,
        name_refused=not args.unnamed_refusals,
    )
    emulator = Emulator(
        api_key=args.api_key,
        app_key=args.app_key,
        limit=args.limit,
        period=args.period,
        faults=faults,
        seed=args.seed,
        ratelimit_headers=args.ratelimit_headers,
        session_rate=args.session_rate,
        max_page_size=args.max_page_size,
    )
    if args.dashboards is not None:
        emulator.seed(load_dashboards(args.dashboards, time.time()))
    try:
        await emulator.start(args.host, args.port)
    except OSError as exc:
        fix = ("; choose another --port, or --port 0 for a free one"
               if exc.errno == errno.EADDRINUSE else "")  # fmt: skip
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}{fix}") from None
    log.info("emulator.listening", url=emulator.url, limit=args.limit, period=args.period)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emulator.stop()
        log.info("emulator.stopped", **emulator.stats())
    return 0
