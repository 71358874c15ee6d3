"""The options of stream mode and of ``invite-worker emulator`` (the rest: ``parser``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SANDBOX_KEY = "sandbox"

#: Every command and its one-line description (``invite-worker`` alone lists them).
COMMANDS = {
    "run": "send the invitations listed in a CSV or JSONL file, or queued in a Redis Stream",
    "enqueue": "load a CSV or JSONL file into a Redis Stream",
    "report": "read a report: summarize it, or list what failed",
    "emulator": "serve the Datadog API emulator for rehearsals",
}


def add_stream_options(r: argparse.ArgumentParser) -> None:
    """``run``'s options for a ``redis://`` SOURCE."""
    q = r.add_argument_group("stream mode (SOURCE is redis://HOST:PORT/DB)")
    q.add_argument("--stream", help="the stream to read")
    q.add_argument("--group", default="invite-worker", help="consumer group (invite-worker)")
    q.add_argument("--consumer", default="", help="consumer name (default: host-pid)")
    q.add_argument(
        "--linger",
        type=float,
        default=2.0,
        help="send a partial batch once it has waited this long (2)",
    )
    q.add_argument(
        "--dead-letter", default="", help="stream for messages that failed for good (<stream>:dead)"
    )
    q.add_argument(
        "--claim-idle",
        type=float,
        default=60.0,
        help="claim other consumers' messages idle this long, in seconds (60)",
    )
    q.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        help="dead-letter a message delivered more often than this (5)",
    )
    q.add_argument(
        "--until-empty",
        action="store_true",
        help="exit once the group has no new and no pending messages",
    )


def add_emulator_parser(sub: Any) -> None:
    """``invite-worker emulator``: serve the emulated API for rehearsals."""
    e = sub.add_parser("emulator", help=COMMANDS["emulator"])
    e.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    e.add_argument("--port", type=int, default=8126, help="port to listen on (8126)")
    e.add_argument("--limit", type=int, default=None, help="requests allowed per window")
    e.add_argument("--period", type=float, default=10.0, help="window length in seconds (10)")
    e.add_argument("--api-key", default=SANDBOX_KEY, help="expected DD-API-KEY (sandbox)")
    e.add_argument("--app-key", default=SANDBOX_KEY, help="expected DD-APPLICATION-KEY (sandbox)")
    e.add_argument("--error-rate", type=float, default=0.0, help="share of POSTs given a 503")
    e.add_argument(
        "--drop-rate", type=float, default=0.0, help="share of POSTs whose connection is dropped"
    )
    e.add_argument(
        "--slow-rate",
        type=float,
        default=0.0,
        help="share of POSTs answered only after --slow-seconds",
    )
    e.add_argument("--slow-seconds", type=float, default=5.0, help="delay of a slow answer")
    e.add_argument(
        "--error-after-rate",
        type=float,
        default=0.0,
        help="share of POSTs answered 502 after the invitations were created",
    )
    e.add_argument(
        "--drop-after-rate",
        type=float,
        default=0.0,
        help="share of POSTs whose connection drops after the invitations were created",
    )
    e.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="answer 400, naming no address, to lists longer than this",
    )
    e.add_argument(
        "--unnamed-refusals",
        action="store_true",
        help="a 400 for addresses off the share list does not name them",
    )
    e.add_argument(
        "--ratelimit-headers",
        choices=("standard", "none", "nonsense"),
        default="standard",
        help="standard X-RateLimit-* headers; none (429s are a proxy's HTML page, the "
        "limit still holds); nonsense (Limit 0, Period abc, Remaining -3, Reset -5)",
    )
    e.add_argument(
        "--session-rate",
        type=float,
        default=0.0,
        help="share of new invitations whose link is opened at once (a session starts)",
    )
    e.add_argument(
        "--dashboards",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON list of shared dashboards to serve (token, share_type, status, invitees, "
        "share_list, and 'invited'/'sessions' address lists); other tokens follow the "
        "sandbox rule",
    )
    e.add_argument("--seed", type=int, default=None, help="seed for the random faults")
    e.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
