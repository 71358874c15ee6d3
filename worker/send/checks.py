"""Each token's check, as the preflight makes and holds it: its invitations listed when a
batch of the token first comes, its dashboard read only once a batch names someone the
listing does not show served, kept for a whole file run, dropped after ``ttl`` in queue
mode, and made again on demand (``forget``).

How a check is made and kept, apart from what :mod:`worker.send.preflight` makes of it for
each batch (who is sent, skipped, refused or added).
"""

from __future__ import annotations

import structlog

from worker.clock import Clock
from worker.errors import PermanentError, SendError, TokenNotFound
from worker.outcome import Failure
from worker.send.boards import BoardReader
from worker.send.keyed import KeyedLocks
from worker.send.reconcile import Reconciler
from worker.send.screening import TokenCheck

log = structlog.get_logger("worker.preflight")


class TokenChecks:
    """The checks of :class:`~worker.send.preflight.Preflight`, a token at a time."""

    _reconciler: Reconciler
    _clock: Clock
    _resend: bool
    _resend_after: float | None
    _ttl: float | None
    _checks: dict[str, TokenCheck]
    _locks: KeyedLocks
    _reading: set[str]
    _stale: set[str]
    #: Queue mode: the token's last reading that failed and was not kept, and when it
    #: ended (see _check).
    _failed: dict[str, tuple[float, SendError]]
    _boards: BoardReader
    _swept: float

    @property
    def held(self) -> int:
        """How many tokens' checks are held (all of a file run's; queue mode: recent ones)."""
        return len(self._checks)

    def forget(self, token: str) -> None:
        """Read ``token``'s dashboard again before its next batch (a check being made
        now is used by the batch waiting for it, and not kept)."""
        self._checks.pop(token, None)
        self._failed.pop(token, None)
        if token in self._reading:
            self._stale.add(token)

    async def _check(self, token: str) -> TokenCheck:
        arrived = self._clock.time()
        async with self._locks.hold(token):
            # A failure not kept (queue mode) that leaves messages pending is shared with
            # the batches that waited for that reading: a listing that keeps moving is
            # read once for them all, not three times over for each; a batch that comes
            # later reads again.
            failed = self._failed.get(token)
            if failed is not None and failed[0] >= arrived:
                raise failed[1].with_traceback(None)
            now = self._clock.time()
            check = self._checks.get(token)
            if check is None or (self._ttl is not None and now - check.checked > self._ttl):
                self._sweep(now)
                self._reading.add(token)
                try:
                    check = await self._read(token, now)
                except SendError as exc:
                    check = TokenCheck(now, unread=exc)
                finally:
                    self._reading.discard(token)
                self._failed.pop(token, None)
                if token in self._stale:  # forgotten while it was made: not kept
                    self._stale.discard(token)
                elif self._keeps(check.unread):
                    self._checks[token] = check
                elif check.unread is not None and check.unread.keep_pending:
                    # Only a failure that leaves the messages pending: one that would send
                    # them to the dead letters (a timeout) is tried again by each batch.
                    self._failed[token] = (self._clock.time(), check.unread)
            if check.unread is not None and not check.board:
                raise check.unread.with_traceback(None)
            return check

    def _keeps(self, failure: SendError | None) -> bool:
        """Whether a check is kept: a failed one is, so the token's other batches fail at
        once rather than each after as many tries; but not in queue mode (a ttl) when
        it may pass, since every message it failed would go to the dead letters."""
        return failure is None or self._ttl is None or isinstance(failure, PermanentError)

    def _sweep(self, now: float) -> None:
        """Drop the checks past ``ttl`` (queue mode), at most once per ``ttl``."""
        ttl = self._ttl
        if ttl is None or now - self._swept < ttl:
            return
        self._swept = now
        for token in [t for t, c in self._checks.items() if now - c.checked > ttl]:
            del self._checks[token]
        for token in [t for t, (ended, _) in self._failed.items() if now - ended > ttl]:
            del self._failed[token]

    async def _read(self, token: str, now: float) -> TokenCheck:
        """Who the token's invitations say was served (none listed with ``--resend``).

        The dashboard is read later, by :meth:`_board`, only if a batch holds anyone else.
        """
        check = TokenCheck(now)
        if not self._boards.readable:
            check.board = True  # dashboards cannot be read: let the service decide
        if not self._resend:
            # A refused listing (401/403) is not passed over: without it nobody already
            # invited can be told apart, so it goes up as the keys refused and the run
            # stops (exit 3) before any POST; --resend is the way to send without it.
            listing = await self._reconciler.listing(token, now)
            if listing.gone is not None:  # a 404: no dashboard to read either
                await self._boards.check_url()
                check.refused = Failure(TokenNotFound.code, listing.gone)
                check.board = True
                return check
            self._boards.answered()
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
        async with self._locks.hold(token):
            if check.board:  # read meanwhile, for another batch of the token
                return
            try:
                await self._boards.read(token, check)
            except SendError as exc:
                if not self._keeps(exc):  # the next batch reads it again
                    raise
                check.unread = exc  # remembered, as a listing's failure is (see _check)
            check.board = True
