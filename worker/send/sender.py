"""Carrying one batch to its outcomes: pacing, journal, retries, reconciliation, splits.

:meth:`Sender.send` *returns* what happened, as :class:`~worker.outcome.Outcome` values;
it writes no report. Each request goes through the one attempt loop
(:func:`~worker.send.retry.attempt`); the sender's hooks
(:class:`~worker.send.journaled.Journaled`) make the intent durable in the journal before
each POST, and settle an unknown outcome (timeout, dropped connection, 5xx) by listing the
token's invitations first: only addresses without a new invitation go again, never a blind
re-send.
"""

from __future__ import annotations

import dataclasses
import random

import structlog

from worker.batching import Batch
from worker.clock import Clock
from worker.config import Config
from worker.errors import AuthError, BadRequest, SendError, Stopped, TokenNotFound
from worker.outcome import Failure, Outcome, Status
from worker.record.journal import IntentLog
from worker.send import preflight_for, reconciler_for
from worker.send.client import InvitationClient
from worker.send.journaled import Journaled
from worker.send.pacing import Pacer
from worker.send.refusals import ListCap, named_limit
from worker.send.retry import attempt
from worker.send.trip import SendStats, Trip
from worker.state import RunState

log = structlog.get_logger("worker.sender")

#: The code of rows failed by a check that failed for a reason final for a POST.
CHECK_FAILED = "check_failed"


