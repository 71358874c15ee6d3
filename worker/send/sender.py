"""Carrying one batch to a final outcome: pacing, retries, splitting, giving up."""

from __future__ import annotations

import random
from dataclasses import dataclass

import structlog

from worker.batching import Batch
from worker.clock import Clock
from worker.config import Config
from worker.errors import (
    AuthError,
    BadRequest,
    RateLimited,
    RetryableError,
    SendError,
    TokenNotFound,
)
from worker.report import Report
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer

log = structlog.get_logger("worker.sender")


@dataclass(slots=True)
class SendStats:
    """Request counters for the summary (outcomes are counted by the report)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    splits: int = 0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of ``base * 2**(n-1)``."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Sender:
    """Sends batches through one client and pacer, writing each final outcome to the report."""

    def __init__(
        self,
        client: InvitationClient,
        pacer: Pacer,
        report: Report,
        config: Config,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._pacer = pacer
        self._report = report
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not security
        self.stats = SendStats()
        #: Set by the first 401/403: every later batch fails without a request.
        self.abort_error: AuthError | None = None
        #: Tokens that answered 404, with the server's message.
        self.dead_tokens: dict[str, str] = {}

    @property
    def aborted(self) -> bool:
        """True once the service refused the keys; nothing more is sent."""
        return self.abort_error is not None

    async def send(self, batch: Batch) -> None:
        """Carry ``batch`` to a final, reported outcome (never raises :class:`SendError`)."""
        await self._send(batch.token, batch.emails)

    async def _send(self, token: str, emails: list[str]) -> None:
        started = self._clock.time()
        attempts = 0
        limited = 0
        while True:
            if self.abort_error is not None or token in self.dead_tokens:
                self._fail_without_request(token, emails, started, attempts, limited)
                return
            sent_at = await self._pacer.acquire()
            if self.aborted:  # another sender was refused while we waited
                self._pacer.cancel()
                continue
            self.stats.requests += 1
            try:
                result = await self._client.invite(token, emails)
            except RateLimited as exc:
                self._pacer.release(sent_at, exc.ratelimit, limited=True)
                self.stats.rate_limited += 1
                limited += 1
                continue
            except SendError as exc:
                self._pacer.release(sent_at, exc.ratelimit)
                attempts += 1
                error = exc
            else:
                self._pacer.release(sent_at, result.ratelimit)
                attempts += 1
                self._record(
                    token,
                    emails,
                    "sent",
                    result.http_status,
                    attempts,
                    None,
                    started,
                    limited,
                    result.invitations,
                )
                return

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
                await self._clock.sleep(delay)
                continue
            if isinstance(error, BadRequest) and len(emails) > 1:
                # Isolate the address(es) the service refused: halves, recursively.
                self.stats.splits += 1
                half = len(emails) // 2
                log.info("batch.split", token=token, emails=len(emails), error=error.message)
                await self._send(token, emails[:half])
                await self._send(token, emails[half:])
                return
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
                {"code": error.code, "message": error.message},
                started,
                limited,
            )
            return

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
        self._record(token, emails, "failed", None, attempts, error, started, limited)

    def _record(
        self,
        token: str,
        emails: list[str],
        status: str,
        http_status: int | None,
        attempts: int,
        error: dict[str, str] | None,
        started: float,
        limited: int,
        invitations: list[dict[str, object]] | None = None,
    ) -> None:
        finished = self._clock.time()
        self._report.batch(
            token=token,
            emails=emails,
            status=status,
            http_status=http_status,
            attempts=attempts,
            error=error,
            invitations=invitations or [],
            started_at=started,
            finished_at=finished,
            rate_limited=limited,
        )
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
