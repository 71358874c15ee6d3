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
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from itertools import compress
from typing import Any
from urllib.parse import urlsplit

import structlog

from worker.clock import Clock, second_text
from worker.errors import (
    AuthError,
    SendError,
    TokenNotFound,
    WrongUrl,
)
from worker.outcome import DASHBOARD_PAUSED, NOT_INVITE_ONLY, Failure
from worker.send.client import InvitationClient
from worker.send.compact import key_set, keys_of, member
from worker.send.invitees import add_invitees
from worker.send.listed import SharedDashboard
from worker.send.pacing import Pacer
from worker.send.reconcile import Reconciler
from worker.send.replies import Dashboard
from worker.send.retry import paced_call
from worker.send.screening import (
    ACTIVE_SESSION,
    ALREADY_INVITED,
    INVITEE_UPDATE_FAILED,
    Screened,
    TokenCheck,
    allowed_keys,
    not_allowed,
)

log = structlog.get_logger("worker.preflight")


class Preflight:
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
        self._locks: dict[str, asyncio.Lock] = {}
        self._readable = True  # False once the key proved unable to read dashboards
        # Whether the base URL is known to serve the API (checked on the first 404).
        self._url_checked = False
        self._url_lock = asyncio.Lock()
        self._wrong_url: WrongUrl | None = None
        self._swept = clock.time()
        #: Requests for dashboards, reads and writes (invitation listings are the
        #: reconciler's).
        self.requests = 0
        #: Addresses added to dashboards' invitees (``--add-invitees``).
        self.invitees_added = 0

    @property
    def held(self) -> int:
        """How many tokens' checks are held (all of a file run's; queue mode: recent ones)."""
        return len(self._checks)

    async def screen(self, token: str, emails: list[str]) -> Screened:
        """Which of ``emails`` to send, which are refused, which skipped (by reason).

        Who was already served (invited, or in a session) is skipped whatever the
        dashboard says now: nothing goes to them. The dashboard is read only for the
        rest, so a day after a send, when everyone was served, it is not read at all.
        """
        check = await self._check(token)
        out = Screened()
        keys = keys_of(emails)
        session, invited = member(check.in_session, keys), member(check.invited, keys)
        send = None  # None: all of them, the common case of a first day
        if session.any() or invited.any():
            send = self._skip(out, emails, session, invited)
            if not send.any():  # the common case a day after a send, decided in C
                return out
        if not check.board:
            await self._board(token, check)
        if check.refused is not None:
            refused = emails if send is None else list(compress(emails, send.tolist()))
            out.refused = [(e, check.refused) for e in refused]
            return out
        outside: list[str] = []
        if check.allowed is not None:
            outside_mask = ~member(check.allowed, keys)
            if send is not None:
                outside_mask &= send
            if outside_mask.any():
                outside = list(compress(emails, outside_mask.tolist()))
        if outside and self._add_invitees:
            if not self._writes:  # a plan: screened as the run would, once it added them
                out.added, outside = outside, []
                self._allow(token, out.added)
            elif await self.add(token, outside):
                out.added, outside = outside, []
            else:
                why = "could not add the address to the dashboard's invitees safely"
                failure = Failure(INVITEE_UPDATE_FAILED, f"{why} (see invitees.update_failed)")
                out.refused = [(e, failure) for e in outside]
        elif outside:
            out.refused = [(e, not_allowed(e)) for e in outside]
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

    def forget(self, token: str) -> None:
        """Read ``token``'s dashboard again before its next batch."""
        self._checks.pop(token, None)

    async def _check(self, token: str) -> TokenCheck:
        lock = self._locks.setdefault(token, asyncio.Lock())
        async with lock:
            now = self._clock.time()
            check = self._checks.get(token)
            if check is None or (self._ttl is not None and now - check.checked > self._ttl):
                self._sweep(now)
                check = self._checks[token] = await self._read(token, now)
            return check

    def _sweep(self, now: float) -> None:
        """Drop the checks past ``ttl`` (queue mode), at most once per ``ttl``."""
        ttl = self._ttl
        if ttl is None or now - self._swept < ttl:
            return
        self._swept = now
        for token in [t for t, c in self._checks.items() if now - c.checked > ttl]:
            del self._checks[token]
            lock = self._locks.get(token)
            if lock is not None and not lock.locked():
                del self._locks[token]

    async def _read(self, token: str, now: float) -> TokenCheck:
        """Who the token's invitations say was served (none listed with ``--resend``).

        The dashboard is read later, by :meth:`_board`, only if a batch holds anyone else.
        """
        check = TokenCheck(now)
        if not self._readable:
            check.board = True  # nothing can be checked: send, and let the service decide
            return check
        if not self._resend:
            try:
                listing = await self._reconciler.listing(token, now)
            except AuthError as exc:
                self._unreadable(exc)
                check.board = True
                return check
            if listing.gone is not None:  # a 404: no dashboard to read either
                await self._check_url()
                check.refused = Failure(TokenNotFound.code, listing.gone)
                check.board = True
                return check
            open_ = listing.session_ends > now
            check.in_session = listing.keys[open_]
            invited = ~open_
            if self._resend_after is not None:  # only those invited within that long
                invited &= listing.created >= now - self._resend_after
            check.invited = listing.keys[invited]
        served = len(check.in_session) + len(check.invited)
        log.info("preflight.checked", token=token, served=served)
        return check

    async def _board(self, token: str, check: TokenCheck) -> None:
        """Read the token's dashboard into ``check``, once: refused, or who is allowed."""
        async with self._locks.setdefault(token, asyncio.Lock()):
            if check.board:  # read meanwhile, for another batch of the token
                return
            await self._read_board(token, check)  # a failure leaves it to the next batch
            check.board = True

    async def _read_board(self, token: str, check: TokenCheck) -> None:
        if not self._readable:
            return
        try:
            board = await self._dashboard(token)
        except TokenNotFound as exc:
            await self._check_url()
            check.refused = Failure(TokenNotFound.code, exc.message)
            return
        except AuthError as exc:
            self._url_checked = True  # the API answered
            self._unreadable(exc)
            return
        self._url_checked = True
        if board.share_type is not None and board.share_type != "invite":
            check.refused = Failure(NOT_INVITE_ONLY, f"the shared dashboard is shared as "
                                    f"{board.share_type!r}; invitations are for invite-only "
                                    "sharing (share_type 'invite')")  # fmt: skip
        elif board.status == "paused":
            check.refused = Failure(DASHBOARD_PAUSED, "the shared dashboard is paused; "
                                    "resume sharing it, then run again")  # fmt: skip
        else:
            check.allowed = allowed_keys(board, check.checked)
            allowed = None if check.allowed is None else len(check.allowed)
            log.info("preflight.dashboard", token=token, allowed=allowed)

    async def _check_url(self) -> None:
        """A 404 before any other answer: is there an API at this base URL at all?

        A base URL with a path, or another service on the port, answers 404 to every
        token; refusing each as ``token_not_found`` would record them failed for good.
        One ``GET /api/v1/validate`` tells: a 404 there too halts the run (:class:`WrongUrl`,
        exit 3), leaving every row for ``--resume``. It is paced, retried and stopped as
        every read is; any other answer, or none after every try (a reverse proxy that
        does not forward the path, a timeout), is taken for an API: the check must never
        be what halts a run.
        """
        async with self._url_lock:
            if self._wrong_url is not None:
                raise self._wrong_url
            if self._url_checked:
                return
            reconciler = self._reconciler
            try:
                answer = await paced_call(self._client.validate, self._pacer, reconciler.retry,
                                          self._clock, reconciler.rng, self._count,
                                          stop=reconciler.stop)  # fmt: skip
            except SendError as exc:
                log.warning("preflight.url_unchecked", error=exc.code, message=exc.message,
                            action="taken for an API; the 404 refuses the token")  # fmt: skip
            else:
                if answer.http_status == 404:
                    url = urlsplit(self._client.api_url)  # never user-info: may hold secrets
                    origin = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
                    self._wrong_url = WrongUrl(
                        f"{origin} answers 404 to every dashboard and to GET "
                        "/api/v1/validate: no Datadog API there. Check --api-url (the base "
                        "URL only, e.g. https://api.datadoghq.com) or --site; nothing was "
                        "recorded as failed: run the same command again with --resume"
                    )
                    raise self._wrong_url
            self._url_checked = True

    async def _dashboard(self, token: str) -> SharedDashboard:
        return (await self._paced(functools.partial(self._client.get_dashboard, token))).dashboard

    async def add(self, token: str, emails: list[str]) -> bool:
        """``--add-invitees``: add ``emails`` to the dashboard's invitees (see ``invitees``)."""
        async with self._locks.setdefault(token, asyncio.Lock()):
            expires = None
            if self._access_expires is not None:  # whole seconds: they read back exactly
                expires = second_text(int(self._clock.time() + self._access_expires)) + "+00:00"
            added = await add_invitees(self._paced, self._client, token, emails, expires)
        if added is None:
            return False
        self.invitees_added += added
        self._allow(token, emails)
        return True

    def _allow(self, token: str, emails: list[str]) -> None:
        """Count ``emails`` allowed on ``token``'s dashboard from now on."""
        check = self._checks.get(token)
        if check is not None and check.allowed is not None:
            import numpy as np

            check.allowed = np.union1d(check.allowed, key_set(emails))

    async def _paced(self, call: Callable[[], Awaitable[Dashboard]]) -> Dashboard:
        """One read or write of a dashboard, paced and retried like every request."""
        reconciler = self._reconciler
        return await paced_call(call, self._pacer, reconciler.retry, self._clock, reconciler.rng,
                                self._count, stop=reconciler.stop)  # fmt: skip

    def _count(self) -> None:
        self.requests += 1

    def _unreadable(self, error: AuthError) -> None:
        if self._readable:
            self._readable = False
            log.warning("preflight.unavailable", error=error.message,
                        consequence="sending without checking who is allowed or already "
                        "invited: give the application key dashboards_read")  # fmt: skip
