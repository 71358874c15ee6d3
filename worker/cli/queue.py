"""Queue mode on the command line: ``run``'s stream options, ``enqueue``, ``dead-letter``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from worker import logs
from worker.cli.help import (
    add_column_options,
    add_format,
    add_log_format,
    columns_of,
    command,
    log_level,
)
from worker.errors import UsageError
from worker.exits import EXIT_INCOMPLETE
from worker.queue.names import closest_streams
from worker.queue.options import StreamOptions, is_redis_url
from worker.sources import open_source

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.queue.deadletters import Selection


async def require_stream(redis: Redis, stream: str, why: str) -> None:
    """Refuse a stream that does not exist, naming those that do, closest names first.

    ``why``: what the stream was needed for. A mistyped name would otherwise read as an
    empty queue (``--until-empty`` exits 0) or as no dead letters.
    """
    if await redis.exists(stream):
        kind = str(await redis.type(stream))
        if kind == "stream":
            return
        raise UsageError(f"{stream!r} is a Redis {kind}, not a stream; check --stream")
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
        default="",
        metavar="NAME",
        help='this worker\'s name in the group (default: host-pid); e.g. --consumer "$HOSTNAME"',
    )
    q.add_argument(
        "--linger",
        type=float,
        default=2.0,
        metavar="S",
        help="send a partial batch once its first message has waited this long and the "
        "stream is caught up; e.g. --linger 0.5",
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
    n.add_argument("url", metavar="URL", help="the Redis server; e.g. redis://127.0.0.1:6379/0")
    n.add_argument(
        "--stream",
        required=True,
        metavar="NAME",
        help="the stream to add to; e.g. --stream invites",
    )
    add_format(n)
    add_column_options(n)
    add_log_format(n)


async def enqueue_command(args: argparse.Namespace) -> int:
    """``enqueue``: print a JSON summary; exit 1 if rows were rejected."""
    from worker.queue.runner import enqueue

    logs.configure(args.log_format, level=log_level(args))
    if not is_redis_url(args.url):
        raise UsageError(f"not a Redis URL: {args.url!r} (use redis://HOST:PORT/DB)")
    source = open_source(args.file, args.format, columns=columns_of(args))
    where = StreamOptions(url=args.url, stream=args.stream).where
    summary = await enqueue(source, args.url, args.stream, where)
    print(json.dumps(summary))
    return EXIT_INCOMPLETE if summary["rejected"] else 0


def add_dead_letter_parser(sub: Any) -> None:
    """``invite-worker dead-letter list|requeue URL --stream NAME``."""
    d = command(
        sub,
        "dead-letter",
        "Messages a queue worker could not send for good go to "
        "the dead-letter stream with their error. List them; once the cause is fixed "
        "(the address added to the dashboard, the token corrected upstream), requeue "
        "them: each moves back to the stream as a new message, atomically, so running "
        "a requeue again never puts a message back twice.",
        """
  invite-worker dead-letter list redis://127.0.0.1:6379/0 --stream invites
  invite-worker dead-letter requeue redis://127.0.0.1:6379/0 --stream invites --code server_error
""",
    )
    actions = d.add_subparsers(dest="dead_letter_command", required=True, metavar="ACTION")
    ls = command(
        actions,
        "list",
        "Print the dead letters, oldest first: id, when and why it failed, token and address.",
        """
  invite-worker dead-letter list redis://127.0.0.1:6379/0 --stream invites
  invite-worker dead-letter list redis://127.0.0.1:6379/0 --stream invites --json | head
""",
        help="print the dead letters (or --json lines)",
    )
    rq = command(
        actions,
        "requeue",
        "Move the chosen dead letters back to the stream as new "
        "token/email messages (with requeued_from: the dead letter's id). Choose "
        "with --code, --id, or --all. Prints a JSON summary.",
        """
  invite-worker dead-letter requeue redis://127.0.0.1:6379/0 --stream invites --code server_error
  invite-worker dead-letter requeue redis://127.0.0.1:6379/0 --stream invites --all --dry-run
