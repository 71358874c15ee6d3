"""What happened to a batch, as a value: what the sender returns and the runner records.

The sender never writes the report: it returns :class:`Outcome` values, and one runner
hands each to the report writer, the resume history and, in queue mode, the
acknowledger, in that order (a message is acknowledged only once its outcome is on disk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from worker.errors import SendError, TokenNotFound, is_final


class Invitation(msgspec.Struct, frozen=True):
    """What the report keeps of one invitation the service returns."""

    email: str
    created_at: str | None = None
    invitation_expiry: str | None = None


#: Codes the dashboard check fails emails with, before any POST (see ``send.preflight``).
NOT_INVITE_ONLY = "not_invite_only"
DASHBOARD_PAUSED = "dashboard_paused"
NOT_ON_SHARE_LIST = "not_on_share_list"
#: Those, and a missing dashboard: a re-run cannot fix them until the dashboard changes
#: (``report failed`` leaves them out unless asked).
REFUSED = frozenset({TokenNotFound.code, NOT_INVITE_ONLY, DASHBOARD_PAUSED, NOT_ON_SHARE_LIST})


class Status(StrEnum):
    """A batch record's status."""

    SENT = "sent"
    FAILED = "failed"
    PLANNED = "planned"
    #: Not sent because the service says it is not needed (see ``send.preflight``).
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a batch failed: a stable ``code`` and the human ``message``."""

    code: str
    message: str

    @classmethod
    def of(cls, error: SendError) -> Failure:
        """The failure an error stands for."""
        return cls(error.code, error.message)

    @property
    def final(self) -> bool:
        """Whether sending again would get the same answer (``--resume`` skips it)."""
        return is_final(self.code)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final state of some emails of one token.

    ``clears`` names journal intents to clear once the outcome is recorded: an intent whose
    invitations were found by listing may only be cleared after the ``sent`` record that
    accounts for them is written, or a crash in between would make them look unsent.
    """

    token: str
    emails: list[str]
    status: Status
    http_status: int | None
    attempts: int
    started_at: float
    finished_at: float
    error: Failure | None = None
    invitations: Sequence[Invitation] = ()
    rate_limited: int = 0
    reconciled: bool = False
    clears: tuple[str, ...] = ()
    #: Why the emails were skipped (``active_session``, ``already_invited``).
    reason: str | None = None
    #: Those of ``emails`` that ``--add-invitees`` added to the dashboard's invitees first.
    invitees_added: tuple[str, ...] = ()
    #: The ``access_expiration`` they were given (None: never expires).
    access_expiration: str | None = None
