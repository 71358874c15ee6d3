"""``--prune`` on the dashboard's side: whom a token's dashboard holds that the list does
not name, and taking exactly those away.

A :class:`Pruner` reads a dashboard (``GET .../public/{token}``) and lists its invitations
to the end (``meta.page.total_count``; a page shorter than asked is not the end), and
finds every address — invitee, ``share_list`` entry, or holder of an invitation or session
— the list does not name for that token. Removing them: their invitee and ``share_list``
entries with one PUT under the discipline of ``--add-invitees`` (:mod:`worker.send.removal`),
then their invitations with list-form DELETEs, batched and paced like the POSTs. Every
step starts from what the service holds now, so running it again finishes what a crash
interrupted and, once done, does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from array import array
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog

from worker.clock import Clock
from worker.errors import TokenNotFound, UnexpectedResponse
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer
from worker.send.paging import MAX_PAGES, PAGE_SIZE
from worker.send.removal import INVITEE, SHARE_LIST, remove_entries
from worker.send.retry import Answered, RetryPolicy, paced_call

log = structlog.get_logger("worker.prune")

#: What a removal takes away (the ``removed`` of a ``revoked`` record).
INVITATION = "invitation"

#: For a token's addresses, whether the list names each (same order).
Named = Callable[[list[str]], list[bool]]
A = TypeVar("A", bound=Answered)


@dataclass(slots=True)
class Survey:
    """What a token's dashboard holds that the list does not name."""

    token: str
    #: Distinct addresses the dashboard holds: invitees, share list, invitations.
    people: int = 0
    #: lower-cased address -> (the address as the dashboard spells it, what it holds)
    remove: dict[str, tuple[str, set[str]]] = field(default_factory=dict)

    def holding(self, what: str) -> list[str]:
        """The addresses to remove that hold ``what`` (invitation, invitee, share_list)."""
        return [email for email, held in self.remove.values() if what in held]


class Pruner:
    """Surveys dashboards and removes what the list no longer grants, through the run's
    pacer and retry policy; a ``stop`` ends any wait with :class:`Stopped`."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        retry: RetryPolicy,
        clock: Clock,
        rng: random.Random,
        *,
        batch_size: int,
        page_size: int = PAGE_SIZE,
        cap: Callable[[], int] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._client, self._pacer, self._retry, self._stop = client, pacer, retry, stop
        self._clock, self._rng = clock, rng
        self.batch_size, self.page_size, self._cap = batch_size, page_size, cap
        #: Requests made, by kind (dashboard reads and writes, listings, revocations).
        self.requests: Counter[str] = Counter()
        #: Pages of invitations read (the summary's ``list_pages`` counts them too).
        self.pages = 0

    async def survey(self, token: str, named: Named) -> Survey | None:
        """Whom ``token``'s dashboard holds that ``named`` says the list does not name;
        None when the token has no dashboard."""
        out = Survey(token)
        seen = array("q")  # hashes of the lower-cased addresses held, 8 bytes each
        try:
            board = (await self._paced(functools.partial(self._client.get_dashboard, token),
                                       "dashboard")).raw  # fmt: skip
            self._add(out, seen, _emails(board.get("invitees"), "email"), INVITEE, named)
            self._add(out, seen, _emails(board.get("share_list"), None), SHARE_LIST, named)
            del board
            async with contextlib.aclosing(self._invitations(token)) as pages:
                async for page in pages:
                    self._add(out, seen, page, INVITATION, named)
        except TokenNotFound:
            return None
        out.people = len(np.unique(np.frombuffer(seen, dtype=np.int64))) if seen else 0
        log.info("prune.surveyed", token=token, people=out.people, remove=len(out.remove))
        return out

    def _add(self, out: Survey, seen: array[int], emails: list[str], what: str,
             named: Named) -> None:  # fmt: skip
        if not emails:
            return
        seen.extend(hash(e.lower()) for e in emails)
        for email, listed in zip(emails, named(emails), strict=True):
            if listed:
                continue
            spelled, held = out.remove.setdefault(email.lower(), (email, set()))
            held.add(what)
            if what == INVITATION and spelled != email:  # revoke it as the service lists it
                out.remove[email.lower()] = (email, held)

    async def _invitations(self, token: str) -> AsyncGenerator[list[str], None]:
        """The addresses of every listed invitation, a page at a time, to the end.

        The end is ``total_count`` entries, or an empty page (one before that total is
        not the end). A page shorter than asked means the service honors a smaller size:
        the listing goes on at that size, from the entries read so far (``page_number``
        counts pages of the size asked), and a page holding only entries already read is
        a smaller size again, not the end. A listing that cannot be read to its end
        raises :class:`UnexpectedResponse`: a survey that cannot see everyone removes
        nobody.
        """
        read, size, last = 0, self.page_size, None
        for _ in range(MAX_PAGES):
            number, skip = divmod(read, size)
            call = functools.partial(self._client.list_invitations, token, number, size)
            page = await self._paced(call, "list_invitations")
            self.pages += 1
            if not page.invitations:
                if page.total_count is not None and read < page.total_count:
                    raise UnexpectedResponse(f"the invitation list's page {number} was empty "
                                             f"after {read:,} of {page.total_count:,}")  # fmt: skip
                return
            fresh = page.invitations[skip:]
            if not fresh:  # only what was read: a smaller size honored (see above)
                size = len(page.invitations)
                continue
            # The same page twice: page_number is not honored, and whoever is further on
            # could not be seen (a survey that cannot see everyone removes nobody).
            held = hash(tuple((i.email, i.created_at) for i in page.invitations))
            if held == last:
                raise UnexpectedResponse(f"the invitation list answered page {number} with "
                                         "the page before it; it cannot be read")  # fmt: skip
            last = held
            yield [item.email for item in fresh]
            read += len(fresh)
            if page.total_count == read:  # a total below what was read is not trusted
                return
            if len(page.invitations) != size:
                size = len(page.invitations)
        raise UnexpectedResponse(f"the invitation list did not end after {MAX_PAGES:,} pages")

    async def remove_entries(self, token: str, gone: Iterable[str]) -> dict[str, set[str]] | None:
        """Remove the invitee and share-list entries of ``gone`` (see ``removal``)."""
        return await remove_entries(self._dashboard_call, self._client, token,
                                    frozenset(e.lower() for e in gone))  # fmt: skip

    def list_size(self) -> int:
        """The longest list to revoke at once: ``--batch-size``, or the longest list the
        service takes, as its answers to the POSTs have shown."""
        return max(1, min(self.batch_size, self._cap() if self._cap else self.batch_size))

    async def revoke(self, token: str, emails: list[str]) -> None:
        """Revoke the invitations of ``emails``; raises :class:`SendError` if refused."""
        await self._paced(functools.partial(self._client.revoke, token, emails), "revoke")
        log.info("prune.revoked", token=token, emails=len(emails))

    async def _dashboard_call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await self._paced(call, "dashboard")

    async def _paced(self, call: Callable[[], Awaitable[A]], kind: str) -> A:
        def count() -> None:
            self.requests[kind] += 1

        return await paced_call(call, self._pacer, self._retry, self._clock, self._rng, count,
                                stop=self._stop)  # fmt: skip


def _emails(value: Any, key: str | None) -> list[str]:
    """The addresses of an invitee list (``key``: ``email``) or a share list, as read."""
    if not isinstance(value, list):
        return []
    items = (i.get(key) if key and isinstance(i, dict) else i for i in value)
    return [e for e in items if isinstance(e, str)]
