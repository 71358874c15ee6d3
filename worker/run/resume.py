"""``--resume``: rebuild each pair's state from the report and journal, settle the unknowns.

After a crash, the files alone say where every pair stands:

- **sent**: in a ``batch`` record with status ``sent`` — skipped on resume;
- **failed for good**: last recorded ``failed`` with a permanent code (``bad_request``,
  ``token_not_found``) — skipped; ``invite-worker`` will not change the answer;
- **failed, worth another try**: ``failed`` for a passing cause (5xx, timeouts, refused keys,
  an aborted run) — sent again;
- **skipped**: last recorded ``skipped`` (the service already served it) — not checked or
  recorded again (unless ``--resend``), so a history of resumed runs counts it once;
- **unknown**: in a journal intent that was never cleared and not in a ``sent`` record —
  the token's invitations are listed first; what was created is recorded as sent
  (``reconciled``), the rest is sent again;
- **never tried**: anything else in the input — sent.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from worker.clock import Clock, sleep_unless
from worker.errors import SendError, Stopped, is_final
from worker.outcome import Outcome, Status
from worker.record.journal import Intent
from worker.record.records import RejectedRow
from worker.record.replay import Replay
from worker.send.reconcile import Reconciler, found_outcome
from worker.validate import pair_key
from worker.validate.dedupe import PairIndex

log = structlog.get_logger("worker.resume")


@dataclass
class History:
    """What an earlier run (or runs) of the same report settled."""

    #: Every pair with a ``sent`` record (compact: a long job has millions).
    sent: PairIndex = field(default_factory=PairIndex)
    #: Every pair whose last record is ``skipped`` (already served): not checked again.
    skipped: PairIndex = field(default_factory=PairIndex)
    #: pair -> code of its latest failure (removed once the pair is sent)
    failed: dict[int, str] = field(default_factory=dict)
    #: The rows of the input rejected and recorded (see :func:`rejected_row`).
    rejected_rows: set[RejectedRow] = field(default_factory=set)
    #: Journal intents never cleared whose pairs are not known to be sent.
    unknown: list[Intent] = field(default_factory=list)
    #: Pairs whose outcome could not be settled now: not sent again in this run.
    blocked: set[int] = field(default_factory=set)
    #: Pairs of this run's input settled by an earlier failure for good: not invited.
    failed_in_input: set[int] = field(default_factory=set)
    #: Emails this run skipped as already served (the earlier runs' are in ``skipped``).
    skipped_now: int = 0
    #: Pairs whose open intent this run settled as it began (as many as were open): their
    #: records are this run's, so their rows count as this run's, not as settled before.
    settled_now: dict[int, str] = field(default_factory=dict)  # pair -> its token
    #: Tokens of the rows of ``settled_now`` met in the input, one per row, since
    #: :meth:`take_settled_now` was last asked.
    _met_settled_now: list[str] = field(default_factory=list)
    #: Pairs this run revoked (``--prune``): sent no longer, as ``report summarize`` counts.
    revoked_now: set[int] = field(default_factory=set)
    runs: int = 0
    #: ``--add-invitees``: per token, the keys of addresses earlier runs added that no run
    #: has looked at since (see ``Replay.unlooked``): this run's look covers them too.
    unlooked: dict[str, array[int]] = field(default_factory=dict)

    def settled(self, keys: list[int]) -> set[int]:
        """Those of ``keys`` (see :func:`pair_key`) that must not be sent again."""
        done = self.sent.find_many(keys)
        if self.settled_now and done:
            # Once: a later row of the pair is a duplicate.
            met = [self.settled_now.pop(key) for key in done if key in self.settled_now]
            self._met_settled_now += met
        if len(self.skipped):
            done.update(self.skipped.find_many(keys))
        if self.blocked or self.failed:
            blocked, failed = self.blocked, self.failed
            for key in keys:
                if key in blocked:
                    done.add(key)
                elif is_final(failed.get(key, "")):
                    done.add(key)
                    self.failed_in_input.add(key)
        return done

    def take_settled_now(self) -> list[str]:
        """The tokens of the rows :meth:`settled` found settled by this run itself (see
        ``settled_now``) since it was last asked, one per row."""
        met, self._met_settled_now = self._met_settled_now, []
        return met

    def on_revoked(self, token: str, emails: list[str]) -> None:
        """``--prune`` took these pairs' access away: the job no longer counts them sent."""
        self.revoked_now.update(pair_key(token, email) for email in emails)

    def on_batch(self, token: str, emails: list[str], status: str, code: str | None) -> None:
        """Track a batch record as it is read or written, so totals cover the whole job."""
        if status == Status.PLANNED:
            return  # a plan is not an outcome
        keys = [pair_key(token, email) for email in emails]
        if status == Status.SKIPPED:
            self.skipped_now += len(keys)
            # Served already (invited, in a session): an earlier failure no longer stands.
            if self.failed or self.blocked:
                for key in keys:
                    self.failed.pop(key, None)
                    self.blocked.discard(key)
            return
        if status == Status.SENT:
            self.sent.add_many(keys)
            if self.revoked_now:  # invited again since
                self.revoked_now.difference_update(keys)
            if self.failed or self.blocked:
                for key in keys:
                    self.failed.pop(key, None)
                    self.blocked.discard(key)
            return
        sent = self.sent.find_many(keys)
        for key in keys:
            if key not in sent:
                self.failed[key] = code or "failed"

    def on_outcome(self, outcome: Outcome) -> None:
        """Track an outcome of this run."""
        code = outcome.error.code if outcome.error else None
        self.on_batch(outcome.token, outcome.emails, outcome.status, code)

    def totals(self, cut: set[int] | None = None) -> dict[str, int]:
        """Email and row counts over the whole job so far; ``cut``: the pairs of requests
        this run left with an unknown outcome (cut by its stop, or not settled for want of
        a listing). A pair whose outcome is unknown now counts as unknown only, whatever
        failure a record gave it."""
        unknown = self.blocked | cut if cut else self.blocked
        failed = len(self.failed) - sum(1 for key in unknown if key in self.failed)
        # What --prune revoked in this run is neither sent nor served any more (this run's
        # own skips are of pairs the list names, which it does not revoke).
        revoked, served = 0, 0
        if self.revoked_now:
            gone = list(self.revoked_now)
            revoked = len(self.sent.find_many(gone))
            served = len(self.skipped.find_many(gone)) if len(self.skipped) else 0
        return {
            "emails_sent": len(self.sent) - revoked,
            "emails_failed": failed,
            "emails_skipped": len(self.skipped) - served + self.skipped_now,
            "rejected": len(self.rejected_rows),
            "unknown": len(unknown),
        }


