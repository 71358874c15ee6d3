"""Before a token's first send: is the dashboard there, open to invitations, and who on the
list is allowed, already invited, or already in a session?

Each token's invitations are listed once (all pages), through the same pacer as every
other request, and its shared dashboard (``GET .../public/{token}``) is read once, only if
a batch names someone the listing does not show served: a day after a send, when the list
names nobody new, the read would decide nothing. What that settles needs no POST at all:

- an address with an open session is skipped (``active_session``), and one invited before
  is skipped (``already_invited``): any invitation the service still lists, or with
  ``--resend-after``, one created within that long. ``--resend`` skips nobody. Whatever
  the dashboard says now, nothing is sent to them;
- the rest of the token is refused when there is no dashboard (``token_not_found``, a 404
  on the listing or the read), it is not invite-only (``not_invite_only``) or it is
  paused (``dashboard_paused``);
- an address neither an invitee with unexpired access nor on the ``share_list`` is refused
  (``not_on_share_list``) — where the service gives an allow-list at all.

A key without ``dashboards_read`` (a 403 on the read) is not an error: the run goes on
without the check, saying so once.

What a check keeps is compact (see ``send.compact``): the allowed, the invited and those in
a session as sorted arrays of 64-bit address hashes, 8 bytes an address, decided once when
the token is read. In queue mode a check older than ``ttl`` is dropped, so a long-lived
worker holds the checks of the tokens it is working on, not of every token it ever met.

How a check is made and kept is :mod:`worker.send.checks`; this module decides with it,
batch by batch.
"""

from __future__ import annotations

import contextlib
import functools
from array import array
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from itertools import compress
from typing import TYPE_CHECKING, Any

from worker.clock import Clock, second_text
from worker.errors import SendError
from worker.outcome import Failure
from worker.send.boards import BoardReader
from worker.send.checks import TokenChecks
from worker.send.client import InvitationClient
from worker.send.compact import key_set, keys_of
from worker.send.invitees import Confirm, add_invitees
from worker.send.keyed import KeyedLocks
from worker.send.paced import paced_call
from worker.send.pacing import Pacer
from worker.send.reconcile import Reconciler
from worker.send.retry import A
from worker.send.screening import (
    ACTIVE_SESSION,
    ALREADY_INVITED,
    INVITEE_UPDATE_FAILED,
    Screened,
    TokenCheck,
    access_expired,
    not_allowed,
)
from worker.validate import address_key
from worker.validate.dedupe import member

if TYPE_CHECKING:
    from worker.send.listed import SharedDashboard


