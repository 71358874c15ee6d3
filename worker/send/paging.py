"""Reading a token's invitation listing page by page, to its end.

One reader for both who reads listings: the dashboard check and reconciliation
(:mod:`worker.send.reconcile`, into compact state) and ``--prune``'s survey
(:mod:`worker.send.prune`, the addresses only). What tells a listing's end, and a listing
that moved under it, is the same for both and reads on its own here.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from worker.errors import ListingMoved, TokenNotFound, UnexpectedResponse
from worker.send.listed import Listed
from worker.send.replies import Listing

log = structlog.get_logger("worker.reconcile")

T = TypeVar("T")

#: Invitations asked for per page (``--list-page-size``; the service may honor fewer).
PAGE_SIZE = 100
#: Pages after which a listing that has not ended is given up as unreadable (a service
#: ignoring page_number would repeat its first page forever).
MAX_PAGES = 100_000
#: Readings of one listing from its start, when it changes while it is read.
LIST_ATTEMPTS = 3
#: What tells one listed invitation from another when pages are compared.
_IDENTITY = operator.attrgetter("email", "created_at")


@dataclass(frozen=True, slots=True)
class Moved:
    """A reading found its listing moved while it was read: ``why`` says what showed it."""

    why: str


async def read_settled(
    token: str,
    once: Callable[[], Awaitable[T | Moved]],
    *,
    event: str,
    again: str,
    giving_up: str,
    consequence: str,
) -> T:
    """What ``once`` (one reading from the listing's start) makes of ``token``'s listing,
    read again while it moved, at most :data:`LIST_ATTEMPTS` times; then
    :class:`ListingMoved` saying ``consequence``. Each move is logged as ``event``, its
    action ``again`` (or, the last time, ``giving_up``)."""
    why = ""
    for attempt in range(1, LIST_ATTEMPTS + 1):
        result = await once()
        if not isinstance(result, Moved):
            return result
        why = result.why
        log.warning(event, token=token, attempt=attempt, why=why,
                    action=again if attempt < LIST_ATTEMPTS else giving_up)  # fmt: skip
    raise ListingMoved(f"the invitation list kept changing while it was read ({why}), "
                       f"{LIST_ATTEMPTS} times: {consequence}")  # fmt: skip


@dataclass(slots=True)
class Reading:
    """How one reading of a listing went, kept up to date as it goes (so a reading that
    fails or is stopped still tells what it asked for)."""

    #: Pages requested.
    pages: int = 0
    #: Entries taken (each once, though pages of another size may repeat some).
    read: int = 0
    #: The service's 404 message when the token has no shared dashboard (nothing listed).
    gone: str | None = None


async def read_pages(
    token: str,
    add: Callable[[Sequence[Listed]], object],
    fetch: Callable[[str, int, int], Awaitable[Listing]],
    page_size: int,
    reading: Reading,
    *,
    events: tuple[str, str] = ("reconcile.listed", "reconcile.not_found"),
) -> str | None:
    """Read ``token``'s listing, each page of ``page_size`` by ``fetch`` (token, page
    number, size), handing ``add`` the entries not seen before, page by page; what shows
    the listing moved meanwhile, or None (``reading`` says how far it went, ``gone`` a
    404 on its first page). ``events`` name the log events of a listing read, and of a 404.

    Pages are offsets into a list that others may change: invitations revoked before
    the offset move later entries onto pages already read, and those would never be
    seen (then invited again). So ``meta.page.total_count`` must not go down from page
    to page, an empty page comes only at that total, a page never repeats an earlier
    one, and a 404 comes on the first page only; anything else is a listing that moved
    (or a service that does not honor ``page_number``), to be read again. A total that
    grows is taken for new invitations; a revocation hidden by them, or a reordered list,
    goes unseen (docs/who-gets-invited.md says what this cannot see).

    The end is ``total_count`` entries, or an empty page. A page shorter than asked is
    not the end: the service may honor a smaller size than the one asked for, so the
    listing goes on at that size. ``page_number`` counts pages of the size asked, so
    after a change of size the next page starts from the entries read so far, and any
    of them the page repeats are passed over (a page holding none but those: a smaller
    size again, not an end).
    """
    size = page_size
    seen: set[int] = set()  # what every page held
    total: int | None = None
    while True:
        if reading.pages >= MAX_PAGES:
            # Not an end: taking it for one could invite again whoever is further on.
            raise UnexpectedResponse(f"the invitation list did not end after {MAX_PAGES:,} "
                                     f"pages ({reading.read:,} invitations read)")  # fmt: skip
        number, skip = divmod(reading.read, size)
        try:
            result = await fetch(token, number, size)
        except TokenNotFound as exc:  # the dashboard is gone: nothing of ours can exist
            reading.pages += 1
            if reading.read:
                return f"page {number} answered 404 after {reading.read:,} were listed"
            reading.gone = exc.message
            log.info(events[1], token=token, pages=reading.pages,
                     message=exc.message)  # fmt: skip
            return None
        reading.pages += 1
        if result.total_count is not None:
            # More is taken for new invitations (sends go on meanwhile); fewer may have
            # moved some past us (see docs/who-gets-invited.md for what is not seen).
            if total is not None and result.total_count < total:
                return f"total_count went down from {total:,} to {result.total_count:,}"
            total = result.total_count
        page = result.invitations
        if not page:  # an empty page: the end, unless the total says more
            if total is not None and reading.read < total:
                return f"page {number} was empty after {reading.read:,} of {total:,}"
            break
        fresh = page[skip:]
        if not fresh:
            # Shorter than the entries already read ahead of it: not an end either, but a
            # smaller size honored (a service whose cap varies from page to page). The
            # next page, at this size, starts past the last entry read.
            size = len(page)
            continue
        # Two pages holding the same invitations (address and creation time, in the
        # same order) are one page served twice: page_number is not honored, or as
        # many invitations were created ahead meanwhile; counting on would take the
        # page for the rest of the listing. Their first and last entries tell: two
        # pages of one listing never share both.
        held = hash((len(page), _IDENTITY(page[0]), _IDENTITY(page[-1])))
        if held in seen:
            return (f"page {number} repeated an earlier page: page_number is not honored, "
                    "or invitations were created meanwhile")  # fmt: skip
        seen.add(held)
        add(fresh)
        reading.read += len(fresh)
        # Past a total that says less than was read, the total is stale or wrong: on
        # to an empty page instead.
        if total == reading.read:
            break
        if len(page) != size:
            size = len(page)  # the size the service honors
    log.info(events[0], token=token, invitations=reading.read,
             pages=reading.pages, page_size=size)  # fmt: skip
    return None
