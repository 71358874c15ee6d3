"""What each ``invite-worker`` command does once its arguments are parsed."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import stat
import sys
import time

import structlog

from worker import logs
from worker.cli import signals
from worker.cli.emulator import SANDBOX_KEY
from worker.cli.guards import check_not_input, check_report_path, run_outputs
from worker.cli.help import columns_of, json_stderr, log_level, say
from worker.cli.run_config import config_from, read_key, report_path, watched
from worker.config import Config
from worker.errors import FatalError, UsageError
from worker.exits import EXIT_ABORTED
from worker.queue.options import StreamOptions, check_redis_url, is_redis_url
from worker.record.files import reads_as_report
from worker.run import run
from worker.run.human import print_summary, resume_command
from worker.run.summary import AnySummary
from worker.send.proxy import proxy_secrets
from worker.sources import open_source
from worker.urls import api_url_for_site, check_api_url


def _install_stop(stop: asyncio.Event, again: str) -> list[str]:
    """The run starts: a first SIGTERM/SIGINT now sets ``stop``, a second exits at once
    (the journal stays valid), even if the event loop is stuck (see
    :mod:`worker.cli.signals`).

    Returns the list the names of the signals received are added to; ``again`` is the
    command that finishes the run, said if a second signal cuts it short.
    """
    return signals.current().run_started(stop, again)


def _refuse_mistakes(args: argparse.Namespace) -> None:
    """What can only be a mistake, refused before anything is started, read or written."""
    if args.preflight and not args.dry_run:
        raise UsageError(
            "--preflight goes with --dry-run (it plans from the dashboards' reads and sends "
            "nothing); add --dry-run, or drop --preflight: a run checks the dashboards anyway"
        )
    if args.resume and args.dry_run:  # a plan is of a whole list; never of a report's rest
        raise UsageError(
            "--dry-run plans the whole list and never continues a report: drop --resume to "
            "plan it (into a plan report of its own: the default, or --report PLAN.jsonl), "
            "or drop --dry-run to continue the run"
        )
    if args.assume_limit and not args.dry_run:
        raise UsageError("--assume-limit only shapes a --dry-run estimate; add --dry-run")
    if args.prune_max is not None and not args.prune:
        raise UsageError("--prune-max caps what --prune removes; add --prune, or drop it")
    if args.resume and is_redis_url(args.source):  # silently ignored, it would mislead
        raise UsageError("--resume continues a file run's report; a queue worker always "
                         "appends to its --report and re-reads its pending messages (run "
                         "again under the same --consumer): drop --resume")  # fmt: skip
    if not is_redis_url(args.source) and (args.stream is not None or args.until_empty):
        given = "--stream" if args.stream is not None else "--until-empty"
        raise UsageError(f"{given} is for a redis:// SOURCE (a stream); {args.source!r} "
                         f"is read as a file: drop {given}, or give the Redis URL as "
                         "SOURCE")  # fmt: skip
    if args.prune and is_redis_url(args.source):  # a stream has no whole list to compare
        raise UsageError("--prune compares dashboards with a whole list; a stream has no "
                         "end. Use 'invite-worker run FILE --prune' on the file you would "
                         "enqueue")  # fmt: skip
    if args.prune and args.dry_run and not args.preflight:
        raise UsageError("a --dry-run of --prune needs --preflight: it reads the dashboards "
                         "to know whom a run would remove")  # fmt: skip
    api_url, named = api_url_given(args)
    if api_url is not None and not args.sandbox:  # "" too: an unset shell variable
        check_api_url(api_url, named)
    report = report_path(args)
    check_report_path(report, dry_run=args.dry_run)
    if is_redis_url(args.source):
        check_redis_url(args.source)
    else:
        check_not_input(args.source, run_outputs(report, dry_run=args.dry_run))
    if report.is_file() and not reads_as_report(report):
        raise UsageError(
            f"{str(report)!r} is not a report (its first line is not a report record) and is "
            "never written to, --overwrite or not; choose another --report path"
        )


async def run_command(args: argparse.Namespace) -> int:
    _refuse_mistakes(args)
    api_url, named = api_url_given(args)
    if args.sandbox:
        if api_url:
            drop = "drop --api-url" if named == "--api-url" else "unset DD_API_URL"
            raise UsageError(f"--sandbox runs against the built-in emulator; {drop}")
        # The server side loads only when needed.
        from worker.emulator import Emulator
        from worker.emulator.dashboards import SANDBOX, dashboards_from

        logs.configure(args.log_format, level=log_level(args, watched=watched(args)))
        if _read_twice_safely(args.source):  # the input first
            open_source(args.source, args.format, columns=columns_of(args)).close()
        async with Emulator() as emulator:
            emulator.seed(dashboards_from(SANDBOX, time.time()))
            config = config_from(args, emulator.url, SANDBOX_KEY, SANDBOX_KEY, direct=True)
            structlog.get_logger("worker.cli").info("sandbox.started", url=emulator.url)
            code = await _execute(args, config)
            structlog.get_logger("worker.cli").info("sandbox.stats", **emulator.stats())
            return code
    api_key = read_key("API key", args.api_key_file, "DD_API_KEY_FILE", "DD_API_KEY")
    app_key = read_key("application key", args.app_key_file, "DD_APP_KEY_FILE", "DD_APP_KEY")
    logs.configure(args.log_format, secrets=(api_key, app_key, *proxy_secrets(os.environ)),
                   level=log_level(args, watched=watched(args)))  # fmt: skip
    api_url = api_url or api_url_for_site(args.site)
    if args.dry_run and not args.preflight:  # no request is made, so no key is needed
        api_key, app_key = api_key or "unused-in-a-dry-run", app_key or "unused-in-a-dry-run"
    config = config_from(args, api_url, api_key, app_key)
    return await _execute(args, config)


def api_url_given(args: argparse.Namespace) -> tuple[str | None, str]:
    """The base URL given instead of the site's, and where: ``--api-url`` (even empty),
    else a non-empty ``DD_API_URL``; (None, "--api-url") when neither."""
    if args.api_url is not None:
        return args.api_url, "--api-url"
    if env := os.environ.get("DD_API_URL"):
        return env, "DD_API_URL"
    return None, "--api-url"


def _read_twice_safely(source: str) -> bool:
    """An input that can be opened to check it, then again to run: not stdin, a stream,
    a FIFO or a device (what the check read would be lost to the run)."""
    if source == "-" or is_redis_url(source):
        return False
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return True  # let opening it say what is wrong
    return not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode))


async def _execute(args: argparse.Namespace, config: Config) -> int:
    """Run under :class:`StopSignals`: a signal is heard from the start, a stuck loop or not."""
    # Stopped before it started, a first run may have written no report yet: the same
    # command starts it again (with --resume that command was continuing one already).
    early = "nothing was sent yet; run the same command again to start"
    with signals.StopSignals(json_lines=json_stderr(sys.argv[1:]), early=early):
        return signals.finish(await _execute_run(args, config))


async def _execute_run(args: argparse.Namespace, config: Config) -> int:
    """Run from a file or, for a redis:// SOURCE, from a stream."""
    stop = asyncio.Event()
    # The same command, to finish with: --overwrite cannot go with --resume.
    command = ["invite-worker", *(a for a in sys.argv[1:] if a != "--overwrite")]
    if is_redis_url(args.source):
        if args.dry_run:  # a plan must never turn into a run that sends
            raise UsageError(
                "--dry-run plans a file; it cannot read a stream. Use "
                "'invite-worker run FILE --dry-run' on the file you would enqueue"
            )
        from worker.queue.runner import run_stream

        if args.consumer is not None and not args.consumer.strip():
            # An unset variable ("$HOSTNAME"): a default name, new at each start, would
            # leave this worker's pending messages to be claimed after --claim-idle.
            raise UsageError("--consumer is empty (an unset variable?): give the worker "
                             "its name, or leave --consumer out for the default, host "
                             "and pid")  # fmt: skip
        options = StreamOptions(
            url=args.source, stream=args.stream or "", group=args.group,
            consumer=args.consumer or "", dead_letter=args.dead_letter,
            claim_idle=args.claim_idle, max_deliveries=args.max_deliveries,
            until_empty=args.until_empty,
        )  # fmt: skip
        if options.until_empty:
            await _require_stream(options)
        if not any(a == "--consumer" or a.startswith("--consumer=") for a in command):
            # Run again under the same name, it re-reads its own pending messages at once
            # instead of waiting --claim-idle for another name to claim them.
            command += ["--consumer", options.consumer]
        # A signal before Redis answers exits at once (nothing was read); after, it stops
        # the worker gently.
        received = signals.current().received
        result = await run_stream(
            config, options, stop=stop, connected=lambda: _install_stop(stop, shlex.join(command))
        )
        summary: AnySummary = result.summary
    elif args.dry_run:
        from worker.run.plan import dry_run, parse_limit

        assume = parse_limit(args.assume_limit) if args.assume_limit else None
        source = open_source(args.source, args.format, columns=columns_of(args))
        try:
            plan = await dry_run(
                config,
                source,
                assume_limit=assume,
                preflight=args.preflight,
                for_people=watched(args),
            )
        except FatalError as exc:  # --preflight found no API at the URL
            say("run.halted", str(exc), json_lines=json_stderr(sys.argv[1:]))
            return EXIT_ABORTED
        return plan.exit_code
    else:
        source = open_source(args.source, args.format, columns=columns_of(args))
        received = _install_stop(stop, resume_command(command))
        summary = (await run(config, source, stop=stop)).summary
    if config.progress == "bar":  # a person at a terminal: how it went, and what next
        print_summary(summary, str(config.report_path), command, sys.stderr,
                      signal=received[0] if received else None)  # fmt: skip
    return summary.exit_code


async def _require_stream(options: StreamOptions) -> None:
    """``--until-empty`` on a stream that does not exist: a mistyped name, refused."""
    from redis.exceptions import RedisError

    from worker.cli.queue import require_stream
    from worker.queue.connect import connect
    from worker.queue.runner import at_start, command_failures

    failures = command_failures(options.stream, options.where, options.dead_letter)
    redis = await connect(options.url, options.where, failures)
    try:
        await require_stream(redis, options.stream, "--until-empty would find it empty and "
                             "stop at once (a worker without it waits for the stream to "
                             "appear)")  # fmt: skip
    except RedisError as exc:  # one message for what it means, never a traceback
        raise at_start(await failures(redis)(exc)) from None
    finally:
        await redis.aclose()
