"""``run``'s "who is invited" options, and the values they parse: durations (``--resend-after``,
``--access-expires``) and the removal cap (``--prune-max``).

The group that decides whom a run serves, skips, adds and removes, kept beside the parsers
only it uses; the other groups of ``run`` are in :mod:`worker.cli.run_options`.
"""

from __future__ import annotations

import argparse
import re

from worker.config import PruneMax
from worker.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


#: A number as a person writes one: ASCII digits, a decimal point at most (float() would
#: also take 1e3, 1_000 and other scripts' digits).
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?|\.[0-9]+")
#: The shortest --access-expires: access ending sooner would end before the invitation is
#: even read (and under a second, before the request lands).
MIN_ACCESS = 60.0


def duration(text: str) -> float:
    """``90m``, ``12h``, ``7d`` (or plain seconds) as seconds."""
    value, unit = text.strip(), "s"
    if value and value[-1].lower() in _UNITS:
        value, unit = value[:-1], value[-1].lower()
    if not _NUMBER.fullmatch(value):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90m, 12h, 7d)")
    seconds = float(value) * _UNITS[unit]
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return seconds


def expiry(text: str) -> float:
    """``--access-expires``: a duration with its unit (``7d``, ``12h``, ``90m``); a bare
    number would be seconds, which nobody granting access means."""
    last = text.strip()[-1:]
    if not last:
        raise argparse.ArgumentTypeError(
            "--access-expires is empty: give a duration with its unit (e.g. 7d, 12h, 90m)"
        )
    if last.isdigit() or last == ".":
        raise argparse.ArgumentTypeError(
            f"give --access-expires a unit: {text!r} would be seconds (e.g. 7d, 12h, 90m)"
        )
    if last.lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"--access-expires {text!r}: {last!r} is not a unit; use s, m, h or d "
            "(e.g. 7d, 12h, 90m; a year is 365d)"
        )
    seconds = duration(text)
    if seconds < MIN_ACCESS:
        raise argparse.ArgumentTypeError(
            f"--access-expires {text!r} would end access within a minute, before the "
            "invitation is even read: give at least 1m (e.g. 7d, 12h, 90m)"
        )
    return seconds


def prune_max(text: str) -> PruneMax:
    """``10%``, ``100%`` or a count, for ``--prune-max``."""
    try:
        return PruneMax.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_who_options(r: argparse.ArgumentParser) -> None:
    """Who is invited: skip the invited, or not; add invitees."""
    g = r.add_argument_group("who is invited")
    g.add_argument(
        "--resend",
        action="store_true",
        help="send to everyone, even those the service lists as already invited or in a "
        "session (default: skip them)",
    )
    g.add_argument(
        "--resend-after",
        type=duration,
        default=None,
        metavar="DURATION",
        help="invite again those whose last invitation is older than this and who have no "
        "open session; e.g. --resend-after 7d (or 90m, 12h)",
    )
    g.add_argument(
        "--list-page-size",
        type=int,
        default=100,
        metavar="N",
        help="invitations asked for per page when listing a dashboard's (a service that "
        "honors fewer is read at its size, to the end); e.g. --list-page-size 500",
    )
    g.add_argument(
        "--add-invitees",
        action="store_true",
        help="add addresses the dashboard does not allow to its invitees first (read, merge, "
        "write, read back; nothing existing is removed or changed), then invite them",
    )
    g.add_argument(
        "--access-expires",
        type=expiry,
        default=None,
        metavar="DURATION",
        help="with --add-invitees: the invitees it adds get access until now + DURATION "
        "(existing invitees keep theirs); e.g. --access-expires 7d (or 12h)",
    )
    g.add_argument(
        "--prune",
        action="store_true",
        help="make each dashboard the list names match it: once everything is sent, remove "
        "whom the list no longer names (invitee and share_list entries, invitations, "
        "sessions); a file only",
    )
    g.add_argument(
        "--prune-max",
        type=prune_max,
        default=None,
        metavar="SHARE|N",
        help="with --prune: the most one run may remove of a dashboard's people; a dashboard "
        "over it is left whole and the run exits 1 (default 10%%); e.g. --prune-max 25 or "
        "--prune-max 100%%",
    )
