"""The exception hierarchy.

Every error the worker raises derives from :class:`InviteWorkerError`. Sending errors are
split into :class:`RetryableError` (try the same request again later) and
:class:`PermanentError` (do not); the sender decides what to do from the *type* alone.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import ClassVar


class InviteWorkerError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(InviteWorkerError):
    """Bad options, configuration or input shape: nothing was sent (exit code 2)."""


class ReportLocked(UsageError):
    """Another live process holds the report (and its journal): this run must not start."""


class FatalError(InviteWorkerError):
    """The run cannot go on safely: nothing more is sent, in-flight requests get ``--grace``,
    what is unsettled is left for ``--resume`` (or pending in the stream), and the run exits 3.
    """

    code = "fatal"


class StorageError(FatalError):
    """Writing the report or the journal failed (a full disk, EIO, a quota)."""

    code = "storage_error"

    def __init__(self, path: object, cause: OSError) -> None:
        errno_name = errno.errorcode.get(cause.errno or 0, "") if cause.errno else ""
        reason = cause.strerror or str(cause)
        super().__init__(
            f"cannot write {str(path)!r}: {reason}{f' ({errno_name})' if errno_name else ''}. "
            "Nothing more is sent. Free space (or fix the disk), then run the same command "
            "again with --resume (if it finds no run in the report, nothing was sent: run "
            "it without --resume); to continue elsewhere, copy the report and its .journal "
            "together and point --report at the copy"
        )
        self.path = path
        self.cause = cause


#: What a halted run's message advises: the file's run continued, a dry run made again.
RUN_AGAIN = "run the same command again (a run of a file with --resume; a dry run as it was)"


class ServiceUnreachable(FatalError):
    """No connection to the API could ever be made: nothing reached the service."""

    code = "service_unreachable"


class WrongUrl(FatalError):
    """Every answer so far is a 404, even where the API always answers: no API at that URL."""

    code = "wrong_url"


class QueueLost(FatalError):
    """The Redis stream, its group or the server itself is gone for good."""

    code = "queue_lost"


class ConsumerTakenOver(FatalError):
    """Another process took over a queue worker's ``--consumer`` name while the worker did
    not renew it (see :mod:`worker.queue.lease`): nothing more is sent there (exit 3)."""

    code = "consumer_taken_over"


class QueueUnreachable(FatalError):
    """Redis did not answer when the command started: nothing was read, sent or added. A
    fault like an unreachable API (exit 3, run again), not a mistake in the command."""

    code = "queue_unreachable"


class InternalError(FatalError):
    """A part of the run (the reader, a sender, the flusher, the progress) raised something
    unexpected: a bug. The run halts as for any fault, so nothing is lost or sent twice."""

    code = "internal_error"

    def __init__(self, role: str, cause: BaseException) -> None:
        super().__init__(
            f"unexpected {type(cause).__name__} in the {role}: {cause}. Nothing more is sent "
            f"and nothing is lost; {RUN_AGAIN} "
            "and report this error with the log"
        )
        self.role = role
        self.cause = cause


class Stopped(InviteWorkerError):
    """The run is stopping: a request was not made, or a wait not sat out.

    Not a :class:`SendError`: nothing failed, and what was not settled stays for
    ``--resume`` (or pending in the stream).
    """


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What one response's ``X-RateLimit-*`` headers said (``None`` where absent or garbled)."""

    limit: int | None = None
    period: float | None = None
    remaining: int | None = None
    reset: float | None = None
    name: str | None = None


class SendError(InviteWorkerError):
    """A request for one batch did not succeed.

    ``code`` is the stable, machine-readable name written to the report; ``message`` is the
    human explanation (the server's own words where it gave any).
    """

    code = "send_error"
    #: Sending the same request again would get the same answer: ``--resume`` skips it.
    final: ClassVar[bool] = False
    #: In queue mode the message stays pending, to be delivered again, instead of going to
    #: the dead-letter stream (the failure says nothing about the message itself).
    keep_pending: ClassVar[bool] = False
    _by_code: ClassVar[dict[str, type[SendError]]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        SendError._by_code[cls.code] = cls

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        ratelimit: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.ratelimit = ratelimit


class RetryableError(SendError):
    """Sending again later may succeed."""

    code = "retryable"


class RateLimited(RetryableError):
    """429: the organization's budget is spent until the window resets. Not a failed attempt."""

    code = "rate_limited"


class ConnectionFailed(RetryableError):
    """The connection could not be made: nothing was sent, so re-sending is safe."""

    code = "connection_error"


class HeldUp(ConnectionFailed):
    """A write held up past what its intent allows was kept from leaving (see
    ``worker.send.leaving``): no request was made, so it goes again with a new intent."""


class OutcomeUnknown(RetryableError):
    """The request went out but no verdict came back: the service may have acted on it.

    A POST that ends this way must not simply be re-sent (that could email someone twice);
    the token's invitations are listed first to see what was created. As a batch's final
    failure, it means the list could not be read to check.
    """

    code = "outcome_unknown"
    keep_pending = True


class ServerError(OutcomeUnknown):
    """5xx (or 408) from the service or a proxy in front of it."""

    code = "server_error"
    keep_pending = False  # settled by listing on each attempt: known not created


class RequestTimeout(OutcomeUnknown):
    """No complete answer within ``--timeout`` seconds."""

    code = "timeout"
    keep_pending = False  # settled by listing on each attempt: known not created


class ConnectionDropped(OutcomeUnknown):
    """The connection broke after the request was sent."""

    code = "connection_dropped"
    keep_pending = False  # settled by listing on each attempt: known not created


class ListingMoved(RetryableError):
    """The token's invitation list kept changing while it was read (invitations revoked
    meanwhile): who is invited cannot be told now, so nobody of the token is sent. It
    may settle: ``--resume`` reads it again, and in queue mode the messages stay pending,
    to be claimed and checked again after ``--claim-idle``."""

    code = "listing_moved"
    keep_pending = True


class PermanentError(SendError):
    """Sending the same request again will fail the same way."""

    code = "permanent"


class BadRequest(PermanentError):
    """400: the batch (or an address in it) was refused, e.g. not on the share list.

    ``named`` holds the batch's addresses the service's message names (empty when it names
    none, or when it cannot be trusted to: see ``worker.send.refusals``).
    """

    code = "bad_request"
    final = True
    named: list[str] = []  # noqa: RUF012 - read-only default; set per instance


class AuthError(PermanentError):
    """401/403: the keys are wrong or lack ``dashboards_invite_share``. Stops the whole run."""

    code = "forbidden"
    keep_pending = True  # about the keys, not the message


class Aborted(PermanentError):
    """Not sent: the run stopped after the service refused the keys."""

    code = "aborted"
    keep_pending = True


class TokenNotFound(PermanentError):
    """404: no shared dashboard with this token. Every batch of the token fails."""

    code = "token_not_found"
    final = True


class UnexpectedResponse(PermanentError):
    """Any other status the API does not document for this endpoint."""

    code = "unexpected_response"


def is_final(code: str) -> bool:
    """Whether a failure ``code`` written in a report is final (see ``SendError.final``)."""
    kind = SendError._by_code.get(code)
    return kind is not None and kind.final


def keeps_pending(code: str) -> bool:
    """Whether a queue message that failed with ``code`` stays pending."""
    kind = SendError._by_code.get(code)
    return kind is not None and kind.keep_pending


def pending_codes() -> list[str]:
    """Every failure code that leaves a queue message pending (see :func:`keeps_pending`)."""
    return [code for code, kind in SendError._by_code.items() if kind.keep_pending]
