"""What the client returns: one typed answer per kind of request, and the list-form body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from worker.errors import RateLimitInfo
from worker.outcome import Invitation
from worker.send.answers import json_or_none
from worker.send.listed import Listed, SharedDashboard


@dataclass(frozen=True, slots=True)
class Sent:
    """A 2xx answer: which invitations the service says it created."""

    http_status: int
    invitations: list[Invitation]
    ratelimit: RateLimitInfo


@dataclass(frozen=True, slots=True)
class Revoked:
    """A 2xx answer to a revocation (its body is empty)."""

    http_status: int
    ratelimit: RateLimitInfo


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of a token's invitations (the fields decisions and records need)."""

    invitations: list[Listed]
    total_count: int | None
    ratelimit: RateLimitInfo


@dataclass(frozen=True, slots=True)
class Validated:
    """The answer to ``GET /api/v1/validate``: its status."""

    http_status: int
    ratelimit: RateLimitInfo


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The shared dashboard a token names: what the worker reads of it, and the whole object."""

    dashboard: SharedDashboard
    ratelimit: RateLimitInfo
    body: bytes

    @property
    def raw(self) -> dict[str, Any]:
        """The whole object, decoded on demand (only ``--add-invitees`` writes it back)."""
        doc = json_or_none(self.body)
        return doc if isinstance(doc, dict) else {}


def list_form(emails: list[str]) -> bytes:
    """The list-form body of an invitation request (POST or DELETE)."""
    items = [{"type": "public_dashboard_invitation", "attributes": {"email": e}} for e in emails]
    return msgspec.json.encode({"data": items})
