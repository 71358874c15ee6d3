"""What a token's check holds, and what it makes of a list of emails (see ``preflight``).

The check is decided once, when the token is read, and kept compact (``send.compact``):
the allowed, those in a session and the invited as sorted arrays of address hashes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from worker.errors import SendError
from worker.outcome import NOT_ON_SHARE_LIST, Failure, Outcome, Status
from worker.send.compact import iso_epoch, key_set
from worker.validate.dedupe import member

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from worker.send.listed import SharedDashboard

log = structlog.get_logger("worker.preflight")

_EMAIL = operator.attrgetter("email")
_EXPIRY = operator.attrgetter("access_expiration")

ACTIVE_SESSION = "active_session"
ALREADY_INVITED = "already_invited"
INVITEE_UPDATE_FAILED = "invitee_update_failed"


@dataclass(slots=True)
class TokenCheck:
    """What a token's dashboard and invitations say, as of ``checked`` (epoch)."""

    checked: float
    #: The whole token is refused with this failure; nothing below applies.
    refused: Failure | None = None
    #: Keys of the addresses allowed now; None when the service gave no allow-list.
    allowed: npt.NDArray[np.int64] | None = None
    #: Keys of invitees whose access has expired (not allowed, and not to be added again:
    #: ``--add-invitees`` never changes an existing entry).
    expired: npt.NDArray[np.int64] = field(default_factory=lambda: key_set(()))
    #: Keys of the addresses skipped: with an open session, and (the others) invited.
    in_session: npt.NDArray[np.int64] = field(default_factory=lambda: key_set(()))
    invited: npt.NDArray[np.int64] = field(default_factory=lambda: key_set(()))
    #: Whether the dashboard was read (``refused`` and ``allowed`` say what it said):
    #: it is read only once a batch holds someone not yet served.
    board: bool = False
    #: Why the listing (``board`` False) or the dashboard (``board`` True) could not be
    #: read: every batch of the token fails alike until the check is made again (queue
    #: mode: after its ttl; a file: on --resume).
    unread: SendError | None = None


@dataclass(slots=True)
class Screened:
    """A list of emails sorted by what the check says of them."""

    send: list[str] = field(default_factory=list)
    refused: list[tuple[str, Failure]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> emails
    #: ``--add-invitees``: those added to the dashboard's invitees (a plan: to be added).
    added: list[str] = field(default_factory=list)
    #: The ``access_expiration`` those ``added`` were given (None: never expires).
    added_until: str | None = None
    #: The dashboard could not be read (the error), for these emails, not yet served: the
    #: served are skipped all the same.
    unread: tuple[SendError, list[str]] | None = None

    def outcomes(self, token: str, started: float, finished: float) -> list[Outcome]:
        """The refused and the skipped as outcomes (one per refusal, one per reason)."""
        out: list[Outcome] = []
        # One record per kind of refusal, told by what it says of several addresses: an
        # expired entry apart from an address never allowed (the same code, another fix).
        by_kind: dict[tuple[str, str], tuple[Failure, list[str]]] = {}
        for email, failure in self.refused:
            kind = (failure.code, refusal_message(failure))
            by_kind.setdefault(kind, (failure, []))[1].append(email)
        for (code, several), (failure, refused) in by_kind.items():
            if len(refused) > 1:
                failure = Failure(code, several)
            log.warning("batch.refused", token=token, emails=len(refused), code=code)
            out.append(Outcome(token, refused, Status.FAILED, None, 0, started, finished, failure))
        for reason, skipped in self.skipped.items():
            log.info("batch.skipped", token=token, emails=len(skipped), reason=reason)
            out.append(Outcome(token, skipped, Status.SKIPPED, None, 0, started, finished,
                               reason=reason))  # fmt: skip
        return out


def allowed_keys(
    board: SharedDashboard, now: float
) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64]]:
    """Keys of the addresses allowed now (invitees whose access has not expired, and the
    share list; None when the service gave no allow-list), and of the invitees whose
    access has expired."""
    if board.invitees is None and board.share_list is None:
        return None, key_set(())
    invitees = board.invitees or []
    # A dashboard of a million invitees is read in C: one pass for the addresses, one for
    # whether any expiry is set at all (an empty one, like none, never expires).
    emails = list(map(_EMAIL, invitees))
    expired: list[str] = []
    if any(map(_EXPIRY, invitees)):
        emails = []
        for i in invitees:
            live = not i.access_expiration or _after(i.access_expiration, now)
            (emails if live else expired).append(i.email)
    if board.share_list:
        emails += board.share_list
    allowed = key_set(emails)
    gone = key_set(expired)
    # One on the share list too is allowed, whatever its invitee entry says.
    return allowed, gone[~member(allowed, gone)] if len(gone) else gone


def _after(value: str, now: float) -> bool:
    ends = iso_epoch(value)
    return ends is None or ends > now  # an expiry we cannot read: let the service decide


NOT_ALLOWED = "neither an invitee with unexpired access nor on the dashboard's share list"


def not_allowed(email: str) -> Failure:
    """The refusal of one address the dashboard does not allow."""
    return Failure(NOT_ON_SHARE_LIST, f"{email} is {NOT_ALLOWED}; add it to the invitees")


EXPIRED = ("an invitee whose access has expired, which a run never extends: extend it on "
           "the dashboard, or remove the entry and let --add-invitees add it again")  # fmt: skip


def access_expired(email: str) -> Failure:
    """The refusal of one address whose invitee entry has expired (``--add-invitees``
    leaves existing entries as they are)."""
    return Failure(NOT_ON_SHARE_LIST, f"{email} is {EXPIRED}")


def refusal_message(failure: Failure) -> str:
    """The message for several emails refused alike (one record for them all)."""
    if failure.code == NOT_ON_SHARE_LIST and EXPIRED in failure.message:
        return f"each address is {EXPIRED}"
    if failure.code == NOT_ON_SHARE_LIST:
        return f"each address is {NOT_ALLOWED}; add them to the invitees"
    return failure.message
