"""``invite-worker dead-letter list|requeue``: the messages a queue worker could not send for
good, listed, and put back on the stream once their cause is fixed."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from worker import logs
from worker.cli import signals
from worker.cli.help import add_log_format, command, json_stderr, log_level
from worker.cli.queue import add_dead_letter_option, add_url_and_stream, require_stream
from worker.errors import UsageError
from worker.exits import EXIT_INCOMPLETE
from worker.queue.options import StreamOptions
from worker.queue.text import escaped

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.queue.deadletters import Selection


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
        add_url_and_stream(p, "the stream the workers read; e.g. --stream invites")
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

    from worker.queue.connect import connect
    from worker.queue.deadletters import Selection
    from worker.queue.runner import at_start, command_failures

    logs.configure(args.log_format, level=log_level(args))
    options = StreamOptions(url=args.url, stream=args.stream, dead_letter=args.dead_letter)
    selection = Selection(codes=set(args.code), ids=set(args.ids))
    if args.dead_letter_command == "requeue" and not (args.all or args.code or args.ids):
        raise UsageError("say which dead letters to requeue: --code CODE, --id ID, or --all")
    failures = command_failures(options.stream, options.where, options.dead_letter)
    # A signal ends it at once, with a line saying so: a listing changes nothing, and
    # each dead letter is requeued whole (added to the stream as it leaves the dead
    # letters) or not at all.
    early = ("each dead letter requeued so far was moved whole; list them to see what is "
             "left" if args.dead_letter_command == "requeue" and not args.dry_run
             else "nothing was changed")  # fmt: skip
    with signals.StopSignals(json_lines=json_stderr(sys.argv[1:]), early=early):
        redis = await connect(args.url, options.where, failures)
        try:
            return signals.finish(await _dead_letter(args, redis, options, selection))
        except RedisError as exc:  # one message for what it means, never a traceback
            raise at_start(await failures(redis)(exc)) from None
        finally:
            await redis.aclose()


async def _dead_letter(
    args: argparse.Namespace, redis: Redis, options: StreamOptions, selection: Selection
) -> int:
    from worker.queue.deadletters import codes_present, dead_letters, requeue

    if not await redis.exists(options.dead_letter):  # none yet, or a mistyped name?
        why = f"its dead letters would be in {options.dead_letter!r}, which is not there"
        await require_stream(redis, options.stream, why)
    unmatched: list[str] = []
    if selection.codes:  # a code no dead letter has: none now, or a slip of the keyboard?
        present = await codes_present(redis, options.dead_letter, selection.codes)
        _refuse_mistyped(selection.codes, present, options.dead_letter)
        if unmatched := sorted(set(selection.codes) - set(present)):
            structlog.get_logger("worker.queue").warning(
                "dead_letter.no_match", codes=unmatched, present=_by_code(present),
                action="none of the dead letters has these codes now; "
                "`dead-letter list` shows them")  # fmt: skip
    if args.dead_letter_command == "list":
        counts: Counter[str] = Counter()
        async for page in dead_letters(redis, options.dead_letter, selection):
            counts.update(letter.code for letter in page)
            _print_dead_letters(page, sys.stdout, as_json=args.json)
        if not args.json:
            by_code = _by_code(counts)
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
        **({"unmatched_codes": unmatched} if unmatched else {}),
    }
    event = "dead_letter.requeue_planned" if args.dry_run else "dead_letter.requeued"
    structlog.get_logger("worker.queue").info(event, **summary)
    print(json.dumps(summary))
    return EXIT_INCOMPLETE if done["not_requeueable"] else 0


def _by_code(counts: Counter[str]) -> str:
    """``code n, code n``, most first (``?`` for a dead letter with no code)."""
    return ", ".join(f"{escaped(code) or '?'} {n}" for code, n in counts.most_common())


def _refuse_mistyped(codes: Collection[str], present: Counter[str], where: str) -> None:
    """A --code no dead letter has, close to one that some have: a slip of the keyboard,
    refused before anything is listed or moved (the other codes would move alone)."""
    from worker.queue.deadletters import mistyped_codes

    if meant := mistyped_codes(codes, present):
        slips = "; ".join(f"--code {code!r}: did you mean {close!r}?"
                          for code, close in meant.items())  # fmt: skip
        raise UsageError(f"no dead letter in {where!r} has {slips} (the codes there: "
                         f"{_by_code(present)}); nothing was changed")  # fmt: skip


def _print_dead_letters(page: list[Any], out: TextIO, *, as_json: bool) -> None:
    for letter in page:
        # Bytes another producer wrote that are not UTF-8 are shown as \xNN.
        f = {escaped(name): escaped(value) for name, value in letter.fields.items()}
        if as_json:
            print(json.dumps({"id": letter.id, **f}), file=out)
            continue
        message = f.get("error_message", "").replace("\n", " ")
        print(
            f"{letter.id}  {f.get('failed_at', '-')}  {f.get('error_code') or '-'}  "
            f"{f.get('token', '-')}  {f.get('email', '-')}  {message[:120]}",
            file=out,
        )
