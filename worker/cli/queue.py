"""Queue mode on the command line: ``run``'s stream options, ``enqueue`` (``dead-letter``
is :mod:`worker.cli.deadletter`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from typing import TYPE_CHECKING, Any

from worker import logs
from worker.cli import signals
from worker.cli.help import (
    add_column_options,
    add_format,
    add_log_format,
    columns_of,
    command,
    json_stderr,
    log_level,
    say,
)
from worker.errors import UsageError
from worker.exits import EXIT_ABORTED, EXIT_INCOMPLETE
from worker.queue.names import closest_streams, wrong_type
from worker.queue.options import StreamOptions, is_redis_url
from worker.sources import open_source
from worker.sources.csvfile import CsvSource

if TYPE_CHECKING:
    from redis.asyncio import Redis


async def require_stream(redis: Redis, stream: str, why: str) -> None:
    """Refuse a stream that does not exist, naming those that do, closest names first.

    ``why``: what the stream was needed for. A mistyped name would otherwise read as an
    empty queue (``--until-empty`` exits 0) or as no dead letters.
    """
    if await redis.exists(stream):
        refused = wrong_type(stream, str(await redis.type(stream)))
        if refused is None:
            return
        raise refused
    closest, more = await closest_streams(redis, stream)
    shown = ", ".join(closest) + (", ..." if more else "")
    found = f"the streams there: {shown}" if closest else "there is no stream on that server"
    raise UsageError(
        f"no stream {stream!r} on that Redis server ({found}); {why}. Check --stream "
        "(and the URL's database number)"
    )


def add_stream_options(r: argparse.ArgumentParser) -> None:
    """``run``'s options for a ``redis://`` SOURCE."""
    q = r.add_argument_group("stream mode (SOURCE is redis://HOST:PORT/DB)")
    q.add_argument("--stream", metavar="NAME", help="the stream to read; e.g. --stream invites")
    add_group_option(q)
    q.add_argument(
        "--consumer",
        default=None,
        metavar="NAME",
        help="this worker's name in the group, one live process per name (default: "
        'host-pid); e.g. --consumer "$HOSTNAME" where each worker has its own host',
    )
    q.add_argument(
        "--linger",
        type=float,
        default=2.0,
        metavar="S",
        help="send a partial batch once its first message has waited this long and the "
        "stream is caught up; for input from a pipe, a FIFO or a terminal, once it has been "
        "silent this long; e.g. --linger 0.5",
    )
    add_dead_letter_option(q)
    q.add_argument(
        "--claim-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="claim other consumers' messages unacknowledged this long, in seconds; "
        "e.g. --claim-idle 300",
    )
    q.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        metavar="N",
        help="dead-letter a message delivered more often than this (a run stopped or refused "
        "gives its deliveries back); e.g. --max-deliveries 3",
    )
    q.add_argument(
        "--until-empty",
        action="store_true",
        help="exit once the group has no new and no pending messages (a CronJob); the "
        "stream must exist",
    )


def add_url_and_stream(p: argparse.ArgumentParser, stream_help: str) -> None:
    """The Redis server (positional) and the stream (``--stream``) of a queue command."""
    p.add_argument("url", metavar="URL", help="the Redis server; e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--stream", required=True, metavar="NAME", help=stream_help)


def add_group_option(p: argparse._ActionsContainer) -> None:
    """``--group``."""
    p.add_argument(
        "--group",
        default="invite-worker",
        metavar="NAME",
        help="the consumer group; e.g. --group invites-eu",
    )


def add_dead_letter_option(p: argparse._ActionsContainer) -> None:
    """``--dead-letter``."""
    p.add_argument(
        "--dead-letter",
        default="",
        metavar="NAME",
        help="the stream for messages that failed for good (default: "
        "<stream>:dead); e.g. --dead-letter invites:failed",
    )


def add_enqueue_parser(sub: Any) -> None:
    """``invite-worker enqueue FILE URL --stream NAME``."""
    n = command(
        sub,
        "enqueue",
        "Load the valid rows of a CSV or JSONL file into a Redis "
        "Stream as token/email messages, for queue workers to send. Invalid rows are "
        "logged with their line and counted; exit 1 if there were any.",
        """
  invite-worker enqueue invites.csv redis://127.0.0.1:6379/0 --stream invites
  cat invites.jsonl | invite-worker enqueue - redis://redis:6379/0 --stream invites --format jsonl
""",
    )
    n.add_argument(
        "file", metavar="FILE", help="a .csv or .jsonl path, or - for stdin; e.g. invites.csv"
    )
    add_url_and_stream(n, "the stream to add to; e.g. --stream invites")
    add_format(n)
    add_column_options(n)
    add_log_format(n)


async def enqueue_command(args: argparse.Namespace) -> int:
    """``enqueue``: print a JSON summary; exit 1 if rows were rejected."""
    from worker.queue.runner import enqueue

    logs.configure(args.log_format, level=log_level(args))
    if not is_redis_url(args.url):
        raise UsageError(f"not a Redis URL: {args.url!r} (use redis://HOST:PORT/DB)")
    where = StreamOptions(url=args.url, stream=args.stream).where  # the URL checked first
    json_lines = json_stderr(sys.argv[1:])
    # A first signal stops it between two chunks of the input; before Redis answered (or
    # while a pipe's header is awaited), or a second one, ends it at once: each slice of
    # rows is added whole or not at all.
    with signals.StopSignals(json_lines=json_lines, early="nothing was added yet"):
        source = open_source(args.file, args.format, columns=columns_of(args))
        stop = asyncio.Event()
        again = (f"enqueue the rows after the last one the stream holds (XREVRANGE "
                 f"{args.stream} + - COUNT 1 shows it)")  # fmt: skip
        summary = await enqueue(source, args.url, args.stream, where, stop,
                                lambda: signals.current().run_started(stop, again))  # fmt: skip
        interrupted = bool(summary.get("interrupted"))
        # Known before it is said (a closed stdout keeps it), and said while signals are
        # still heard here: one after the block leaves it as it is (see signals.finish).
        code = signals.finish(EXIT_ABORTED if interrupted else (
            EXIT_INCOMPLETE if summary["rejected"] else 0))  # fmt: skip
        if interrupted:  # first, on stderr: how to finish, whatever becomes of stdout
            header = source.header_line if isinstance(source, CsvSource) else 0
            say("enqueue.stopped", _stopped(summary, args.file, header), json_lines=json_lines)
        print(json.dumps(summary), flush=True)
        return code


def _stopped(summary: dict[str, Any], file: str, header: int) -> str:
    """What a signal left, and how to finish (``header``: a CSV's header line; 0: none)."""
    line, added = summary["last_line"], summary["enqueued"]
    if not line:
        return "stopped by a signal before any row was added: run the same command again"
    name = shlex.quote(file) if file != "-" else "FILE"  # a pipe: wherever its rows are
    rest = f"tail -n +{line + 1} {name}"
    if header:  # the rest of a CSV needs its header line first
        rest = f"(sed -n {header}p {name}; {rest})"
    return (
        f"stopped by a signal: {added:,} row(s) added; every row up to line {line} of "
        f"the input was added or rejected, none after it. To finish, enqueue only the "
        f"rows after line {line}: {rest} | invite-worker enqueue - ..."
    )
