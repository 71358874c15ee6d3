"""``--prune`` on the dashboard's side: whom a token's dashboard holds that the list does
not name, and taking exactly those away.

A :class:`Pruner` reads a dashboard (``GET .../public/{token}``) and lists its invitations
to the end as the dashboard check does (:mod:`worker.send.paging`), and
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog

from worker.clock import Clock
from worker.errors import TokenNotFound
from worker.send.boards import sharing_refusal
from worker.send.client import InvitationClient
from worker.send.compact import key_set, keys_of
from worker.send.listed import Listed
from worker.send.paced import paced_call
from worker.send.pacing import Pacer
from worker.send.paging import PAGE_SIZE, Moved, Reading, read_pages, read_settled
from worker.send.removal import INVITEE, SHARE_LIST, remove_entries
from worker.send.replies import Dashboard, Listing
from worker.send.retry import Answered, RetryPolicy
from worker.validate.dedupe import member

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
    #: lower-cased address -> the address as listed: those the list names that hold an
    #: invitation (or a session) but no entry (neither an invitee, in any state, nor on
    #: the share list) of an invite-only dashboard, not paused, that keeps an allow-list.
    #: Their invitation grants nothing; ``--add-invitees`` adds them back (a removal cut
    #: short leaves them so).
    restore: dict[str, str] = field(default_factory=dict)

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
        durable: bool = False,
    ) -> None:
        self._client, self._pacer, self._retry, self._stop = client, pacer, retry, stop
        #: ``--fsync``: a revocation's record is made durable before its DELETE leaves.
        self.durable = durable
        self._clock, self._rng = clock, rng
        self.batch_size, self.page_size, self._cap = batch_size, page_size, cap
        #: Requests made, by kind (dashboard reads and writes, listings, revocations).
        self.requests: Counter[str] = Counter()
        #: Pages of invitations read (the summary's ``list_pages`` counts them too).
        self.pages = 0
        #: Revocations refused (400) and halved (the summary's ``splits`` counts them too).
        self.splits = 0
        #: Held around each removal from a dashboard: other runs of this machine edit it
        #: one at a time (see worker.send.edit_lock).
        self.edits: Callable[[str], AbstractAsyncContextManager[None]] | None = None

    async def survey(self, token: str, named: Named) -> Survey | None:
        """Whom ``token``'s dashboard holds that ``named`` says the list does not name;
        None when the token has no dashboard.

        The invitations are listed to their end as the dashboard check lists them
        (:func:`read_pages`). A listing that moves while it is read (revocations ahead of
        the page read would hide entries behind it) is surveyed again from the start, at
        most :data:`LIST_ATTEMPTS` times, then raises :class:`ListingMoved`: a survey
        that cannot see everyone removes nobody.
        """
        return await read_settled(
            token, functools.partial(self._survey_once, token, named), event="prune.list_moved",
            again="surveying the dashboard again", giving_up="removing nobody from it",
            consequence="who holds access cannot be told, so nobody is removed from this "
            "dashboard now",
        )  # fmt: skip

    async def _survey_once(self, token: str, named: Named) -> Survey | Moved | None:
        """One survey: the survey, what shows the listing moved, or None (no dashboard)."""
        out, reading = Survey(token), Reading()
        seen = array("q")  # hashes of the lower-cased addresses held, 8 bytes each
        entries: Any = None  # sorted keys of every entry; None: the board keeps no list

        def add(page: Sequence[Listed]) -> None:
            emails = [item.email for item in page]
            listed, keys = self._add(out, seen, emails, INVITATION, named)
            if entries is not None and any(listed):
                held = member(entries, keys)
                for email, on_list, entry in zip(emails, listed, held.tolist(), strict=True):
                    if on_list and not entry:
                        out.restore.setdefault(email.lower(), email)

        try:
            board = (await self._paced(functools.partial(self._client.get_dashboard, token),
                                       "dashboard")).raw  # fmt: skip
            invitees = _emails(board.get("invitees"), "email")
            share_list = _emails(board.get("share_list"), None)
            self._add(out, seen, invitees, INVITEE, named)
            self._add(out, seen, share_list, SHARE_LIST, named)
            if _keeps_allow_list(board):
                entries = key_set(invitees + share_list)
            del board, invitees, share_list
            try:
                moved = await read_pages(token, add, self._page, self.page_size, reading,
                                         events=("prune.listed", "prune.not_found"))  # fmt: skip
            finally:  # read, even if the listing then failed or the run stopped
                self.pages += reading.pages
        except TokenNotFound:
            return None
        if reading.gone is not None:  # gone between the dashboard and its listing
            return None
        if moved is not None:
            return Moved(moved)
        out.people = len(np.unique(np.frombuffer(seen, dtype=np.int64))) if seen else 0
        log.info("prune.surveyed", token=token, people=out.people, remove=len(out.remove))
        return out

    def _add(self, out: Survey, seen: array[int], emails: list[str], what: str,
             named: Named) -> tuple[list[bool], Any]:  # fmt: skip
        """Take note of ``emails`` holding ``what``; whether the list names each, and their
        keys (:func:`keys_of`, hashed once)."""
        keys = keys_of(emails)
        if not emails:
            return [], keys
        seen.frombytes(keys.tobytes())
        listed_all = named(emails)
        for email, listed in zip(emails, listed_all, strict=True):
            if listed:
                continue
            spelled, held = out.remove.setdefault(email.lower(), (email, set()))
            held.add(what)
            if what == INVITATION and spelled != email:  # revoke it as the service lists it
                out.remove[email.lower()] = (email, held)
        return listed_all, keys

    async def remove_entries(self, token: str, gone: Iterable[str],
                             took: dict[str, set[str]]) -> dict[str, set[str]] | None:  # fmt: skip
        """Remove the invitee and share-list entries of ``gone``; ``took`` says what the PUT
        took as soon as it is answered (see ``removal``)."""
        stop = self._stop
        edits = self.edits(token) if self.edits is not None else contextlib.nullcontext()
        async with edits:
            return await remove_entries(
                self._dashboard_call, self._client, token, frozenset(e.lower() for e in gone),
                took, functools.partial(self._read_now, token),
                stopped=lambda: stop is not None and stop.is_set(),
            )  # fmt: skip

    def list_size(self) -> int:
        """The longest list to revoke at once: ``--batch-size``, or the longest list the
        service takes, as its answers to the POSTs have shown."""
        return max(1, min(self.batch_size, self._cap() if self._cap else self.batch_size))

    async def revoke(self, token: str, emails: list[str]) -> None:
        """Revoke the invitations of ``emails``; raises :class:`SendError` if refused."""
        await self._paced(functools.partial(self._client.revoke, token, emails), "revoke")
        log.info("prune.revoked", token=token, emails=len(emails))

    async def _page(self, token: str, number: int, size: int) -> Listing:
        return await self._paced(
            functools.partial(self._client.list_invitations, token, number, size),
            "list_invitations",
        )

    async def _read_now(self, token: str) -> Dashboard:
        """One read of the dashboard, unpaced and not retried (see ``remove_entries``)."""
        self.requests["dashboard"] += 1
        return await self._client.get_dashboard(token)

    async def _dashboard_call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await self._paced(call, "dashboard")

    async def _paced(self, call: Callable[[], Awaitable[A]], kind: str) -> A:
        def count() -> None:
            self.requests[kind] += 1

        return await paced_call(call, self._pacer, self._retry, self._clock, self._rng, count,
                                stop=self._stop)  # fmt: skip


def _keeps_allow_list(board: dict[str, Any]) -> bool:
    """Whether entries decide who an invitation serves: a dashboard the check sends to
    (:func:`sharing_refusal`), with an allow-list."""
    if sharing_refusal(board.get("share_type"), board.get("status")) is not None:
        return False
    return isinstance(board.get("invitees"), list) or isinstance(board.get("share_list"), list)


def _emails(value: Any, key: str | None) -> list[str]:
    """The addresses of an invitee list (``key``: ``email``) or a share list, as read."""
    if not isinstance(value, list):
        return []
    items = (i.get(key) if key and isinstance(i, dict) else i for i in value)
    return [e for e in items if isinstance(e, str)]