class Preflight(TokenChecks):
    """Checks each token once (or again after ``ttl`` seconds, in queue mode)."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        reconciler: Reconciler,
        clock: Clock,
        *,
        resend: bool = False,
        resend_after: float | None = None,
        ttl: float | None = None,
        add_invitees: bool = False,
        access_expires: float | None = None,
        writes: bool = True,
    ) -> None:
        self._client, self._pacer, self._reconciler = client, pacer, reconciler
        self._clock = clock
        self._resend, self._resend_after, self._ttl = resend, resend_after, ttl
        self._add_invitees, self._access_expires = add_invitees, access_expires
        self._writes = writes  # False: a plan, which says whom it would add, adding nobody
        self._checks: dict[str, TokenCheck] = {}
        self._locks = KeyedLocks()
        # Tokens whose check is being made, and those of them forgotten meanwhile.
        self._reading: set[str] = set()
        self._stale: set[str] = set()
        self._failed: dict[str, tuple[float, SendError]] = {}
        # A refused read: the same keys may be refused for invitations too, so the next
        # request goes alone (one more request for wrong keys, not one per sender).
        self._boards = BoardReader(client, self._paced, refused=pacer.probe_again, plan=not writes)
        self._swept = clock.time()
        #: Requests for dashboards, reads and writes (invitation listings are the
        #: reconciler's).
        self.requests = 0
        #: ``GET /api/v1/validate`` requests (asked once a 404 came before any answer).
        self.validations = 0
        #: Addresses added to dashboards' invitees (``--add-invitees``).
        self.invitees_added = 0
        #: Held around each edit of a token's dashboard, beside this run's own lock: the
        #: stream's workers (see worker.queue.edits), and the file runs of one machine
        #: (worker.send.edit_lock), edit a dashboard one at a time. What it gives (if
        #: anything) confirms, as the write leaves, that it was held all along.
        self.edits: Callable[[str], AbstractAsyncContextManager[Confirm | None]] | None = None
        #: A file run's ``--add-invitees``: per token, the keys of the addresses its adds
        #: made sure of (with what earlier runs left to look at), for the look at the end
        #: (``send.recheck``). None: not kept (queue mode, ``--prune``).
        self.vouched: dict[str, array[int]] | None = None

    async def screen(self, token: str, emails: list[str]) -> Screened:
        """Which of ``emails`` to send, which are refused, which skipped (by reason).

        Who was already served (invited, or in a session) is skipped whatever the
        dashboard says now: nothing goes to them. The dashboard is read only for the
        rest, so a day after a send, when everyone was served, it is not read at all.
        """
        check = await self._check(token)
        out = Screened()
        keys = keys_of(emails)
        send = None  # None: all of them, the common case of a first day
        # Each numpy call costs microseconds here (a batch is screened between a thousand
        # other tokens' batches), so what has nothing to find is not asked.
        if len(check.in_session) or len(check.invited):
            invited = member(check.invited, keys)
            if not len(check.in_session) and len(keys) and invited.all():
                out.skipped[ALREADY_INVITED] = list(emails)  # a day after a send
                return out
            session = member(check.in_session, keys)
            if session.any() or invited.any():
                send = self._skip(out, emails, session, invited)
                if not send.any():
                    return out
        unread = check.unread
        if not check.board:
            try:
                await self._board(token, check)
                unread = check.unread
            except SendError as exc:  # not kept (see _keeps): this batch's alone
                unread = exc
        if unread is not None:  # the dashboard could not be read
            if send is None:
                raise unread.with_traceback(None)
            out.unread = (unread, list(compress(emails, send.tolist())))
            return out
        if check.refused is not None:
            refused = emails if send is None else list(compress(emails, send.tolist()))
            out.refused = [(e, check.refused) for e in refused]
            return out
        outside: list[str] = []
        if check.allowed is not None and not (allowed := member(check.allowed, keys)).all():
            outside_mask = ~allowed
            if send is not None:
                outside_mask &= send
            if len(check.expired) and outside_mask.any():
                # An expired entry is refused, --add-invitees or not: adding leaves an
                # existing entry as it is, so the service would refuse the send (a 400).
                gone = outside_mask & member(check.expired, keys)
                if gone.any():
                    out.refused = [(e, access_expired(e)) for e in compress(emails, gone.tolist())]
                    send = ~gone if send is None else send & ~gone
                    outside_mask &= ~gone
            if outside_mask.any():
                outside = list(compress(emails, outside_mask.tolist()))
        if outside and self._add_invitees:
            if not self._writes:  # a plan: screened as the run would, once it added them
                out.added, outside = outside, []
                self._allow(token, out.added)
            elif (granted := await self.add(token, outside))[0] is not None:
                # All are allowed now; the record names those this run added.
                out.added, out.added_until, outside = granted[0], granted[1], []
            else:
                why = "could not add the address to the dashboard's invitees safely"
                failure = Failure(INVITEE_UPDATE_FAILED, f"{why} (see invitees.update_failed)")
                out.refused += [(e, failure) for e in outside]
        elif outside:
            out.refused += [(e, not_allowed(e)) for e in outside]
        if outside:  # the refused are neither sent nor skipped
            send = ~outside_mask if send is None else send & ~outside_mask
        out.send = list(emails) if send is None else list(compress(emails, send.tolist()))
        return out

    @staticmethod
    def _skip(out: Screened, emails: list[str], session: Any, invited: Any) -> Any:
        """Skip who is in a session or invited (reasons in the order of their first
        address, as listed); the rest, as a mask."""
        invited &= ~session  # an open session is the reason given first
        if invited.all():  # a day after a send: everyone was invited then
            out.skipped[ALREADY_INVITED] = list(emails)
            return ~invited
        reasons = [(ACTIVE_SESSION, session), (ALREADY_INVITED, invited)]
        for reason, mask in sorted(reasons, key=lambda r: int(r[1].argmax())):
            if mask.any():
                out.skipped[reason] = list(compress(emails, mask.tolist()))
        return ~(session | invited)

    async def add(self, token: str, emails: list[str]) -> tuple[list[str] | None, str | None]:
        """``--add-invitees``: add ``emails`` to the dashboard's invitees (see ``invitees``).

        Those of them this added (None: it failed; the others were there already), and the
        ``access_expiration`` they were given (None: their access never expires).
        """
        edits = self.edits(token) if self.edits is not None else contextlib.nullcontext(None)
        async with self._locks.hold(token), edits as confirm:
            expires = None
            if self._access_expires is not None:  # whole seconds: they read back exactly
                expires = second_text(int(self._clock.time() + self._access_expires)) + "+00:00"
            added = await add_invitees(self._paced, self._client, token, emails, expires,
                                       confirm)  # fmt: skip
        if added is None:
            return None, None
        self.invitees_added += len(added)
        self._allow(token, emails)
        if self.vouched is not None:
            self.vouched.setdefault(token, array("q")).extend(map(address_key, emails))
        return added, expires

    async def read_board(self, token: str) -> SharedDashboard:
        """``token``'s dashboard as it is now, read as a check's is."""
        answer = await self._paced(functools.partial(self._client.get_dashboard, token))
        return answer.dashboard

    def _allow(self, token: str, emails: list[str]) -> None:
        """Count ``emails`` allowed on ``token``'s dashboard from now on."""
        check = self._checks.get(token)
        if check is not None and check.allowed is not None:
            import numpy as np

            check.allowed = np.union1d(check.allowed, key_set(emails))

    async def _paced(self, call: Callable[[], Awaitable[A]], *, validate: bool = False) -> A:
        """One read or write of a dashboard (or, ``validate``, the base URL's check), paced
        and retried like every request."""
        reconciler = self._reconciler
        counted = self._count_validate if validate else self._count
        return await paced_call(call, self._pacer, reconciler.retry, self._clock, reconciler.rng,
                                counted, stop=reconciler.stop, tally=reconciler.tally)  # fmt: skip

    def _count(self) -> None:
        self.requests += 1

    def _count_validate(self) -> None:
        self.validations += 1