class Sender:
    """Sends batches through one client and pacer; returns each batch's outcomes.

    ``state`` is the run's (its runner's): the sender stops sending when it stops, makes
    no request once the keys were refused, and tells it when they are.
    """

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        journal: IntentLog,
        config: Config,
        clock: Clock,
        rng: random.Random | None = None,
        state: RunState | None = None,
    ) -> None:
        self._client = client
        self.pacer = pacer
        self._journal = journal
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not security
        self.state = state or RunState()
        self.reconciler = reconciler_for(config, client, pacer, clock, self._rng,
                                         stop=self.state.stop)  # fmt: skip
        self.retry = self.reconciler.retry
        self.stats = SendStats()
        self.metrics = client.metrics
        self.preflight = preflight_for(config, client, pacer, self.reconciler, clock)
        #: The longest list the service takes, as far as its answers have shown.
        self.cap = ListCap(config.batch_size)
        #: Tokens that answered 404, with the server's message.
        self.dead_tokens: dict[str, str] = {}

    def forget(self, token: str) -> None:
        """Check ``token`` afresh (a 404 or a refusal may since have been fixed)."""
        self.dead_tokens.pop(token, None)
        self.preflight.forget(token)

    async def send(self, batch: Batch, out: list[Outcome] | None = None) -> list[Outcome]:
        """Carry ``batch`` to its outcomes, appended to ``out`` (and returned).

        Never raises :class:`SendError`. When the run is stopping, what is not yet sent has
        no outcome: ``--resume`` sends it later. A :class:`FatalError` (storage, an
        unreachable service) is raised for the runner to halt the run; the outcomes reached
        before it are in ``out`` all the same.
        """
        out = [] if out is None else out
        first, added, until = len(out), list[str](), None
        try:
            emails, added, until = await self._screen(batch.token, batch.emails, out)
            if emails:
                await self._send(batch.token, emails, out)
            if lapsed := _lapsed(out, first, added):
                # --add-invitees: entries it added were gone when its POST came (another
                # writer's older read written back), so the service refused them. A 400
                # is final for --resume: added and sent again now, once, from a new check.
                log.warning("batch.entries_lapsed", token=batch.token, emails=len(lapsed),
                            action="adding them again and sending once more")  # fmt: skip
                # Their refusal is not recorded: stopped now, they are left for --resume.
                out[first:] = [o for o in out[first:] if not _refused_added(o, set(added))]
                self.preflight.forget(batch.token)
                emails, again, until = await self._screen(batch.token, lapsed, out)
                # Each person is one add in the records, however many writes it took.
                self.preflight.invitees_added -= len(set(again) & set(added))
                added = [*added, *again]
                if emails and not self.state.stop.is_set():
                    await self._send(batch.token, emails, out)
        except Stopped:
            pass  # what has no outcome yet is left for --resume (or pending in the stream)
        finally:  # their records say whom --add-invitees granted access, a fault or not
            if added:
                granted = set(added)
                out[first:] = [_granted(o, granted, until) for o in out[first:]]
        return out

    async def _screen(
        self, token: str, emails: list[str], out: list[Outcome]
    ) -> tuple[list[str], list[str], str | None]:
        """The preflight check: refused and skipped become outcomes; returns what to send,
        those of them ``--add-invitees`` added to the dashboard's invitees, and the access
        expiration they were given."""
        if self.state.stop.is_set() or self.state.aborted or token in self.dead_tokens:
            return emails, [], None  # _send records (or leaves) them as before
        started = self._clock.time()
        try:
            screened = await self.preflight.screen(token, emails)
        except SendError as exc:  # the dashboard could not be read: --resume tries again
            self._unchecked(token, emails, exc, started, out)
            return [], [], None
        for outcome in screened.outcomes(token, started, self._clock.time()):
            if outcome.error is not None and outcome.error.code == TokenNotFound.code:
                self.dead_tokens[token] = outcome.error.message
            out.append(outcome)
        if screened.unread is not None:  # the served were skipped; the rest not checked
            self._unchecked(token, screened.unread[1], screened.unread[0], started, out)
            return [], [], None
        return screened.send, screened.added, screened.added_until

    def _unchecked(
        self, token: str, emails: list[str], exc: SendError, started: float, out: list[Outcome]
    ) -> None:
        """``emails`` failed: the dashboard could not be read (a write refused with
        --add-invitees is the keys refused: the run aborts)."""
        if isinstance(exc, AuthError):
            self.state.abort(exc)
        # Nobody was sent anything: a code final for a POST (a 400 to a read) must not keep
        # --resume from trying these people again.
        code = CHECK_FAILED if exc.final else exc.code
        failure = Failure(code, f"the dashboard check could not be made ({exc.code}): "
                          f"{exc.message}")  # fmt: skip
        trip = Trip(token, emails, self._clock, out)
        trip.started = started  # the check began the batch's way
        trip.fail(failure, exc.http_status)  # its outcome, and batch.failed as any other

    async def _send(self, token: str, emails: list[str], out: list[Outcome]) -> bool:
        """Send ``emails`` in lists the service takes; True if it accepted every one.

        Whether every email was accepted is what tells a refusal about a list's size from
        one about an address in it (see :class:`ListCap`).
        """
        accepted = True
        while len(emails) > (size := self.cap.size()) and not self.state.stop.is_set():
            with self.cap.trying(size):
                accepted = await self._attempts(token, emails[:size], out) and accepted
            emails = emails[size:]
        with self.cap.trying(len(emails)):
            return await self._attempts(token, emails, out) and accepted

    async def _attempts(self, token: str, emails: list[str], out: list[Outcome]) -> bool:
        """Carry one request's worth of emails to their outcomes (see :meth:`_send`)."""
        trip = Trip(token, emails, self._clock, out)
        hooks = Journaled(self, trip)
        self._client.open_writes()  # before any intent: see InvitationClient.open_writes
        try:
            result = await attempt(
                lambda: self._client.invite(token, trip.emails, hooks.leaving), hooks,
                pacer=self.pacer,
                policy=self.retry, clock=self._clock, rng=self._rng, stop=self.state.stop,
            )  # fmt: skip
        except Stopped:
            return False  # left for --resume; an unknown outcome stays in the journal
        except SendError as error:
            return await self._give_up(trip, error)
        if result is None:  # settled by a listing: all created, or it could not be told
            return hooks.all_created
        trip.attempts += 1
        self.cap.accept(len(trip.emails))
        # No journal clear: the report's "sent" record settles these pairs.
        trip.done(Status.SENT, result.http_status, result.invitations)
        return True

    async def _give_up(self, trip: Trip, error: SendError) -> bool:
        """The attempts are over: split a refused list, or record the failure."""
        if isinstance(error, BadRequest) and len(trip.emails) > 1:
            if not error.named:
                return await self._bisect(trip, error)
            named = set(error.named)
            log.info("batch.refused_named", token=trip.token, emails=len(trip.emails),
                     refused=len(named))  # fmt: skip
            rest = [e for e in trip.emails if e not in named]
            trip.emails = error.named
            trip.fail(Failure.of(error), error.http_status)
            if rest:  # the others go again, as one request
                await self._send(trip.token, rest, trip.out)
            return False
        if isinstance(error, AuthError):
            self.state.abort(error)
        if isinstance(error, TokenNotFound):
            self.dead_tokens[trip.token] = error.message
        trip.fail(Failure.of(error), error.http_status)
        return False

    async def _bisect(self, trip: Trip, error: BadRequest) -> bool:
        """A 400 naming no address: parts, recursively, until the refused stand alone.

        The parts are lists of the size the cap's search is at (see :class:`ListCap`), or
        halves once that is no shorter. If every part is then accepted, the service refused
        the list for its length: the cap is learned, and later lists are cut to it.
        """
        emails = trip.emails
        self.stats.splits += 1
        log.info("batch.split", token=trip.token, emails=len(emails), error=error.message)
        self.cap.named(named_limit(error.message, len(emails)))
        self.cap.suspect(len(emails))
        accepted = False
        try:
            if self.cap.size() < len(emails):  # lists of the size the cap's search is at
                accepted = await self._send(trip.token, emails, trip.out)
            else:
                half = len(emails) // 2
                accepted = await self._send(trip.token, emails[:half], trip.out)
                accepted = await self._send(trip.token, emails[half:], trip.out) and accepted
        finally:
            self.cap.settle(len(emails), all_accepted=accepted)
        return accepted


def _granted(outcome: Outcome, added: set[str], until: str | None) -> Outcome:
    """``outcome`` naming those of its emails that were added to the invitees first, and
    until when (``until``; None: for good)."""
    if outcome.status is Status.SKIPPED:
        return outcome
    granted = [e for e in outcome.emails if e in added]
    if not granted:
        return outcome
    return dataclasses.replace(outcome, invitees_added=tuple(granted), access_expiration=until)


def _refused_added(outcome: Outcome, added: set[str]) -> bool:
    """Whether ``outcome`` is a 400 refusing addresses the batch itself added."""
    error = outcome.error
    return (outcome.status is Status.FAILED and error is not None
            and error.code == BadRequest.code and added.issuperset(outcome.emails))  # fmt: skip


def _lapsed(out: list[Outcome], first: int, added: list[str]) -> list[str]:
    """The addresses of ``out[first:]`` refused by a 400 though the batch added them."""
    if not added:
        return []
    granted = set(added)
    return [e for o in out[first:] if _refused_added(o, granted) for e in o.emails]
