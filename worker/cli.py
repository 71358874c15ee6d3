"""The ``invite-worker`` command line: ``run`` and ``emulator``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import structlog

from worker import logs
from worker.config import DEFAULT_SITE, Config, api_url_for_site
from worker.errors import UsageError
from worker.pipeline import EXIT_ABORTED, EXIT_INCOMPLETE, EXIT_USAGE, run
from worker.queue.options import StreamOptions, is_redis_url
from worker.sources import open_source

SANDBOX_KEY = "sandbox"


def _json_stderr(argv: Sequence[str]) -> bool:
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


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are JSON lines when stderr is in JSON mode."""

    def error(self, message: str) -> NoReturn:
        if _json_stderr(sys.argv[1:]):
            say("cli.usage_error", f"{self.prog}: {message}", json_lines=True)
            raise SystemExit(EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the README's option table and tests)."""
    parser = _Parser(
        prog="invite-worker",
        description="Send Datadog shared-dashboard invitations in bulk.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="send the invitations listed in a CSV or JSONL file")
    r.add_argument("source", metavar="SOURCE", help="a .csv or .jsonl path, or - for stdin")
    r.add_argument("--format", choices=("csv", "jsonl"), help="override the input format")
    r.add_argument(
        "--report",
        type=Path,
        default=Path("invite-report.jsonl"),
        help="the JSONL report (default: invite-report.jsonl)",
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

    n = sub.add_parser("enqueue", help="load a CSV or JSONL file into a Redis Stream")
    n.add_argument("file", metavar="FILE", help="a .csv or .jsonl path, or - for stdin")
    n.add_argument("url", metavar="URL", help="redis://HOST:PORT/DB")
    n.add_argument("--stream", required=True, help="the stream to add to")
    n.add_argument("--format", choices=("csv", "jsonl"), help="override the input format")
    n.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")

    rp = sub.add_parser("report", help="read a report: summarize it, or list what failed")
    rsub = rp.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    rs = rsub.add_parser("summarize", help="totals, failures by code and token, rejections")
    rs.add_argument("report", metavar="REPORT", type=Path)
    rs.add_argument("--json", action="store_true", help="print one JSON object")
    rf = rsub.add_parser("failed", help="CSV (token,email) of every email that failed")
    rf.add_argument("report", metavar="REPORT", type=Path)
    rf.add_argument("--output", type=Path, help="write the CSV here (default: stdout)")

    e = sub.add_parser("emulator", help="serve the Datadog API emulator for rehearsals")
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
        "--max-batch", type=int, default=None, help="answer 400 to lists longer than this"
    )
    e.add_argument("--seed", type=int, default=None, help="seed for the random faults")
    e.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # A run allocates millions of short-lived rows and dicts; collecting every 700
    # allocations (the default) costs over 10% of its CPU. Collect far less often, and
    # leave everything imported so far out of the collector's walks.
    gc.set_threshold(50_000, 20, 20)
    gc.freeze()
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "enqueue":
            return asyncio.run(_enqueue(args))
        if args.command == "report":
            return _report(args)
        return asyncio.run(_emulator(args))
    except UsageError as exc:
        say("cli.usage_error", f"error: {exc}", json_lines=_json_stderr(argv or sys.argv[1:]))
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("cli.interrupted", "interrupted", json_lines=_json_stderr(argv or sys.argv[1:]))
        return EXIT_ABORTED


def _config(args: argparse.Namespace, api_url: str, api_key: str, app_key: str) -> Config:
    return Config(
        api_url=api_url,
        api_key=api_key,
        app_key=app_key,
        report_path=args.report,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        rate=args.rate,
        max_attempts=args.max_attempts,
        timeout=args.timeout,
        resume=args.resume,
        grace=args.grace,
        reconcile_delay=args.reconcile_delay,
        durable_journal=args.fsync,
        progress=_progress_mode(args),
        progress_every=args.progress_every,
    )


def _progress_mode(args: argparse.Namespace) -> str:
    """A bar for a person at a terminal; progress events for everything else."""
    if logs.resolve_format(args.log_format, sys.stderr) == "console" and sys.stderr.isatty():
        return "bar"
    return "events"


def read_key(name: str, path: Path | None, file_variable: str, variable: str) -> str:
    """A key from ``--*-key-file``, else the file named by ``*_FILE``, else the variable.

    Files are how Kubernetes and Docker secrets arrive; a trailing newline is dropped.
    Errors name the file, never its content.
    """
    source = path or (Path(os.environ[file_variable]) if os.environ.get(file_variable) else None)
    if source is None:
        return os.environ.get(variable, "").strip()
    try:
        return source.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {name} file {str(source)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {name} file {str(source)!r} is not UTF-8 text") from None


def _install_stop(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: stop gracefully. Second: leave at once (the journal stays valid)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            say("run.exiting_now", "second signal, exiting now; run again with --resume to "
                "finish", json_lines=_json_stderr(sys.argv[1:]))  # fmt: skip
            os._exit(EXIT_ABORTED)
        name = signal.Signals(signum).name
        structlog.get_logger("worker.cli").warning("run.signal", signal=name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def _run(args: argparse.Namespace) -> int:
    if args.sandbox:
        if args.api_url:
            raise UsageError("--sandbox runs against the built-in emulator; drop --api-url")
        from worker.emulator import Emulator  # the server side loads only when needed

        logs.configure(args.log_format)
        async with Emulator() as emulator:
            config = _config(args, emulator.url, SANDBOX_KEY, SANDBOX_KEY)
            structlog.get_logger("worker.cli").info("sandbox.started", url=emulator.url)
            code = await _execute(args, config)
            structlog.get_logger("worker.cli").info("sandbox.stats", **emulator.stats())
            return code
    api_key = read_key("API key", args.api_key_file, "DD_API_KEY_FILE", "DD_API_KEY")
    app_key = read_key("application key", args.app_key_file, "DD_APP_KEY_FILE", "DD_APP_KEY")
    logs.configure(args.log_format, secrets=(api_key, app_key))
    api_url = args.api_url or api_url_for_site(args.site)
    if args.dry_run:  # no request is made, so no key is needed
        api_key, app_key = api_key or "unused-in-a-dry-run", app_key or "unused-in-a-dry-run"
    config = _config(args, api_url, api_key, app_key)
    return await _execute(args, config)


async def _execute(args: argparse.Namespace, config: Config) -> int:
    """Run from a file or, for a redis:// SOURCE, from a stream."""
    stop = asyncio.Event()
    if is_redis_url(args.source):
        from worker.queue.runner import run_stream

        options = StreamOptions(
            url=args.source, stream=args.stream or "", group=args.group,
            consumer=args.consumer, linger=args.linger, dead_letter=args.dead_letter,
            claim_idle=args.claim_idle, max_deliveries=args.max_deliveries,
            until_empty=args.until_empty,
        )  # fmt: skip
        _install_stop(stop)
        return (await run_stream(config, options, stop=stop)).exit_code
    if args.dry_run:
        from worker.plan import dry_run, parse_limit

        assume = parse_limit(args.assume_limit) if args.assume_limit else None
        return (await dry_run(config, open_source(args.source, args.format),
                              assume_limit=assume)).exit_code  # fmt: skip
    if args.assume_limit:
        raise UsageError("--assume-limit only shapes a --dry-run estimate")
    source = open_source(args.source, args.format)
    _install_stop(stop)
    return (await run(config, source, stop=stop)).exit_code


def _report(args: argparse.Namespace) -> int:
    from worker.review import Review, print_summary, write_failed

    if args.report_command == "summarize":
        totals = Review.read(args.report).summary()
        if args.json:
            print(json.dumps(totals))
        else:
            print_summary(args.report, totals, sys.stdout)
        return 0
    if args.output is None:
        write_failed(args.report, sys.stdout)
        return 0
    try:
        with args.output.open("w", newline="", encoding="utf-8") as out:
            count = write_failed(args.report, out)
    except OSError as exc:
        raise UsageError(f"cannot write {str(args.output)!r}: {exc.strerror}") from None
    print(f"{count} failed email(s) written to {args.output}", file=sys.stderr)
    return 0


async def _enqueue(args: argparse.Namespace) -> int:
    from worker.queue.runner import enqueue

    logs.configure(args.log_format)
    if not is_redis_url(args.url):
        raise UsageError(f"not a Redis URL: {args.url!r} (use redis://HOST:PORT/DB)")
    source = open_source(args.file, args.format)
    where = StreamOptions(url=args.url, stream=args.stream).where
    summary = await enqueue(source, args.url, args.stream, where)
    print(json.dumps(summary))
    return EXIT_INCOMPLETE if summary["rejected"] else 0


async def _emulator(args: argparse.Namespace) -> int:
    from worker.emulator import Emulator, Faults

    logs.configure(args.log_format)
    log = structlog.get_logger("worker.emulator")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if not args.period > 0:
        raise UsageError("--period must be a positive number of seconds")
    faults = Faults(
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        error_after_rate=args.error_after_rate,
        drop_after_rate=args.drop_after_rate,
        max_batch=args.max_batch,
    )
    rates = (args.error_rate, args.drop_rate, args.slow_rate, args.error_after_rate,
             args.drop_after_rate)  # fmt: skip
    if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
        raise UsageError("fault rates must be between 0 and 1 and add up to at most 1")
    emulator = Emulator(
        api_key=args.api_key,
        app_key=args.app_key,
        limit=args.limit,
        period=args.period,
        faults=faults,
        seed=args.seed,
    )
    try:
        await emulator.start(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
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
