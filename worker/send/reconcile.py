"""Settling unknown outcomes by listing what the service actually created.

The invitation API has no idempotency key. When a POST timed out, lost its connection or
got a 5xx, it may or may not have created the invitations. The only way to know is to list
the token's invitations (``GET .../invitation``, paginated) and look for each address with
an invitation created at or after the moment the request was sent (minus a clock-skew
allowance). Those are *sent*; only the rest may be sent again.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from worker.clock import Clock
from worker.errors import FatalError, RateLimited, RetryableError, SendError, TokenNotFound
from worker.report import Invitation, Report
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer, backoff_delay

log = structlog.get_logger("worker.reconcile")

PAGE_SIZE = 100
#: Safety stop for a listing whose total_count never comes true.
MAX_PAGES = 100_000


@dataclass(slots=True)
class _Listing:
    started: float
    #: lower-cased email -> the newest invitation for it
    newest: dict[str, tuple[float, Invitation]] = field(default_factory=dict)


def created_epoch(invitation: Invitation) -> float | None:
    """``created_at`` as epoch seconds; None when absent or unreadable."""
    value = invitation.created_at
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def record_created(
    report: Report,
    token: str,
    emails: list[str],
    found: dict[str, Invitation],
    *,
    started_at: float,
    finished_at: float,
    attempts: int = 0,
    http_status: int | None = None,
) -> list[str]:
    """Record the ``emails`` a listing ``found`` as one ``sent`` batch marked ``reconciled``.

    Returns them (in input order); the caller sends the others again.
    """
    created = [e for e in emails if e.lower() in found]
    if created:
        report.batch(
            token=token, emails=created, status="sent", http_status=http_status,
            attempts=attempts, error=None, started_at=started_at, finished_at=finished_at,
            invitations=[found[e.lower()] for e in created],
            reconciled=True,
        )  # fmt: skip
    return created


class Reconciler:
    """Lists a token's invitations, sharing one listing between concurrent questions."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        clock: Clock,
        *,
        max_attempts: int,
        backoff: tuple[float, float],
        skew: float,
        rng: random.Random,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._clock = clock
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._skew = skew
        self._rng = rng
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[str, _Listing] = {}
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
        lock = self._locks.setdefault(token, asyncio.Lock())
        async with lock:
            listing = self._cache.get(token)
            if listing is None or listing.started < not_before:
                listing = await self._list(token)
                self._cache[token] = listing
        threshold = since - self._skew
        found: dict[str, Invitation] = {}
        for email in emails:
            entry = listing.newest.get(email.lower())
            if entry is not None and entry[0] >= threshold:
                found[email.lower()] = entry[1]
        return found

    async def _list(self, token: str) -> _Listing:
        listing = _Listing(started=self._clock.time())
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
            seen += len(result.invitations)
            if len(result.invitations) < PAGE_SIZE or (
                result.total_count is not None and seen >= result.total_count
            ):
                break
        log.info("reconcile.listed", token=token, invitations=seen, pages=page + 1)
        return listing

    async def _page(self, token: str, page: int) -> Any:
        attempts = 0
        while True:
            sent_at = await self._pacer.acquire()
            self.requests += 1
            try:
                result = await self._client.list_invitations(token, page, PAGE_SIZE)
            except FatalError:
                self._pacer.cancel()
                raise
            except RateLimited as exc:
                self._pacer.release(sent_at, exc.ratelimit, limited=True)
                continue
            except TokenNotFound as exc:
                self._pacer.release(sent_at, exc.ratelimit)
                return None
            except SendError as exc:
                self._pacer.release(sent_at, exc.ratelimit)
                attempts += 1
                if not isinstance(exc, RetryableError) or attempts >= self._max_attempts:
                    raise
                await self._clock.sleep(backoff_delay(attempts, *self._backoff, self._rng))
                continue
            self._pacer.release(sent_at, result.ratelimit)
            return result
