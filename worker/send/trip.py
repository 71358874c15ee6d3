"""One list of one token on its way to its outcomes, and the sender's request counters."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from worker.clock import Clock
from worker.outcome import Failure, Invitation, Outcome, Status
from worker.validate import pair_key

log = structlog.get_logger("worker.sender")


@dataclass(slots=True)
class SendStats:
    """Request counters for the summary (outcomes are counted by the report)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    splits: int = 0
    unknown_outcomes: int = 0
    #: Emails of unknown outcomes left open when the run stopped (a request cut at the end
    #: of the grace, or one whose check was not waited for): neither sent nor unsent.
    unknown_left: int = 0
    #: Their pairs (see :func:`~worker.validate.pair_key`), and those of an unknown
    #: outcome no listing could settle (see :meth:`unsettled`): the job's totals count
    #: them unknown, whatever a record says. None: not kept (only a file's --resume
    #: counts job totals; a queue worker lives for days, and would only pile them up).
    unknown_keys: set[int] | None = None
    #: Journal intents left open (an unknown outcome no listing could settle, or one cut
    #: or left by a stop): a later --resume must settle them, so the journal is kept.
    open_intents: int = 0
    reconciled_sent: int = 0
    #: Queue mode: emails whose messages another worker claimed before they were sent here
    #: (this one stalled past --claim-idle): that worker settles them, this one never does.
    claimed_elsewhere: int = 0

    def cut(self, token: str, emails: list[str]) -> None:
        """A request whose outcome this run leaves unknown at its end (cut by a stop, or
        answered but not recorded): one more unknown outcome, its intent open."""
        self.unknown_outcomes += 1
        self.left_unknown(token, emails)

    def left_unknown(self, token: str, emails: list[str]) -> None:
        """A stop leaves this request's outcome unknown, its intent open for --resume."""
        self.unknown_left += len(emails)
        self.unsettled(token, emails)

    def unsettled(self, token: str, emails: list[str]) -> None:
        """No listing could tell whether this request created its invitations: recorded
        failed (``outcome_unknown``), its intent open for --resume to settle."""
        if self.unknown_keys is not None:
            self.unknown_keys.update(pair_key(token, e) for e in emails)
        self.open_intents += 1


class Trip:
    """The emails of one request on their way: what their outcome record will say."""

    __slots__ = ("_clock", "attempts", "emails", "limited", "out", "started", "token")

    def __init__(self, token: str, emails: list[str], clock: Clock, out: list[Outcome]) -> None:
        self.token, self.emails, self.out = token, emails, out
        self._clock = clock
        self.started = clock.time()
        self.attempts = 0
        self.limited = 0  # 429 answers met on the way

    def fail(self, error: Failure, http_status: int | None = None) -> None:
        """The emails failed with ``error``."""
        self.done(Status.FAILED, http_status, (), error)

    def done(
        self,
        status: Status,
        http_status: int | None,
        invitations: list[Invitation] | tuple[()],
        error: Failure | None = None,
    ) -> None:
        """The emails reached their outcome: add it, and log ``batch.sent|failed``."""
        finished = self._clock.time()
        outcome = Outcome(self.token, self.emails, status, http_status, self.attempts,
                          self.started, finished, error, invitations, self.limited)  # fmt: skip
        self.out.append(outcome)
        sent = status is Status.SENT
        emit, event = (log.info, "batch.sent") if sent else (log.warning, "batch.failed")
        emit(event, token=self.token, emails=len(self.emails), http_status=http_status,
             attempts=self.attempts, code=error.code if error else None,
             ms=round((finished - self.started) * 1000, 1))  # fmt: skip
