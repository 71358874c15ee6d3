"""The records of the report and the journal, as types shared by the writer and every reader.

A report line is one object tagged by ``kind``: ``batch`` (an outcome, or a dry run's plan),
``rejected`` (an input row), ``skipped``, ``revoked`` and ``prune_refused`` (``--prune``)
or ``summary`` (the end of a run). A journal line is an intent
(``i``) or a clear (``c``). Fields a record does not carry are ``UNSET`` and left out when
written, so the files read the same as before these types existed, and older files decode.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from worker.outcome import Invitation, Status

#: The most of a rejected row's token and email its record keeps (hostile input is long).
TOKEN_KEPT, EMAIL_KEPT = 200, 320


class ErrorInfo(msgspec.Struct, frozen=True):
    """A failed batch's ``error``: the stable ``code`` and the human ``message``."""

    code: str
    message: str = ""


class BatchRecord(msgspec.Struct, tag_field="kind", tag="batch"):
    """A batch's final outcome (``sent``, ``failed``), or what a dry run would send."""

    token: str
    emails: list[str]
    status: Status
    http_status: int | UnsetType | None = UNSET
    attempts: int | UnsetType = UNSET
    rate_limited: int | UnsetType = UNSET
    error: ErrorInfo | UnsetType | None = UNSET
    invitations: list[Invitation] | UnsetType = UNSET
    started_at: str | UnsetType = UNSET
    finished_at: str | UnsetType = UNSET
    duration_ms: float | UnsetType = UNSET
    #: Found created by listing after an unknown outcome, not confirmed by the POST's answer.
    reconciled: bool | UnsetType = UNSET
    #: A ``planned`` batch: those of ``emails`` ``--add-invitees`` would add as invitees first.
    invitees_to_add: list[str] | UnsetType = UNSET
    #: A sent or failed batch: those of ``emails`` ``--add-invitees`` added as invitees first
    #: (access granted, whatever the send's answer).
    invitees_added: list[str] | UnsetType = UNSET
    #: With ``invitees_added``: the ``access_expiration`` they were given (``--access-expires``;
    #: null: their access never expires).
    access_expiration: str | UnsetType | None = UNSET

    @property
    def code(self) -> str | None:
        """The failure code, if the batch failed with one."""
        return self.error.code if isinstance(self.error, ErrorInfo) else None


class RejectedRecord(msgspec.Struct, tag_field="kind", tag="rejected"):
    """An input row (``line``) or stream message (``stream_id``) that was not sent."""

    reason: str  # a validate.Reason; a str, so a reader never fails on one it does not know
    line: int | UnsetType = UNSET
    stream_id: str | UnsetType = UNSET
    token: str | UnsetType = UNSET
    email: str | UnsetType = UNSET

    @property
    def where(self) -> int | str | None:
        """The line number or stream message id."""
        if isinstance(self.line, int):
            return self.line
        return self.stream_id if isinstance(self.stream_id, str) else None

    @property
    def row(self) -> RejectedRow:
        """Which row this is: its place and what it said (see :func:`rejected_row`)."""
        token = self.token if isinstance(self.token, str) else None
        email = self.email if isinstance(self.email, str) else None
        return rejected_row(self.where, self.reason, token, email)


#: A rejected row as a report tells it: (line or stream id, reason, token, email).
RejectedRow = tuple[int | str | None, str, str | None, str | None]


def rejected_row(
    where: int | str | None, reason: str, token: str | None, email: str | None
) -> RejectedRow:
    """A rejected row's identity, as its record keeps it (token and email cut to length).

    Its place alone is not enough: a daily job's list changes, and another row at the same
    line the next day is another rejection, to be recorded too. A row no reader could
    take apart has no token or email: one at the same line for the same reason is taken
    for the same row.
    """
    return (where, str(reason), token[:TOKEN_KEPT] if token else None,
            email[:EMAIL_KEPT] if email else None)  # fmt: skip


class SkippedRecord(msgspec.Struct, tag_field="kind", tag="skipped"):
    """Emails of a token not sent because the service already serves them; with
    ``invitees_added``, served but no longer allowed, and added back to the invitees
    (``--prune --add-invitees``)."""

    token: str
    emails: list[str]
    reason: str  # active_session, already_invited
    invitees_added: list[str] | UnsetType = UNSET
    access_expiration: str | UnsetType | None = UNSET


def restored(record: object) -> list[str] | None:
    """Whom ``record`` says ``--prune --add-invitees`` added back, or None for any other
    record. Such a record is a note on pairs already served (each has its own record),
    not one of their outcomes."""
    if isinstance(record, SkippedRecord) and isinstance(record.invitees_added, list):
        return record.invitees_added
    return None


class RevokedRecord(msgspec.Struct, tag_field="kind", tag="revoked"):
    """Emails of a token whose access ``--prune`` took away, and what it removed:
    ``invitation``, ``invitee``, ``share_list``. In a dry run's plan, what it would remove
    (``planned``)."""

    token: str
    emails: list[str]
    removed: list[str]
    planned: bool | UnsetType = UNSET


class PruneRefusedRecord(msgspec.Struct, tag_field="kind", tag="prune_refused"):
    """A dashboard ``--prune`` left whole, or (no ``token``) a run that pruned nothing,
    and why: ``code`` and the human ``message``."""

    code: str
    message: str
    token: str | UnsetType = UNSET
    #: The dashboard's people, and how many the list no longer names.
    people: int | UnsetType = UNSET
    remove: int | UnsetType = UNSET


class SummaryRecord(msgspec.Struct, tag_field="kind", tag="summary"):
    """The end of a run, as readers see it: the counters summed across runs."""

    #: The run's input as it was named (a path relative to where it ran, ``<stdin>``, a URL).
    source: str | UnsetType = UNSET
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    ratelimit_waits: int = 0
    duration_ms: float = 0.0
    #: How the run ended (3: stopped before the end), what it read and did not send, and
    #: the rows it never read (None: unknown, as for a pipe).
    exit_code: int | None = None
    unsent: int = 0
    unread: int | None = None
    #: ``--add-invitees``: entries still missing at the run's end, and people whose
    #: dashboard that look could not read (None: the run made no look; unset: a report
    #: written before runs made one)
    invitees_lost: int | UnsetType | None = UNSET
    invitees_unchecked: int | UnsetType | None = UNSET


ReportRecord = (
    BatchRecord
    | RejectedRecord
    | SkippedRecord
    | RevokedRecord
    | PruneRefusedRecord
    | SummaryRecord
)

#: Decodes one report line; a line of any other shape raises ``msgspec.ValidationError``.
REPORT_LINE = msgspec.json.Decoder(ReportRecord)


class JournalLine(msgspec.Struct):
    """One journal line: an intent (``i`` with token, emails, send time and the timeout it
    was sent with) or a clear."""

    i: str | UnsetType = UNSET
    c: str | UnsetType = UNSET
    token: str | UnsetType = UNSET
    emails: list[str] | UnsetType = UNSET
    at: float | UnsetType = UNSET
    #: The request timeout in force (absent in journals written before it was recorded).
    t: float | UnsetType = UNSET

    def is_clear(self) -> bool:
        """A clear: the intent it names is resolved."""
        return isinstance(self.c, str)

    def is_intent(self) -> bool:
        """An intent with every field it needs."""
        fields = (self.i, self.token, self.emails, self.at)
        return not self.is_clear() and not any(isinstance(f, UnsetType) for f in fields)


JOURNAL_LINE = msgspec.json.Decoder(JournalLine)


def encode(record: Any) -> bytes:
    """One record as its JSON line (without the newline)."""
    return msgspec.json.encode(record)
