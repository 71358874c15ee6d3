"""The emulated service's data: dashboards, faults, the rate window, the request log."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from worker.errors import UsageError

INVITATION_PATH = "/api/v1/dashboard/public/{token}/invitation"
RATELIMIT_NAME = "dashboard_public_invitation"
#: How the emulator reports its rate limit (see ``Emulator.ratelimit_headers``).
RATELIMIT_HEADERS = ("standard", "none", "nonsense")
NONSENSE_HEADERS = {
    "X-RateLimit-Limit": "0",
    "X-RateLimit-Period": "abc",
    "X-RateLimit-Remaining": "-3",
    "X-RateLimit-Reset": "-5",
}
#: The API's paths: a shared dashboard, and its invitations.
_API = re.compile(r"/api/v1/dashboard/public/[A-Za-z0-9_-]+(?:/invitation)?")
#: Faults that can be scripted with :meth:`Emulator.script`. ``*-after`` faults strike after
#: the invitations were created; ``slow`` answers late but creates them all the same, as a
#: server that does not notice its client hung up.
FAULTS = ("503", "502-html", "429", "drop", "slow", "502-after", "drop-after")


@dataclass
class Faults:
    """Random fault rates (0..1) applied to each invitation POST."""

    #: 503 before anything is created.
    error_rate: float = 0.0
    #: Connection dropped before anything is created.
    drop_rate: float = 0.0
    #: Answer after ``slow_seconds`` (the invitations are created then, client or not).
    slow_rate: float = 0.0
    slow_seconds: float = 5.0
    #: 502 after the invitations were created.
    error_after_rate: float = 0.0
    #: Connection dropped after the invitations were created.
    drop_after_rate: float = 0.0
    #: Refuse lists longer than this with a 400 naming no address, as a service might for an
    #: oversized body.
    max_batch: int | None = None
    #: Whether that 400 names the maximum ("max 20"); without it the worker must search.
    name_max_batch: bool = True
    #: Whether a 400 for addresses off the share list names them (the real message format
    #: is not documented; without names the worker must bisect).
    name_refused: bool = True

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.drop_rate, self.slow_rate, self.error_after_rate,
                 self.drop_after_rate)  # fmt: skip
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            raise UsageError("fault rates must be between 0 and 1 and add up to at most 1")

    def pick(self, roll: float) -> str | None:
        """The fault a uniform ``roll`` in [0, 1) falls on, by the rates; None for none."""
        for name, rate in (
            ("drop", self.drop_rate),
            ("503", self.error_rate),
            ("slow", self.slow_rate),
            ("502-after", self.error_after_rate),
            ("drop-after", self.drop_after_rate),
        ):
            if roll < rate:
                return name
            roll -= rate
        return None


@dataclass(frozen=True, slots=True)
class Logged:
    """One request as the emulator saw it."""

    method: str
    token: str
    status: int
    emails: int
    list_form: bool
    at: float
    path: str = ""


class RequestLog:
    """Records a request's outcome when its response is returned."""

    def __init__(
        self,
        into: list[Logged],
        method: str,
        token: str,
        clock: Callable[[], float],
        path: str,
    ) -> None:
        self.into, self.method, self.token, self.clock = into, method, token, clock
        self.path = path
        self.emails, self.list_form = 0, False

    def __call__(self, response: web.StreamResponse) -> web.StreamResponse:
        self.into.append(
            Logged(
                self.method, self.token, response.status, self.emails, self.list_form,
                self.clock(), self.path,
            )
        )  # fmt: skip
        return response


class RateWindow:
    """The emulated limit: a calendar-aligned fixed-window counter and its headers.

    ``headers`` is how the limit is reported: ``standard``; ``none`` (the limit still
    holds, without headers); ``nonsense`` (Limit 0, Period abc, Remaining -3, Reset -5).
    """

    def __init__(
        self, limit: int | None, period: float, headers: str, clock: Callable[[], float]
    ) -> None:
        if limit is not None and limit < 1:
            raise UsageError("--limit must be at least 1")
        if not period > 0:
            raise UsageError("--period must be a positive number of seconds")
        if headers not in RATELIMIT_HEADERS:
            raise UsageError(f"--ratelimit-headers must be one of {', '.join(RATELIMIT_HEADERS)}")
        self.limit, self.period, self.headers = limit, period, headers
        self._clock = clock
        self._window = (-1, 0)  # (window index, requests counted in it)

    def count(self) -> tuple[bool, dict[str, str]]:
        """Count one request in the current window: (over the limit, the headers to send)."""
        over, headers = self._count()
        if self.headers == "none":
            return over, {}
        if self.headers == "nonsense":
            return over, dict(NONSENSE_HEADERS)
        return over, headers

    def _count(self) -> tuple[bool, dict[str, str]]:
        if self.limit is None:
            return False, {}
        now = self._clock()
        index = math.floor(now / self.period)
        used = (self._window[1] if self._window[0] == index else 0) + 1
        self._window = (index, used)
        end = (index + 1) * self.period
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Period": f"{self.period:g}",
            "X-RateLimit-Remaining": str(max(0, self.limit - used)),
            "X-RateLimit-Reset": str(int(end - now)),
            "X-RateLimit-Name": RATELIMIT_NAME,
        }
        return used > self.limit, headers


def parse_body(raw: bytes) -> tuple[list[str] | None, bool]:
    """The emails of an invitation body (object or list form); ``None`` if malformed."""
    try:
        data = msgspec.json.decode(raw).get("data")
    except (ValueError, AttributeError):  # not JSON (or not UTF-8), or not an object
        return None, False
    list_form = isinstance(data, list)
    items = data if list_form else [data]
    emails = []
    for item in items:
        if not isinstance(item, dict) or item.get("type") != "public_dashboard_invitation":
            return None, list_form
        email = (item.get("attributes") or {}).get("email")
        if not isinstance(email, str):
            return None, list_form
        emails.append(email)
    return emails, list_form


def summarize(requests: list[Logged], invited: Counter[tuple[str, str]]) -> dict[str, object]:
    """Counts for people and benchmarks: requests by status, emails created, largest list."""
    posts = [r for r in requests if r.method == "POST"]
    return {
        "requests": len(requests),
        "posts": len(posts),
        "by_status": dict(Counter(str(r.status) for r in requests)),
        "by_method": dict(Counter(r.method for r in requests)),
        "rate_limited": sum(1 for r in requests if r.status == 429),
        "invitations": sum(invited.values()),
        "duplicates": sum(n - 1 for n in invited.values() if n > 1),
        "max_list": max((r.emails for r in posts), default=0),
        "non_list_posts": sum(1 for r in posts if not r.list_form),
        # Requests to any path but the API's (a dashboard and its invitations).
        "other_paths": sorted({r.path for r in requests if not _API.fullmatch(r.path)})[:20],
    }
