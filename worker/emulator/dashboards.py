"""The emulated shared dashboards: who is allowed, who was invited, who opened a session.

A dashboard has a ``share_type`` (``invite``, ``open``, ``embed``), a ``status``
(``active``, ``paused``), its allow-list — ``invitees`` with an access expiration (None:
never expires) and the older ``share_list`` of plain addresses — and the invitations sent
for it, some of which have an open session.

A dashboard made by the sandbox rule (any token not registered, except ``gone*``) allows
every address except those at ``@outside.example``; such a list cannot be enumerated, so
its GET answers ``invitees`` and ``share_list`` as null, and the worker checks nothing
before it sends.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.errors import UsageError

OUTSIDE_DOMAIN = "outside.example"
SHARE_TYPES = ("invite", "open", "embed")
STATUSES = ("active", "paused")
#: The writable fields a PUT may carry; others are ignored, as the service does.
WRITABLE = ("share_type", "status", "share_list", "invitees", "title", "expiration")


@functools.lru_cache(maxsize=4096)
def _stamps(created: float) -> tuple[str, str]:
    """An invitation's ``created_at`` and ``invitation_expiry`` (an hour later).

    Cached: the invitations of one request share their creation time, and formatting two
    datetimes per address was a third of the emulator's CPU under a benchmark.
    """
    at = datetime.fromtimestamp(created, UTC)
    return at.isoformat(), (at + timedelta(hours=1)).isoformat()


def iso(epoch: float | None) -> str | None:
    """An epoch time as the API writes it (ISO 8601 with an offset), or None."""
    return None if epoch is None else _iso(epoch)


@functools.lru_cache(maxsize=4096)
def _iso(epoch: float) -> str:
    # Cached: a dashboard's invitees mostly share a creation time (those a file or one PUT
    # added), and formatting one per invitee was most of a large dashboard's GET.
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def epoch(value: Any) -> float | None:
    """An ISO 8601 time from a request or seed file as epoch seconds (None if absent)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise UsageError(f"not an ISO 8601 time: {value!r}") from None


@dataclass
class Invitee:
    """An address the dashboard allows, until ``access_expiration`` (None: always)."""

    email: str
    access_expiration: float | None = None
    created_at: float = 0.0


@dataclass
class Dashboard:
    """A shared dashboard: its allow-list (``None``: the sandbox rule) and invitations."""

    token: str
    share_list: set[str] | None = None
    invitations: list[tuple[str, float]] = field(default_factory=list)
    share_type: str = "invite"
    status: str = "active"
    invitees: dict[str, Invitee] | None = None  # lower-cased email -> invitee
    #: lower-cased email -> when its session ends (the invitation link was opened)
    sessions: dict[str, float] = field(default_factory=dict)
    session_duration_in_days: int = 30
    title: str = "Shared dashboard"

    @property
    def sandbox(self) -> bool:
        """Made by the sandbox rule: every address allowed but ``@outside.example``."""
        return self.share_list is None and self.invitees is None

    def allows(self, email: str, now: float = 0.0) -> bool:
        """Whether the service would accept an invitation to ``email`` now."""
        lower = email.lower()
        if self.sandbox:
            return not lower.endswith("@" + OUTSIDE_DOMAIN)
        invitee = (self.invitees or {}).get(lower)
        if invitee is not None and (
            invitee.access_expiration is None or invitee.access_expiration > now
        ):
            return True
        return lower in (self.share_list or set())

    def open_session(self, email: str, now: float) -> None:
        """The person opened the link: a session until ``session_duration_in_days`` later."""
        self.sessions[email.lower()] = now + self.session_duration_in_days * 86400

    def invitation(self, email: str, created: float, now: float) -> dict[str, Any]:
        """One invitation as the API lists it."""
        session = self.sessions.get(email.lower()) if self.sessions else None
        has_session = session is not None and session > now
        created_at, expiry = _stamps(created)
        return {
            "type": "public_dashboard_invitation",
            "attributes": {
                "email": email,
                "share_token": self.token,
                "created_at": created_at,
                "invitation_expiry": expiry,
                "has_session": has_session,
                "session_expiry": iso(session) if has_session else None,
            },
        }

    def as_json(self) -> dict[str, Any]:
        """The shared dashboard object, as GET and PUT answer it."""
        invitees = None
        if self.invitees is not None:
            invitees = [
                {"email": i.email, "access_expiration": iso(i.access_expiration),
                 "last_accessed": None, "created_at": iso(i.created_at)}
                for i in self.invitees.values()
            ]  # fmt: skip
        return {
            "token": self.token,
            "dashboard_id": f"emu-{zlib.crc32(self.token.encode()) % 1000:03d}",
            "dashboard_type": "custom_timeboard",
            "share_type": self.share_type,
            "status": self.status,
            "share_list": None if self.share_list is None else sorted(self.share_list),
            "invitees": invitees,
            "session_duration_in_days": self.session_duration_in_days,
            "title": self.title,
            "expiration": None,
        }

    def update(self, body: Any, now: float) -> None:
        """Apply a PUT body (the writable fields it carries replace the current ones)."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        if "share_type" in body:
            if body["share_type"] not in SHARE_TYPES:
                raise ValueError(f"share_type must be one of {', '.join(SHARE_TYPES)}")
            self.share_type = body["share_type"]
        if "status" in body:
            if body["status"] not in STATUSES:
                raise ValueError(f"status must be one of {', '.join(STATUSES)}")
            self.status = body["status"]
        if "share_list" in body:
            self.share_list = _addresses(body["share_list"])
        if "invitees" in body:
            self.invitees = _invitees(body["invitees"], now, self.invitees or {})
        if isinstance(body.get("title"), str):
            self.title = body["title"]


def _addresses(value: Any) -> set[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise ValueError("share_list must be a list of addresses")
    return {e.lower() for e in value}


def _invitees(
    value: Any, now: float, current: dict[str, Invitee] | None = None
) -> dict[str, Invitee] | None:
    """Invitees as a body lists them; one already ``current`` keeps its creation time (the
    service's, whatever a PUT says), a new one is created ``now`` unless the body says."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("invitees must be a list")
    out: dict[str, Invitee] = {}
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("email"), str):
            raise ValueError("each invitee must be an object with an email")
        lower = item["email"].lower()
        kept = (current or {}).get(lower)
        created = kept.created_at if kept is not None else epoch(item.get("created_at"))
        out[lower] = Invitee(
            item["email"], epoch(item.get("access_expiration")), now if created is None else created
        )
    return out


