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
from collections import OrderedDict
from collections.abc import Collection

import structlog

from worker.clock import Clock
from worker.outcome import Invitation, Outcome, Status
from worker.send.client import InvitationClient
from worker.send.compact import ListingBuilder, TokenListing, iso_epoch
from worker.send.keyed import KeyedLocks
from worker.send.paced import Tally, paced_call
from worker.send.pacing import Pacer
from worker.send.paging import PAGE_SIZE, Moved, Reading, read_pages, read_settled
from worker.send.replies import Listing
from worker.send.retry import RetryPolicy
from worker.validate import address_key

__all__ = ["Reconciler", "TokenListing", "created_epoch", "found_outcome", "iso_epoch"]

log = structlog.get_logger("worker.reconcile")

#: Listings kept for reuse by later questions about the same token. They are compact, but
#: a long-lived queue worker meets ever more tokens: the least recently used go.
CACHED_LISTINGS = 32
#: Addresses those listings may hold in all (24 bytes each): a few tokens with millions of
#: invitations would otherwise keep what the service holds, not what the input asks.
CACHED_ENTRIES = 1_000_000


def created_epoch(invitation: Invitation) -> float | None:
    """``created_at`` as epoch seconds; None when absent or unreadable."""
    return iso_epoch(invitation.created_at)


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
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._clock = clock
        self.retry = retry
        self._skew = skew
        self.rng = rng
        #: The run's stop: a listing's pacing and backoff end when it is set (``Stopped``).
        self.stop = stop
        self.page_size = page_size
        self._locks = KeyedLocks()
        self._cache: OrderedDict[str, TokenListing] = OrderedDict()
        #: Keys asked about per token, not yet listed: the next listing keeps their
        #: invitations, so concurrent questions share it.
        self._wanted: dict[str, set[int]] = {}
        #: GET requests made (for the summary).
        self.requests = 0
        #: Pages of invitations read, over every listing.
        self.pages = 0
        #: The listings' 429s and retries.
        self.tally = Tally()

    @property
    def held(self) -> int:
        """How many tokens' listings are kept for reuse (at most :data:`CACHED_LISTINGS`)."""
        return len(self._cache)

    def expect(self, token: str, emails: list[str]) -> None:
        """``emails`` of ``token`` will be asked about: the next listing of the token keeps
        their invitations too, so questions asked one after another share it."""
        self._wanted.setdefault(token, set()).update(address_key(e) for e in emails)

    async def created_since(
        self, token: str, emails: list[str], since: float, not_before: float
    ) -> dict[str, Invitation]:
        """Which of ``emails`` have an invitation created at or after ``since`` (minus skew).

        The listing used starts no earlier than ``not_before``, so the request in question
        had time to land. Returns lower-cased email -> invitation. Raises :class:`SendError`
        when the list cannot be read (the outcome then stays unknown).
        """
        keys = [address_key(e) for e in emails]
        listing = await self.listing(token, not_before, keys)
        threshold = since - self._skew
        found: dict[str, Invitation] = {}
        for email, key in zip(emails, keys, strict=True):
            entry = listing.invitations.get(key)
            if entry is not None and entry[0] >= threshold:
                found[email.lower()] = entry[1]
        return found

    async def listing(
        self, token: str, not_before: float, wanted: Collection[int] = ()
    ) -> TokenListing:
        """The token's invitations, listed no earlier than ``not_before`` (all pages), with
        the newest invitation of each ``wanted`` key.

        One listing is shared between concurrent questions about the same token.
        """
        if wanted:
            self._wanted.setdefault(token, set()).update(wanted)
        async with self._locks.hold(token):
            listing = self._cache.get(token)
            if (
                listing is None
                or listing.started < not_before
                or not listing.wanted.issuperset(wanted)
            ):
                pending = frozenset(self._wanted.pop(token, ()))
                listing = await self._list(token, pending | frozenset(wanted))
                self._cache[token] = listing
            elif wanted and token in self._wanted:  # answered: no need to keep them next
                self._wanted[token].difference_update(wanted)
                if not self._wanted[token]:
                    del self._wanted[token]
            self._cache.move_to_end(token)  # the most recently used, before any goes
            self._trim()
        return listing

    def _trim(self) -> None:
        """The least recently used listings go, past :data:`CACHED_LISTINGS` or past
        :data:`CACHED_ENTRIES` addresses in all (the latest is kept: it is in use)."""
        cache = self._cache
        entries = sum(len(listing.keys) for listing in cache.values())
        while len(cache) > CACHED_LISTINGS or (entries > CACHED_ENTRIES and len(cache) > 1):
            _, gone = cache.popitem(last=False)
            entries -= len(gone.keys)

    async def _list(self, token: str, wanted: frozenset[int]) -> TokenListing:
        """Every page, to the end of the listing, read again from its start when it
        changed while it was read (at most :data:`LIST_ATTEMPTS` times)."""

        async def once() -> TokenListing | Moved:
            builder, reading = ListingBuilder(self._clock.time(), wanted), Reading()
            try:
                moved = await read_pages(token, builder.add, self._page, self.page_size,
                                         reading)  # fmt: skip
            finally:  # read, even if the listing then failed or the run stopped
                self.pages += reading.pages
            if moved is not None:
                return Moved(moved)
            listing = builder.done()
            listing.pages, listing.gone = reading.pages, reading.gone
            return listing

        return await read_settled(
            token, once, event="reconcile.list_moved",
            again="reading it again from its first page",
            giving_up="sending nobody of this token",
            consequence="who is invited cannot be told, so nobody of this token is sent now; "
            "run again (--resume) once the dashboard's invitations settle",
        )  # fmt: skip

    async def _page(self, token: str, number: int, size: int) -> Listing:
        """One page, retried by the run's policy (``TokenNotFound``: the dashboard is gone)."""
        return await paced_call(
            functools.partial(self._client.list_invitations, token, number, size),
            self._pacer, self.retry, self._clock, self.rng, self._count, stop=self.stop,
            tally=self.tally,
        )  # fmt: skip

    def _count(self) -> None:
        self.requests += 1