""",
        help="put fixed dead letters back on the stream",
    )
    for p in (ls, rq):
        p.add_argument("url", metavar="URL", help="the Redis server; e.g. redis://127.0.0.1:6379/0")
        p.add_argument(
            "--stream",
            required=True,
            metavar="NAME",
            help="the stream the workers read; e.g. --stream invites",
        )
        add_dead_letter_option(p)
        p.add_argument(
            "--code",
            action="append",
            default=[],
            metavar="CODE",
            help="only dead letters with this error code (repeatable); "
            "e.g. --code not_on_share_list",
        )
        p.add_argument(
            "--id",
            action="append",
            default=[],
            dest="ids",
            metavar="ID",
            help="only the dead letter with this id (repeatable); e.g. --id 1764064800000-0",
        )
        add_log_format(p)
    ls.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    rq.add_argument("--all", action="store_true", help="requeue every dead letter")
    rq.add_argument(
        "--dry-run", action="store_true", help="say what would move (would_requeue); move nothing"
    )


async def dead_letter_command(args: argparse.Namespace) -> int:
    """``dead-letter list`` or ``dead-letter requeue``."""
    from redis.exceptions import RedisError

    from worker.queue.deadletters import Selection
    from worker.queue.runner import at_start, command_failures, connect

    logs.configure(args.log_format, level=log_level(args))
    options = StreamOptions(url=args.url, stream=args.stream, dead_letter=args.dead_letter)
    selection = Selection(codes=set(args.code), ids=set(args.ids))
    if args.dead_letter_command == "requeue" and not (args.all or args.code or args.ids):
        raise UsageError("say which dead letters to requeue: --code CODE, --id ID, or --all")
    failures = command_failures(options.stream, options.where, options.dead_letter)
    redis = await connect(args.url, options.where, failures)
    try:
        return await _dead_letter(args, redis, options, selection)
    except RedisError as exc:  # one message for what it means, never a traceback
        raise at_start(await failures(redis)(exc)) from None
    finally:
        await redis.aclose()


async def _dead_letter(
    args: argparse.Namespace, redis: Redis, options: StreamOptions, selection: Selection
) -> int:
    from worker.queue.deadletters import dead_letters, requeue

    if not await redis.exists(options.dead_letter):  # none yet, or a mistyped name?
        why = f"its dead letters would be in {options.dead_letter!r}, which is not there"
        await require_stream(redis, options.stream, why)
    if args.dead_letter_command == "list":
        counts: Counter[str] = Counter()
        async for page in dead_letters(redis, options.dead_letter, selection):
            counts.update(letter.code for letter in page)
            _print_dead_letters(page, sys.stdout, as_json=args.json)
        if not args.json:
            by_code = ", ".join(f"{code or '?'} {n}" for code, n in counts.most_common())
            print(
                f"{counts.total()} dead letter(s) in {options.dead_letter}"
                + (f": {by_code}" if by_code else "")
            )
        return 0
    done = await requeue(
        redis, options.dead_letter, options.stream, selection, dry_run=args.dry_run
    )
    if args.dry_run:  # nothing moved: say what would
        done = {("would_requeue" if k == "requeued" else k): v for k, v in done.items()}
    summary = {
        "dead_letter": options.dead_letter,
        "stream": options.stream,
        "dry_run": args.dry_run,
        **done,
    }
    event = "dead_letter.requeue_planned" if args.dry_run else "dead_letter.requeued"
    structlog.get_logger("worker.queue").info(event, **summary)
    print(json.dumps(summary))
    return EXIT_INCOMPLETE if done["not_requeueable"] else 0


def _print_dead_letters(page: list[Any], out: TextIO, *, as_json: bool) -> None:
    if as_json:
        for letter in page:
            print(json.dumps({"id": letter.id, **letter.fields}), file=out)
        return
    for letter in page:
        f = letter.fields
        message = f.get("error_message", "").replace("\n", " ")
        print(
            f"{letter.id}  {f.get('failed_at', '-')}  {letter.code or '-'}  "
            f"{f.get('token', '-')}  {f.get('email', '-')}  {message[:120]}",
            file=out,
        )
