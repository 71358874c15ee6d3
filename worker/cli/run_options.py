"""``run``'s options, in groups: the service, sending, who is invited, planning, operating.

Stream mode's own options are in :mod:`worker.cli.queue`; "who is invited", with the values
it parses, in :mod:`worker.cli.who_options`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from worker.cli.help import add_column_options, add_format, add_log_format
from worker.cli.who_options import add_who_options
from worker.urls import DEFAULT_SITE

RUN_DESCRIPTION = """\
Send the invitations a file (or a Redis Stream) lists: rows are validated, grouped per
dashboard token into list requests, paced to the organization's rate limit, and every
outcome is written to a JSONL report. Keys come from DD_API_KEY and DD_APP_KEY (or the
files DD_API_KEY_FILE / DD_APP_KEY_FILE name). Exit 0: everything went; 1: some rows or
emails did not; 2: a usage error or what can only be a mistake, nothing sent; 3: stopped
before the end by refused keys, a signal or a fault (--resume finishes it)."""

RUN_EXAMPLES = """\
  invite-worker run invites.csv --sandbox                # rehearse: nothing is emailed
  invite-worker run invites.csv --dry-run --assume-limit 100/60
  invite-worker run invites.csv --report /data/report.jsonl
  invite-worker run invites.csv --report /data/report.jsonl --resume   # after a stop
  invite-worker run users.csv --token-column dashboard_token --email-column user_email
  invite-worker run team.csv --add-invitees --prune     # dashboards hold exactly the list
  invite-worker run redis://127.0.0.1:6379/0 --stream invites --until-empty"""


def add_run_options(r: argparse.ArgumentParser) -> None:
    """Everything ``run`` takes but the stream options."""
    r.add_argument(
        "source",
        metavar="SOURCE",
        help="a .csv or .jsonl path, - for stdin, or redis://HOST:PORT/DB (with --stream); "
        "e.g. invites.csv",
    )
    add_format(r)
    add_column_options(r)
    r.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="PATH",
        help="the JSONL report, never the input (default: invite-report.jsonl; for a "
        "--dry-run, invite-report.plan.jsonl, an earlier plan there replaced, so the plan "
        "never blocks the run that follows); e.g. --report /data/report.jsonl",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing report instead of refusing to start (only a file that "
        "reads as a report; never the input)",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --report: skip what was sent, check unknown "
        "outcomes, send the rest",
    )
    add_target_options(r)
    add_sending_options(r)
    add_who_options(r)
    add_planning_options(r)
    add_operating_options(r)


def add_target_options(r: argparse.ArgumentParser) -> None:
    """Where requests go, and with which keys."""
    g = r.add_argument_group("the service")
    g.add_argument(
        "--site",
        default=os.environ.get("DD_SITE") or DEFAULT_SITE,
        help="the Datadog site of the organization (env DD_SITE); e.g. --site datadoghq.eu",
    )
    g.add_argument(
        "--api-url",
        default=None,  # else DD_API_URL: see commands.api_url_given (messages name which)
        metavar="URL",
        help="base URL instead of the site's, without a path (env DD_API_URL): a reverse "
        "proxy or an emulator (an egress proxy comes from HTTPS_PROXY); "
        "e.g. --api-url http://127.0.0.1:8126",
    )
    g.add_argument(
        "--api-key-file",
        type=Path,
        metavar="PATH",
        help="read the API key from this file (else env DD_API_KEY_FILE, else DD_API_KEY); "
        "e.g. --api-key-file /secrets/api-key",
    )
    g.add_argument(
        "--app-key-file",
        type=Path,
        metavar="PATH",
        help="read the application key from this file (else env DD_APP_KEY_FILE, else "
        "DD_APP_KEY); e.g. --app-key-file /secrets/app-key",
    )
    g.add_argument(
        "--sandbox",
        action="store_true",
        help="run against the built-in emulator instead; no keys needed, nothing is emailed",
    )


def add_sending_options(r: argparse.ArgumentParser) -> None:
    """How requests are made: size, concurrency, pace, retries."""
    g = r.add_argument_group("sending")
    g.add_argument(
        "--batch-size",
        type=int,
        default=100,
        metavar="N",
        help="emails per request; e.g. --batch-size 50",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="requests in flight at once; e.g. --concurrency 8",
    )
    g.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="a cap in requests per second, below the service's own limit (default: only "
        "the service's limit); e.g. --rate 2",
    )
    g.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        metavar="N",
        help="attempts per batch for retryable failures; e.g. --max-attempts 8",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds one request may take; e.g. --timeout 60",
    )
    g.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="the longest single wait for the rate limit, in seconds, whatever the "
        "service's headers say; e.g. --max-wait 120",
    )
    g.add_argument(
        "--reconcile-delay",
        type=float,
        default=5.0,
        metavar="S",
        help="after an unknown outcome, seconds to wait before listing what the service "
        "created; e.g. --reconcile-delay 10",
    )
    g.add_argument(
        "--fsync",
        action="store_true",
        help="fdatasync each journal intent before its request (and each --prune "
        "revocation's record before its DELETE): survive power loss too, at one sync per "
        "request",
    )


def add_planning_options(r: argparse.ArgumentParser) -> None:
    """A dry run and its estimate."""
    g = r.add_argument_group("planning")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="read, validate and batch everything, send nothing, print the plan",
    )
    g.add_argument(
        "--preflight",
        action="store_true",
        help="with --dry-run: read each dashboard and list its invitations (GETs only; keys "
        "needed) and say per token what would be sent, skipped and refused",
    )
    g.add_argument(
        "--assume-limit",
        metavar="L/P",
        help="for the dry run's estimate: L requests per P-second window; "
        "e.g. --assume-limit 100/60",
    )


def add_operating_options(r: argparse.ArgumentParser) -> None:
    """Signals, progress, logs and metrics."""
    g = r.add_argument_group("operating")
    g.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish; e.g. --grace 5",
    )
    g.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between progress events when no progress bar is shown; "
        "e.g. --progress-every 60",
    )
    g.add_argument(
        "--statsd",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="send metrics to the Datadog Agent's DogStatsD: HOST:PORT, udp://HOST:PORT or "
        "unix:///path (alone: the Agent's environment, else 127.0.0.1:8125). On by itself "
        "when DD_DOGSTATSD_URL or DD_AGENT_HOST is set; e.g. --statsd datadog-agent:8125",
    )
    g.add_argument(
        "--no-statsd",
        dest="statsd",
        action="store_const",
        const="off",
        help="send no metrics, even if DD_DOGSTATSD_URL or DD_AGENT_HOST is set",
    )
    add_log_format(g)
