"""Carrying one batch to its outcomes: pacing, journal, retries, reconciliation, splits.

:meth:`Sender.send` *returns* what happened, as :class:`~worker.outcome.Outcome` values;
it writes no report. Before each POST the intent is made durable in the journal. A POST
whose outcome is unknown (timeout, dropped connection, 5xx) is never re-sent blindly: the
token's invitations are listed first and only addresses without a new invitation go again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog

from worker.batching import Batch
from worker.clock import Clock, unless_set
from worker.config import Config
from worker.errors import (
    Aborted,
    AuthError,
    BadRequest,
    FatalError,
    OutcomeUnknown,
    RateLimited,
    SendError,
    TokenNotFound,
)
from worker.outcome import Failure, Outcome, Status
from worker.record.journal import IntentLog
from worker.send import preflight_for, reconciler_for
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer
from worker.send.reconcile import found_outcome
from worker.send.refusals import ListCap
from worker.send.trip import SendStats, Trip

log = structlog.get_logger("worker.sender")


class Sender:
    """Sends batches through one client and pacer; returns each batch's outcomes."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        journal: IntentLog,
        config: Config,
        clock: Clock,
        rng: random.Random | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        self.pacer = pacer
        self._journal = journal
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not security
        self.stopping = stopping or asyncio.Event()
        self.reconciler = reconciler_for(config, client, pacer, clock, self._rng)
        self.retry = self.reconciler.retry
        self.stats = SendStats()
        self.metrics = client.metrics
        self.preflight = preflight_for(config, client, pacer, self.reconciler, clock)
        #: The longest list the service takes, as far as its answers have shown.
        self.cap = ListCap(config.batch_size)
        #: Set by the first fatal error (storage, unreachable service, lost queue).
        self.fatal: FatalError | None = None
        #: Set by the first 401/403: every later batch fails without a request.
        self.abort_error: AuthError | None = None
        #: Tokens that answered 404, with the server's message.
        self.dead_tokens: dict[str, str] = {}

    @property
    def aborted(self) -> bool:
        """True once the service refused the keys; nothing more is sent."""
        return self.abort_error is not None

    def _refused(self) -> bool:
        # A method, not the property: the answer can change across an await.
        return self.abort_error is not None

    def halt(self, error: FatalError) -> None:
        """Stop the run for ``error``: nothing more is sent; in-flight requests get grace."""
        if self.fatal is None:
            self.fatal = error
            log.error("run.halted", code=error.code, error=str(error))
        self.stopping.set()

    async def send(self, batch: Batch) -> list[Outcome]:
        """Carry ``batch`` to its outcomes (never raises :class:`SendError`).

        When the run is stopping, what is not yet sent has no outcome: ``--resume`` sends
        it later. A :class:`FatalError` (storage, an unreachable service, a lost queue)
        halts the run; the outcomes reached before it are still returned.
        """
        out: list[Outcome] = []
        try:
            emails = await self._screen(batch.token, batch.emails, out)
            if emails:
                await self._send(batch.token, emails, out)
        except FatalError as exc:
            self.halt(exc)
        return out

    async def _screen(self, token: str, emails: list[str], out: list[Outcome]) -> list[str]:
        """The preflight check: refused and skipped become outcomes; returns what to send."""
        if self.stopping.is_set() or self._refused() or token in self.dead_tokens:
            return emails  # _send records (or leaves) them as before
        started = self._clock.time()
        try:
            screened = await self.preflight.screen(token, emails)
        except SendError as exc:  # the dashboard could not be read: --resume tries again
            failure = Failure(exc.code, f"could not read the shared dashboard: {exc.message}")
            out.append(Outcome(token, emails, Status.FAILED, exc.http_status, 0, started,
                               self._clock.time(), failure))  # fmt: skip
            return []
        for outcome in screened.outcomes(token, started, self._clock.time()):
            if outcome.error is not None and outcome.error.code == TokenNotFound.code:
                self.dead_tokens[token] = outcome.error.message
            out.append(outcome)
        return screened.send

    async def _send(self, token: str, emails: list[str], out: list[Outcome]) -> bool:
        """Send ``emails`` in lists the service takes; True if it accepted every one.

        Whether every email was accepted is what tells a refusal about a list's size from
        one about an address in it (see :class:`ListCap`).
        """
        accepted = True
        while len(emails) > (size := self.cap.size()) and not self.stopping.is_set():
            accepted = await self._attempts(token, emails[:size], out) and accepted
            emails = emails[size:]
        return await self._attempts(token, emails, out) and accepted

    async def _attempts(self, token: str, emails: list[str], out: list[Outcome]) -> bool:
        """Carry one request's worth of emails to their outcomes (see :meth:`_send`)."""
        trip = Trip(token, emails, self._clock, out)
        while True:
            if self._refused() or token in self.dead_tokens:
                trip.fail(self._without_request(token))
                return False
            async with self.pacer.slot(self.stopping) as slot:
                if slot is None:
                    return False  # stopping: left for --resume
                if self._refused():  # another sender was refused while we waited
                    continue
                sent_at = slot.sent_at
                intent = await self._journal.intent(token, trip.emails, sent_at)
                self.stats.requests += 1
                try:
                    result = await self._client.invite(token, trip.emails)
                except FatalError:  # no connection could ever be made: nothing left
                    with contextlib.suppress(FatalError):
                        self._journal.clear(intent)
                    raise
                except SendError as exc:
                    slot.observe(exc.ratelimit, limited=isinstance(exc, RateLimited))
                    error: SendError = exc
                else:
                    slot.observe(result.ratelimit)
                    trip.attempts += 1
                    self.cap.accept(len(trip.emails))
                    # No journal clear: the report's "sent" record settles these pairs.
                    trip.done(Status.SENT, result.http_status, result.invitations)
                    return True
            if isinstance(error, RateLimited):  # not a failed attempt: the pacer waits
                self._journal.clear(intent)
                self.stats.rate_limited += 1
                trip.limited += 1
                continue
            trip.attempts += 1
            if isinstance(error, OutcomeUnknown):
                remaining = await self._settle(trip, intent, error, sent_at)
                if remaining is None:  # could not tell what happened; resume will
                    trip.fail(Failure("outcome_unknown", f"{error.message}; the "
                                             "invitation list could not be read to check"),
                               error.http_status)  # fmt: skip
                    return False
                if not remaining:
                    return True
                trip.emails = remaining
            else:
                self._journal.clear(intent)  # the service created nothing
            if self.retry.retries(error, trip.attempts):
                if not await self._back_off(trip, error):
                    return False
                continue
            return await self._give_up(trip, error)

    async def _back_off(self, trip: Trip, error: SendError) -> bool:
        """Wait before the next attempt; False if the run starts stopping meanwhile."""
        delay = self.retry.delay(trip.attempts, self._rng)
        self.stats.retries += 1
        self.metrics.retry(error.code)
        log.warning("batch.retry_scheduled", token=trip.token, emails=len(trip.emails),
                    attempt=trip.attempts, delay=round(delay, 3), code=error.code,
                    http_status=error.http_status, error=error.message)  # fmt: skip
        slept, _ = await unless_set(self.stopping, self._clock.sleep(delay))
        return slept

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
        if isinstance(error, AuthError) and self.abort_error is None:
            self.abort_error = error
            log.error("run.aborting", reason=error.code, http_status=error.http_status,
                      error=error.message)  # fmt: skip
        if isinstance(error, TokenNotFound):
            self.dead_tokens[trip.token] = error.message
        trip.fail(Failure.of(error), error.http_status)
        return False

    async def _bisect(self, trip: Trip, error: BadRequest) -> bool:
        """A 400 naming no address: halves, recursively, until the refused stand alone.

        If every part is then accepted, the service refused the list for its length: the
        cap is learned, and later lists are cut to it.
        """
        emails = trip.emails
        self.stats.splits += 1
        log.info("batch.split", token=trip.token, emails=len(emails), error=error.message)
        self.cap.suspect(len(emails))
        accepted = False
        try:
            half = len(emails) // 2
            accepted = await self._send(trip.token, emails[:half], trip.out)
            accepted = await self._send(trip.token, emails[half:], trip.out) and accepted
        finally:
            self.cap.settle(len(emails), all_accepted=accepted)
        return accepted

    async def _settle(
        self, trip: Trip, intent: str, error: OutcomeUnknown, sent_at: float
    ) -> list[str] | None:
        """After an unknown outcome: the created become an outcome; return the others.

        Returns None when the invitation list could not be read; the intent then stays
        open in the journal for ``--resume``.
        """
        token, emails = trip.token, trip.emails
        self.stats.unknown_outcomes += 1
        log.warning("batch.outcome_unknown", token=token, emails=len(emails), code=error.code,
                    http_status=error.http_status, error=error.message)  # fmt: skip
        # Give a request that is still being processed time to land before we look.
        not_before = self._clock.time() + self._config.reconcile_delay
        await self._clock.sleep(self._config.reconcile_delay)
        try:
            found = await self.reconciler.created_since(token, emails, sent_at, not_before)
        except AuthError as exc:
            self.abort_error = self.abort_error or exc
            self.metrics.reconciled("unreadable")
            return None
        except SendError as exc:
            log.error("reconcile.failed", token=token, emails=len(emails), error=exc.message)
            self.metrics.reconciled("unreadable")
            return None
        outcome = found_outcome(
            token, emails, found, started_at=sent_at, finished_at=self._clock.time(),
            attempts=trip.attempts, http_status=error.http_status, clears=(intent,),
        )  # fmt: skip
        self.metrics.reconciled("none" if outcome is None else "created")
        if outcome is None:
            self._journal.clear(intent)  # nothing was created: nothing to account for
        else:
            trip.out.append(outcome)
            self.stats.reconciled_sent += len(outcome.emails)
            log.info("batch.reconciled", token=token, created=len(outcome.emails),
                     not_created=len(emails) - len(outcome.emails))  # fmt: skip
        return [e for e in emails if e.lower() not in found]

    def _without_request(self, token: str) -> Failure:
        """Why a batch fails without a request: refused keys, or a token that is gone."""
        if self.abort_error is not None:
            return Failure(Aborted.code, "not sent: the run stopped after the service "
                           f"refused the keys ({self.abort_error.message})")  # fmt: skip
        return Failure(TokenNotFound.code, self.dead_tokens[token])