#: What ``--sandbox`` serves for the sample input's tokens, so a first run shows every
#: outcome: sent, skipped (invited before, in a session), refused, and a missing token.
SANDBOX: list[dict[str, Any]] = [
    {
        "token": "fasjyydbcgwwc2uc-3dde636009128a6f937e880f67a0ad04",
        "title": "Checkout latency",
        "invitees": [
            {"email": f"{name}@example.com"}
            for name in ("ada", "grace", "linus", "margaret", "alan")
        ],
        "sessions": ["linus@example.com"],
    },
    {
        "token": "k9x2mmq7rt5vbc1a-77c1e0f4a2b94e6d8f0a1b2c3d4e5f60",
        "title": "Payments SLOs",
        "invitees": [{"email": "ken@example.com"}, {"email": "barbara@example.com"}],
        "invited": ["ken@example.com"],
    },
]


def load_dashboards(path: Path, now: float) -> list[Dashboard]:
    """Dashboards from a JSON file: a list of objects shaped like the API's, plus
    ``sessions`` (addresses with an open session) and ``invited`` (addresses already
    invited), so a rehearsal can start from a dashboard that has a history."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the dashboards file {str(path)!r}: {exc}") from None
    return dashboards_from(items, now, str(path))


def dashboards_from(items: Any, now: float, where: str = "the dashboards") -> list[Dashboard]:
    """Dashboards from parsed JSON (see :func:`load_dashboards`)."""
    if not isinstance(items, list):
        raise UsageError(f"{where!r} must hold a JSON list of dashboards")
    boards = []
    for number, item in enumerate(items, 1):
        try:
            if not isinstance(item, dict) or not isinstance(item.get("token"), str):
                raise ValueError("needs a string token")
            board = Dashboard(item["token"], share_list=set(), invitees={})
            board.update({k: item[k] for k in WRITABLE if k in item}, now)
            invited = {str(e).lower() for e in item.get("invited", [])}
            for email in item.get("invited", []):
                board.invitations.append((email, now - 3600))
            for email in item.get("sessions", []):
                if str(email).lower() not in invited:  # in a session: invited, once
                    board.invitations.append((email, now - 86400))
                board.open_session(email, now - 86400)
        except (ValueError, UsageError) as exc:
            raise UsageError(f"{where!r}, dashboard {number}: {exc}") from None
        boards.append(board)
    return boards
