"""The emulated service's data: dashboards, faults, the request log, the answer shape."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

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
OUTSIDE_DOMAIN = "outside.example"
_INVITATION = re.compile(r"/api/v1/dashboard/public/[A-Za-z0-9_-]+/invitation")
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
    #: Whether a 400 for addresses off the share list names them (the real message format
    #: is not documented; without names the worker must bisect).
    name_refused: bool = True

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.drop_rate, self.slow_rate, self.error_after_rate,
                 self.drop_after_rate)  # fmt: skip
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            raise UsageError("fault rates must be between 0 and 1 and add up to at most 1")


@dataclass
class Dashboard:
    """A shared dashboard: its share list (``None``: the sandbox rule) and invitations."""

    token: str
    share_list: set[str] | None = None
    invitations: list[tuple[str, float]] = field(default_factory=list)

    def allows(self, email: str) -> bool:
        if self.share_list is None:
            return not email.lower().endswith("@" + OUTSIDE_DOMAIN)
        return email.lower() in self.share_list


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


def invitation(token: str, email: str, created: float) -> dict[str, Any]:
    at = datetime.fromtimestamp(created, UTC)
    return {
        "type": "public_dashboard_invitation",
        "attributes": {
            "email": email,
            "share_token": token,
            "created_at": at.isoformat(),
            "invitation_expiry": (at + timedelta(hours=1)).isoformat(),
            "has_session": False,
            "session_expiry": None,
        },
    }
