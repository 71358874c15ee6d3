"""A run's one :class:`~worker.config.Config`, from its arguments and its environment:
the keys (files or variables), the report's path, how progress shows, the proxy."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from worker import logs
from worker.config import Config, PruneMax
from worker.errors import UsageError
from worker.metrics.target import statsd_target
from worker.send.proxy import env_proxy


def config_from(
    args: argparse.Namespace, api_url: str, api_key: str, app_key: str, *, direct: bool = False
) -> Config:
    """The run's configuration; ``direct``: ignore proxy variables (the sandbox's emulator)."""
    return Config(
        api_url=api_url,
        api_key=api_key,
        app_key=app_key,
        report_path=report_path(args),
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        linger=args.linger,
        rate=args.rate,
        max_attempts=args.max_attempts,
        timeout=args.timeout,
        max_wait=args.max_wait,
        resend=args.resend,
        resend_after=args.resend_after,
        add_invitees=args.add_invitees,
        list_page_size=args.list_page_size,
        access_expires=args.access_expires,
        prune=args.prune,
        prune_max=args.prune_max or PruneMax(),
        resume=args.resume,
        grace=args.grace,
        reconcile_delay=args.reconcile_delay,
        durable_journal=args.fsync,
        progress=progress_mode(args),
        progress_every=args.progress_every,
        statsd=statsd_target(args.statsd, os.environ),
        proxy=None if direct else env_proxy(api_url, os.environ),
    )


#: Where the report goes without --report; a dry run's plan goes beside it, not in it.
DEFAULT_REPORT = Path("invite-report.jsonl")
DEFAULT_PLAN = Path("invite-report.plan.jsonl")


def report_path(args: argparse.Namespace) -> Path:
    """``--report``, or the default for a run or a dry run."""
    if args.report is not None:
        return Path(args.report)
    return DEFAULT_PLAN if getattr(args, "dry_run", False) else DEFAULT_REPORT


def progress_mode(args: argparse.Namespace) -> str:
    """A bar for a person at a terminal; progress events for everything else."""
    return "bar" if watched(args) else "events"


def watched(args: argparse.Namespace) -> bool:
    """A person at a terminal: console logs on a TTY (the bar and the end table show)."""
    return logs.resolve_format(args.log_format, sys.stderr) == "console" and sys.stderr.isatty()


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