def load_history(report_path: Path, journal_path: Path, *, resend: bool = False,
                 looks: bool = False) -> History:  # fmt: skip
    """Read an earlier report (replayed as ``report summarize`` does) and its journal.

    With ``resend`` the pairs skipped as already served are checked again; ``looks``
    (``--add-invitees``): keep what earlier runs added that nobody looked at since."""
    replay = Replay.read(report_path, adds=looks)
    history = History(runs=len(replay.runs), unlooked=replay.unlooked)
    history.unknown.extend(replay.open_intents(journal_path))
    sent, _ = replay.keys_in(Status.SENT)
    history.sent = PairIndex.of_sorted(sent)
    if not resend:
        skipped, _ = replay.keys_in(Status.SKIPPED)
        history.skipped = PairIndex.of_sorted(skipped)
        del skipped
    failed, records = replay.keys_in(Status.FAILED)
    codes = [code or "failed" for _, code, _ in replay.batches]
    history.failed = dict(zip(failed.tolist(), map(codes.__getitem__, records), strict=True))
    history.rejected_rows.update(row for row in replay.rejected if isinstance(row[0], int))
    del replay, sent, failed, records  # the history holds what it needs, compactly
    return history


async def settle_unknowns(
    history: History, reconciler: Reconciler, clock: Clock, *, request_timeout: float, delay: float
) -> AsyncIterator[Outcome]:
    """List the invitations of every token with unknown outcomes; yield what was created.

    An intent is listed for only once its request can no longer be in progress: the
    service may still create the invitations of a request whose process stopped or died
    (it does not know the client went away). So each waits until its send time, plus the
    timeout it was sent with (``request_timeout`` if the journal does not say), plus ``delay``,
    as the unknown outcome of a running request does. A stop ends the wait: the intents
    not yet listed stay open for the next ``--resume``, their pairs unsent.

    Each outcome found is ``sent`` (``reconciled``) and clears its intent once recorded;
    the pairs not found go back to the input pass to be sent. If a token's list cannot be
    read, its pairs stay unknown and are *not* sent in this run (that could email someone
    twice); a later ``--resume`` tries again.
    """
    if not history.unknown:
        return
    log.info("resume.reconciling", intents=len(history.unknown),
             tokens=len({i.token for i in history.unknown}))  # fmt: skip
    for intent in history.unknown:  # one listing per token serves all its intents
        reconciler.expect(intent.token, intent.emails)
    # Soonest landed first: a listing serves every intent whose time has come.
    waiting = sorted(history.unknown, key=lambda i: i.in_progress_until(request_timeout, delay))
    for number, intent in enumerate(waiting):
        landed = intent.in_progress_until(request_timeout, delay)
        if (wait := landed - clock.time()) > 0:
            log.info("resume.waiting", token=intent.token, seconds=round(wait, 3),
                     reason="an earlier request may still be in progress")  # fmt: skip
            if not await sleep_unless(clock, wait, reconciler.stop):
                left = waiting[number:]
                log.warning("resume.stopped_waiting", intents=len(left))
                history.blocked.update(pair_key(i.token, e) for i in left for e in i.emails)
                return
        now = clock.time()
        try:
            # Any listing started once it landed will do: one serves all of a token's.
            found = await reconciler.created_since(intent.token, intent.emails, intent.at,
                                                   landed)  # fmt: skip
        except SendError as exc:
            log.error("reconcile.failed", token=intent.token, emails=len(intent.emails),
                      error=exc.message)  # fmt: skip
            history.blocked.update(pair_key(intent.token, e) for e in intent.emails)
            continue
        except Stopped:  # stopped while listing: this intent and the rest stay open
            history.blocked.update(pair_key(i.token, e) for i in waiting[number:]
                                   for e in i.emails)  # fmt: skip
            raise
        outcome = found_outcome(intent.token, intent.emails, found, started_at=intent.at,
                                finished_at=clock.time(), clears=(intent.id,))  # fmt: skip
        created = len(outcome.emails) if outcome else 0
        if outcome:
            history.settled_now.update((pair_key(intent.token, e), intent.token)
                                       for e in outcome.emails)  # fmt: skip
        log.info("resume.reconciled", token=intent.token, created=created,
                 not_created=len(intent.emails) - created)  # fmt: skip
        # Nothing found still clears the intent: an empty outcome carries the clear.
        yield outcome or Outcome(intent.token, [], Status.SENT, None, 0, intent.at, now,
                                 clears=(intent.id,))  # fmt: skip
