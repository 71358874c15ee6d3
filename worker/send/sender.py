"""Carrying one batch to a final outcome: pacing, journal, retries, reconciliation, splits."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from worker.batching import Batch
from worker.clock import Clock
from worker.config import Config
from worker.errors import (
    AuthError,
    BadRequest,
    FatalError,
    OutcomeUnknown,
    RateLimited,
    RetryableError,
    SendError,
    TokenNotFound,
)
from worker.journal import IntentLog
from worker.report import Invitation, Report
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer, backoff_delay
from worker.send.reconcile import Reconciler, record_created
from worker.send.refusals import ListCap

log = structlog.get_logger("worker.sender")


@dataclass(slots=True)
class SendStats:
    """Request counters for the summary (outcomes are counted by the report)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    splits: int = 0
    unknown_outcomes: int = 0
    reconciled_sent: int = 0


class Sender:
    """Sends batches through one client and pacer, writing each final outcome to the report.

    Before each POST the intent is made durable in the journal. A POST whose outcome is
    unknown (timeout, dropped connection, 5xx) is never re-sent blindly: the token's
    invitations are listed first and only addresses without a new invitation go again.
    """

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        report: Report,
        journal: IntentLog,
        config: Config,
        clock: Clock,
        rng: random.Random | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._report = report
        self._journal = journal
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not security
        self.stopping = stopping or asyncio.Event()
        self.reconciler = Reconciler(
            client, pacer, clock,
            max_attempts=config.max_attempts,
            backoff=(config.backoff_base, config.backoff_max),
            skew=config.reconcile_skew,
            rng=self._rng,
        )  # fmt: skip
        self.stats = SendStats()
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

    async def send(self, batch: Batch) -> None:
        """Carry ``batch`` to a final, reported outcome (never raises :class:`SendError`).

        When the run is stopping, a batch not yet sent is left unrecorded: ``--resume``
        sends it later. A :class:`FatalError` (storage, an unreachable service, a lost
        queue) halts the run instead of raising.
        """
        try:
            await self._send(batch.token, batch.emails)
        except FatalError as exc:
            self.halt(exc)

    async def _send(self, token: str, emails: list[str]) -> bool:
        """Send ``emails`` in lists the service takes; True if it accepted every one.

        Whether every email was accepted is what tells a refusal about a list's size from
        one about an address in it (see :class:`ListCap`).
        """
        accepted = True
        while len(emails) > (size := self.cap.size()) and not self.stopping.is_set():
            accepted = await self._attempts(token, emails[:size]) and accepted
            emails = emails[size:]
        return await self._attempts(token, emails) and accepted

    async def _attempts(self, token: str, emails: list[str]) -> bool:
        """Carry one request's worth of emails to their outcomes (see :meth:`_send`)."""
        started = self._clock.time()
        attempts = limited = 0
        while True:
            if self.aborted or token in self.dead_tokens:
                self._fail_without_request(token, emails, started, attempts, limited)
                return False
            sent_at = await self._acquire()
            if sent_at is None:
                return False
            if self._refused():  # another sender was refused while we waited
                self._pacer.cancel()
                continue
            try:
                intent = await self._journal.intent(token, emails, sent_at)
            except BaseException:  # no intent on disk: the request must not leave
                self._pacer.cancel()
                raise
            self.stats.requests += 1
            try:
                result = await self._client.invite(token, emails)
            except FatalError:  # nothing left: no connection could be made
                self._pacer.cancel()
                with contextlib.suppress(FatalError):
                    self._journal.clear(intent)
                raise
            except RateLimited as exc:
                self._pacer.release(sent_at, exc.ratelimit, limited=True)
                self._journal.clear(intent)
                self.stats.rate_limited += 1
                limited += 1
                continue
            except OutcomeUnknown as exc:
                self._pacer.release(sent_at, exc.ratelimit)
                attempts += 1
                error: SendError = exc
                remaining = await self._settle(token, emails, intent, exc, sent_at, attempts)
                if remaining is None:  # could not tell what happened; resume will
                    self._record(
                        token,
                        emails,
                        "failed",
                        exc.http_status,
                        attempts,
                        limited,
                        started,
                        error={
                            "code": "outcome_unknown",
                            "message": f"{exc.message}; the invitation "
                            "list could not be read to check",
                        },
                    )
                    return False
                if not remaining:
                    return True
                emails = remaining
            except SendError as exc:
                self._pacer.release(sent_at, exc.ratelimit)
                self._journal.clear(intent)
                attempts += 1
                error = exc
            else:
                self._pacer.release(sent_at, result.ratelimit)
                attempts += 1
                self.cap.accept(len(emails))
                self._record(
                    token,
                    emails,
                    "sent",
                    result.http_status,
                    attempts,
                    limited,
                    started,
                    invitations=result.invitations,
                )
                # No journal clear: the report's "sent" record settles these pairs.
                return True

            if isinstance(error, RetryableError) and attempts < self._config.max_attempts:
                delay = backoff_delay(
                    attempts, self._config.backoff_base, self._config.backoff_max, self._rng
                )
                self.stats.retries += 1
                log.warning(
                    "batch.retry_scheduled",
                    token=token,
                    emails=len(emails),
                    attempt=attempts,
                    delay=round(delay, 3),
                    code=error.code,
                    http_status=error.http_status,
                    error=error.message,
                )
                slept, _ = await self._unless_stopping(self._clock.sleep(delay))
                if not slept:
                    return False
                continue
            if isinstance(error, BadRequest) and len(emails) > 1:
                if not error.named:
                    return await self._bisect(token, emails, error)
                await self._refused_named(token, emails, error, started, attempts, limited)
                return False
            if isinstance(error, AuthError) and self.abort_error is None:
                self.abort_error = error
                log.error(
                    "run.aborting",
                    reason=error.code,
                    http_status=error.http_status,
                    error=error.message,
                )
            if isinstance(error, TokenNotFound):
                self.dead_tokens[token] = error.message
            self._record(
                token,
                emails,
                "failed",
                error.http_status,
                attempts,
                limited,
                started,
                error={"code": error.code, "message": error.message},
            )
            return False

    async def _refused_named(
        self,
        token: str,
        emails: list[str],
        error: BadRequest,
        started: float,
        attempts: int,
        limited: int,
    ) -> None:
        """A 400 naming addresses: those fail, the rest goes again as one request."""
        named = set(error.named)
        log.info("batch.refused_named", token=token, emails=len(emails), refused=len(named))
        self._record(token, error.named, "failed", error.http_status, attempts, limited,
                     started, error={"code": error.code, "message": error.message})  # fmt: skip
        rest = [e for e in emails if e not in named]
        if rest:
            await self._send(token, rest)

    async def _bisect(self, token: str, emails: list[str], error: BadRequest) -> bool:
        """A 400 naming no address: halves, recursively, until the refused stand alone.

        If every part is then accepted, the service refused the list for its length: the
        cap is learned, and later lists are cut to it.
        """
        self.stats.splits += 1
        half = len(emails) // 2
        log.info("batch.split", token=token, emails=len(emails), error=error.message)
        self.cap.suspect(len(emails))
        accepted = False
        try:
            accepted = await self._send(token, emails[:half])
            accepted = await self._send(token, emails[half:]) and accepted
        finally:
            self.cap.settle(len(emails), all_accepted=accepted)
        return accepted

    async def _settle(
        self,
        token: str,
        emails: list[str],
        intent: str,
        error: OutcomeUnknown,
        sent_at: float,
        attempts: int,
    ) -> list[str] | None:
        """After an unknown outcome: record what was created; return what was not.

        Returns None when the invitation list could not be read; the intent then stays
        open in the journal for ``--resume``.
        """
        self.stats.unknown_outcomes += 1
        log.warning(
            "batch.outcome_unknown",
            token=token,
            emails=len(emails),
            code=error.code,
            http_status=error.http_status,
            error=error.message,
        )
        # Give a request that is still being processed time to land before we look.
        not_before = self._clock.time() + self._config.reconcile_delay
        await self._clock.sleep(self._config.reconcile_delay)
        try:
            found = await self.reconciler.created_since(token, emails, sent_at, not_before)
        except AuthError as exc:
            self.abort_error = self.abort_error or exc
            return None
        except SendError as exc:
            log.error("reconcile.failed", token=token, emails=len(emails), error=exc.message)
            return None
        created = record_created(
            self._report, token, emails, found, started_at=sent_at,
            finished_at=self._clock.time(), attempts=attempts, http_status=error.http_status,
        )  # fmt: skip
        if created:
            self.stats.reconciled_sent += len(created)
            log.info(
                "batch.reconciled",
                token=token,
                created=len(created),
                not_created=len(emails) - len(created),
            )
        self._journal.clear(intent)
        return [e for e in emails if e.lower() not in found]

    async def _acquire(self) -> float | None:
        """A pacer slot, or None if the run starts stopping while we wait for it."""
        sent_now = self._pacer.try_acquire()
        if sent_now is not None:
            return sent_now
        done, sent_at = await self._unless_stopping(
            self._pacer.acquire(), on_discard=lambda _: self._pacer.cancel()
        )
        return float(sent_at) if done else None

    async def _unless_stopping(
        self, step: Awaitable[Any], on_discard: Callable[[Any], None] | None = None
    ) -> tuple[bool, Any]:
        """Await ``step`` unless the run starts stopping first; ``(completed, result)``.

        When stopping wins, the step is cancelled; one that completed in the same instant
        is handed to ``on_discard`` (so an acquired pacer slot is given back).
        """
        task = asyncio.ensure_future(step)
        if not self.stopping.is_set():
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        if not self.stopping.is_set():
            return True, task.result()
        if not task.done():
            task.cancel()
        elif on_discard is not None and not task.cancelled() and task.exception() is None:
            on_discard(task.result())
        return False, None

    def _fail_without_request(
        self, token: str, emails: list[str], started: float, attempts: int, limited: int
    ) -> None:
        if self.abort_error is not None:
            error = {
                "code": "aborted",
                "message": "not sent: the run stopped after the "
                f"service refused the keys ({self.abort_error.message})",
            }
        else:
            error = {"code": TokenNotFound.code, "message": self.dead_tokens[token]}
        self._record(token, emails, "failed", None, attempts, limited, started, error=error)

    def _record(
        self,
        token: str,
        emails: list[str],
        status: str,
        http_status: int | None,
        attempts: int,
        limited: int,
        started: float,
        *,
        error: dict[str, str] | None = None,
        invitations: list[Invitation] | None = None,
    ) -> None:
        finished = self._clock.time()
        self._report.batch(
            token=token, emails=emails, status=status, http_status=http_status,
            attempts=attempts, error=error, invitations=invitations or [],
            started_at=started, finished_at=finished, rate_limited=limited,
        )  # fmt: skip
        sent = status == "sent"
        emit, event = (log.info, "batch.sent") if sent else (log.warning, "batch.failed")
        emit(
            event,
            token=token,
            emails=len(emails),
            http_status=http_status,
            attempts=attempts,
            code=error["code"] if error else None,
            ms=round((finished - started) * 1000, 1),
        )
