"""Settling unknown outcomes by listing what the service actually created.

The invitation API has no idempotency key. When a POST timed out, lost its connection or
got a 5xx, it may or may not have created the invitations. The only way to know is to list
the token's invitations (``GET .../invitation``, paginated) and look for each address with
an invitation created at or after the moment the request was sent (minus a clock-skew
allowance). Those are *sent*; only the rest may be sent again.
"""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from worker.clock import Clock
from worker.errors import TokenNotFound
from worker.outcome import Invitation, Outcome, Status
from worker.send.client import InvitationClient, Listing
from worker.send.pacing import Pacer
from worker.send.retry import RetryPolicy, paced_call

log = structlog.get_logger("worker.reconcile")

PAGE_SIZE = 100
#: Safety stop for a listing whose total_count never comes true.
MAX_PAGES = 100_000


@dataclass(slots=True)
class TokenListing:
    """Every invitation of a token, as listed from ``started`` on."""

    started: float
    #: lower-cased email -> the newest invitation for it (epoch of creation, invitation)
    newest: dict[str, tuple[float, Invitation]] = field(default_factory=dict)
    #: lower-cased email -> when its open session ends (epoch)
    sessions: dict[str, float] = field(default_factory=dict)


def created_epoch(invitation: Invitation) -> float | None:
    """``created_at`` as epoch seconds; None when absent or unreadable."""
    return iso_epoch(invitation.created_at)


def iso_epoch(value: str | None) -> float | None:
    """An ISO 8601 time from the API as epoch seconds; None when absent or unreadable."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def found_outcome(
    token: str,
    emails: list[str],
    found: dict[str, Invitation],
    *,
    started_at: float,
    finished_at: float,
    attempts: int = 0,
    http_status: int | None = None,
    clears: tuple[str, ...] = (),
) -> Outcome | None:
    """The ``emails`` a listing ``found``, as one ``sent`` outcome marked ``reconciled``.

    None when none was found; the caller sends those again. ``clears`` are the journal
    intents this outcome settles, cleared only once it is recorded.
    """
    created = [e for e in emails if e.lower() in found]
    if not created:
        return None
    return Outcome(
        token, created, Status.SENT, http_status, attempts, started_at, finished_at,
        invitations=[found[e.lower()] for e in created], reconciled=True, clears=clears,
    )  # fmt: skip


class Reconciler:
    """Lists a token's invitations, sharing one listing between concurrent questions."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        clock: Clock,
        *,
        retry: RetryPolicy,
        skew: float,
        rng: random.Random,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._clock = clock
        self.retry = retry
        self._skew = skew
        self.rng = rng
        #: The run's stop: a listing's pacing and backoff end when it is set (``Stopped``).
        self.stop = stop
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[str, TokenListing] = {}
        #: GET requests made (for the summary).
        self.requests = 0

    async def created_since(
        self, token: str, emails: list[str], since: float, not_before: float
    ) -> dict[str, Invitation]:
        """Which of ``emails`` have an invitation created at or after ``since`` (minus skew).

        The listing used starts no earlier than ``not_before``, so the request in question
        had time to land. Returns lower-cased email -> invitation. Raises :class:`SendError`
        when the list cannot be read (the outcome then stays unknown).
        """
        listing = await self.listing(token, not_before)
        threshold = since - self._skew
        found: dict[str, Invitation] = {}
        for email in emails:
            entry = listing.newest.get(email.lower())
            if entry is not None and entry[0] >= threshold:
                found[email.lower()] = entry[1]
        return found

    async def listing(self, token: str, not_before: float) -> TokenListing:
        """The token's invitations, listed no earlier than ``not_before`` (all pages).

        One listing is shared between concurrent questions about the same token.
        """
        lock = self._locks.setdefault(token, asyncio.Lock())
        async with lock:
            listing = self._cache.get(token)
            if listing is None or listing.started < not_before:
                listing = await self._list(token)
                self._cache[token] = listing
        return listing

    async def _list(self, token: str) -> TokenListing:
        listing = TokenListing(started=self._clock.time())
        seen = 0
        for page in range(MAX_PAGES):
            result = await self._page(token, page)
            if result is None:  # the dashboard is gone: nothing of ours can exist
                break
            for item in result.invitations:
                created = created_epoch(item)
                key = item.email.lower()
                if created is not None and created >= listing.newest.get(key, (-1.0,))[0]:
                    listing.newest[key] = (created, item)
            for email, expiry in result.sessions.items():
                ends = iso_epoch(expiry)
                if ends is not None:
                    listing.sessions[email] = max(ends, listing.sessions.get(email, ends))
            seen += len(result.invitations)
            if len(result.invitations) < PAGE_SIZE or (
                result.total_count is not None and seen >= result.total_count
            ):
                break
        log.info("reconcile.listed", token=token, invitations=seen, pages=page + 1)
        return listing

    async def _page(self, token: str, page: int) -> Listing | None:
        """One page, retried by the run's policy; None when the dashboard is gone."""
        try:
            return await paced_call(
                functools.partial(self._client.list_invitations, token, page, PAGE_SIZE),
                self._pacer, self.retry, self._clock, self.rng, self._count, stop=self.stop,
            )  # fmt: skip
        except TokenNotFound:
            return None  # nothing of ours can exist there

    def _count(self) -> None:
        self.requests += 1
