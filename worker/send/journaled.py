"""The sender's hooks in one request's attempt loop: the journal and unknown outcomes.

:func:`~worker.send.retry.attempt` tells its owner what happens to each request through
:class:`~worker.send.retry.Hooks`. The sender's make the intent durable in the journal
before each POST, count what the loop saw, and settle an unknown outcome (timeout, dropped
connection, 5xx) by listing the token's invitations: only addresses without a new
invitation go again. They are apart from :mod:`worker.send.sender`, which splits and
records a batch, because what one request's attempts owe the journal reads on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from worker.errors import (
    Aborted,
    AuthError,
    HeldUp,
    OutcomeUnknown,
    SendError,
    Stopped,
    TokenNotFound,
)
from worker.outcome import Failure
from worker.record.journal import Claimed
from worker.send.reconcile import found_outcome
from worker.send.retry import Hooks
from worker.send.trip import Trip
from worker.validate import Reason

if TYPE_CHECKING:
    from worker.send.sender import Sender

log = structlog.get_logger("worker.sender")

#: Why a message whose stream entry was trimmed while it waited here is not sent.
#: The least delay past its pacing a request may leave with (--reconcile-delay if more):
#: the time an intent takes to be made durable on a busy machine.
MIN_HELD_UP = 0.5

TRIMMED = Failure(
    str(Reason.MESSAGE_TRIMMED),  # the code, as a message met without its fields is rejected
    "its stream entry was deleted (trimmed) while this worker held it, and whether a worker "
    "that claimed it meanwhile sent it cannot be told; requeue it (dead-letter requeue "
    "--code message_trimmed): the dashboard check then skips it if it was invited",
)


class Journaled(Hooks):
    """The sender's side of one request's attempts: journal, reconciliation, counters."""

    def __init__(self, sender: Sender, trip: Trip) -> None:
        self._sender, self._trip = sender, trip
        self._intent = ""
        self._sent_at = 0.0
        #: Set when a listing found every email of the request created.
        self.all_created = False

    def refusal(self) -> SendError | None:
        sender, token = self._sender, self._trip.token
        refused = sender.state.abort_error
        if refused is not None:
            return Aborted("not sent: the run stopped after the service refused the keys "
                           f"({refused.message})")  # fmt: skip
        if token in sender.dead_tokens:
            return TokenNotFound(sender.dead_tokens[token])
        return None

    async def sending(self, sent_at: float) -> None:
        sender, trip = self._sender, self._trip
        try:
            self._intent = await sender._journal.intent(trip.token, trip.emails, sent_at,
                                                        sender._config.timeout)  # fmt: skip
        except Claimed as claimed:  # another worker sends those: this request goes without
            self._intent = claimed.ident
            sender.stats.claimed_elsewhere += len(claimed.emails)
            if claimed.trimmed:  # recorded (a dead letter), never sent twice
                log.warning(
                    "queue.message_trimmed", token=trip.token, messages=len(claimed.trimmed)
                )
                Trip(trip.token, claimed.trimmed, sender._clock, trip.out).fail(TRIMMED)
            drop = {*claimed.emails, *claimed.trimmed}
            trip.emails = [e for e in trip.emails if e not in drop]
            if not trip.emails:
                raise Stopped("not sent: no message of the request is this worker's") from None
        sender.stats.requests += 1

    def held_up(self, sent_at: float) -> SendError | None:
        # Whoever settles this intent (a worker claiming the messages, --resume) waits out
        # a request sent at sent_at: its --timeout, then --reconcile-delay, and lists what
        # it created. One that leaves later than that delay (the process was stalled
        # while its intent was recorded) could create invitations after that listing, for
        # people the settler has invited since. It goes as a retry, with a fresh intent
        # (which a worker whose messages were claimed meanwhile is refused).
        # A shorter hold-up still goes (an intent takes a moment to be made durable on a
        # busy machine), its time limit cut to end when the settler expects (leaving).
        self._sent_at = sent_at
        try:
            self.leaving()
        except HeldUp as late:
            return late
        return None

    def leaving(self) -> float | None:
        """Asked as the request is let go, and again up to its body's write (a process
        may stall in between: see worker.send.leaving): the time limit left of
        ``--timeout`` counted from its intent's time (None: all of it), always more than
        zero; :class:`HeldUp` when it is held up past what :meth:`held_up`
        allows. Whoever settles the intent takes the request for over then, and gives
        the service its own reconcile delay after that to finish: a request that left
        late must not use that delay up."""
        config = self._sender._config
        late = self._sender._clock.time() - self._sent_at
        if late <= max(config.reconcile_delay, MIN_HELD_UP) and late < config.timeout:
            # From this one reading of the clock: a second one could find no time left,
            # and a limit of zero or less is none at all to aiohttp.
            return config.timeout - late if late > 0 else None
        why = f"not sent: held up {late:.1f} s after its intent was recorded (stalled?)"
        self._sender.stats.requests -= 1  # counted as it was let go; it never left
        raise HeldUp(f"{why}; it goes again with a new one")

    def unsent(self) -> None:
        self._sender._journal.answered(self._intent)  # the service created nothing

    def cut(self) -> None:
        # The intent stays open: --resume (or a claiming worker) settles it once the
        # request can no longer be in progress.
        trip = self._trip
        self._sender.stats.cut(trip.token, trip.emails)
        log.warning("batch.outcome_unknown", token=trip.token, emails=len(trip.emails),
                    code="grace_expired", error="stopped with the request in flight")  # fmt: skip

    def limited(self) -> None:
        self._sender.stats.rate_limited += 1
        self._trip.limited += 1

    def failed(self, error: SendError, attempt: int) -> None:
        self._trip.attempts = attempt

    async def unknown(self, error: OutcomeUnknown, attempt: int, sent_at: float) -> bool:
        trip = self._trip
        remaining = await self._settle(error, sent_at)
        if remaining is None:  # could not tell what happened; resume will
            trip.fail(Failure("outcome_unknown", f"{error.message}; the invitation list "
                              "could not be read to check"), error.http_status)  # fmt: skip
            return False
        if not remaining:
            self.all_created = True
            return False
        trip.emails = remaining
        return True

    def retrying(self, error: SendError, attempt: int, delay: float) -> None:
        sender, trip = self._sender, self._trip
        sender.stats.retries += 1
        sender.metrics.retry(error.code)
        log.warning("batch.retry_scheduled", token=trip.token, emails=len(trip.emails),
                    attempt=attempt, delay=round(delay, 3), code=error.code,
                    http_status=error.http_status, error=error.message)  # fmt: skip

    async def _settle(self, error: OutcomeUnknown, sent_at: float) -> list[str] | None:
        """After an unknown outcome: the created become an outcome; return the others.

        Returns None when the invitation list could not be read; the intent then stays
        open in the journal for ``--resume``.
        """
        sender, trip, intent = self._sender, self._trip, self._intent
        token, emails = trip.token, trip.emails
        sender.stats.unknown_outcomes += 1
        log.warning("batch.outcome_unknown", token=token, emails=len(emails), code=error.code,
                    http_status=error.http_status, error=error.message)  # fmt: skip
        # Give a request that is still being processed time to land before we look.
        not_before = sender._clock.time() + sender._config.reconcile_delay
        if not await sender.state.sleep(sender._clock, sender._config.reconcile_delay):
            sender.stats.left_unknown(token, emails)
            raise Stopped("stopping: the unknown outcome is left in the journal")
        try:
            found = await sender.reconciler.created_since(token, emails, sent_at, not_before)
        except Stopped:
            sender.stats.left_unknown(token, emails)
            raise
        except AuthError as exc:
            sender.state.abort(exc)
            sender.metrics.reconciled("unreadable")
            sender.stats.unsettled(token, emails)
            return None
        except SendError as exc:
            log.error("reconcile.failed", token=token, emails=len(emails), error=exc.message)
            sender.metrics.reconciled("unreadable")
            sender.stats.unsettled(token, emails)
            return None
        outcome = found_outcome(
            token, emails, found, started_at=sent_at, finished_at=sender._clock.time(),
            attempts=trip.attempts, http_status=error.http_status, clears=(intent,),
        )  # fmt: skip
        sender.metrics.reconciled("none" if outcome is None else "created")
        if outcome is None:
            sender._journal.answered(intent)  # nothing was created: nothing to account for
        else:
            trip.out.append(outcome)
            sender.stats.reconciled_sent += len(outcome.emails)
            log.info("batch.reconciled", token=token, created=len(outcome.emails),
                     not_created=len(emails) - len(outcome.emails))  # fmt: skip
        return [e for e in emails if e.lower() not in found]
