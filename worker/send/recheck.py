"""``--add-invitees``: once a file run has sent everything, are the entries it made still
on the dashboards?

Another writer (a second run on the same dashboard, a person editing it by hand) reads a
dashboard and writes back what it read. With no version or ETag, an entry this run added
in between is gone without a trace, and its person holds an invitation that grants
nothing; a later run skips them as invited. Nothing can prevent that (see
docs/who-gets-invited.md); what can be done is to look.

So after the last send, every dashboard the run vouched for (each address an add made
sure of, held as 8-byte keys while the run lasts) is read again. Whoever of them has no
entry and holds an invitation is added back through the run's own add (read twice,
write once, read back), recorded as a ``skipped`` note carrying ``invitees_added``, and
the dashboard is looked at again, up to :data:`LOOKS` times. Whoever still has no entry
then is lost: ``invitees.lost``, the summary's ``invitees_lost``, exit 1; a dashboard
that could not be read counts its people in ``invitees_unchecked``, exit 1 too. Who has
no entry and no invitation was refused by the service (their row failed), and the next
run adds and sends them. Only those the list still names are looked at: an entry for
someone it no longer names is not this run's to restore. A run that did not end with
everyone looked at and nobody lost (a stop, a kill, a loss, a failed read) leaves its
adds to the next ``--resume`` run's look (``Replay.unlooked``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import structlog

from worker.errors import AuthError, SendError, Stopped, TokenNotFound
from worker.send.boards import sharing_refusal
from worker.send.compact import key_set
from worker.validate.dedupe import member

if TYPE_CHECKING:
    from array import array

    import numpy as np
    import numpy.typing as npt

    from worker.clock import Clock
    from worker.record.report import Report
    from worker.send.listed import SharedDashboard
    from worker.send.reconcile import Reconciler
    from worker.validate.dedupe import PairIndex

    #: Sorted 64-bit address keys (``send.compact``).
    Keys: TypeAlias = npt.NDArray[np.int64]

log = structlog.get_logger("worker.invitees")

#: Looks at a dashboard: after each but the last, the missing are added back.
LOOKS = 3


class Adds(Protocol):
    """What the recheck needs of the run's dashboard check (``send.preflight.Preflight``)."""

    async def read_board(self, token: str) -> SharedDashboard: ...

    async def add(self, token: str, emails: list[str]) -> tuple[list[str] | None, str | None]: ...


@dataclass
class Looked:
    """What a look found: people lost, and people whose dashboard could not be read
    (both left to the next ``--resume`` run's look)."""

    lost: int = 0
    unchecked: int = 0


def named_in(index: PairIndex | None) -> Callable[[str, Keys], Keys]:
    """What of a token's address keys ``index`` (the input's valid pairs, the validator's
    duplicate index) names; nothing without one."""

    def named(token: str, keys: Keys) -> Keys:
        return keys[index.holds_with(token, keys.tolist())] if index is not None else keys[:0]

    return named


async def recheck(
    vouched: dict[str, array[int]],
    adds: Adds,
    reconciler: Reconciler,
    report: Report,
    clock: Clock,
    *,
    named: Callable[[str, Keys], Keys],
    concurrency: int,
    stop: asyncio.Event,
) -> Looked:
    """Look at each dashboard of ``vouched`` (token -> the keys of the addresses the adds
    made sure of, 8 bytes each), ``concurrency`` at a time, at those of them the list
    still names (``named``: the keys of a token it names); add back who lost their entry."""
    import numpy as np

    pending = iter(list(vouched.items()))
    looked = Looked()
    refused: list[AuthError] = []

    async def work() -> None:
        for token, added in pending:
            if stop.is_set():
                return
            keys = named(token, np.unique(np.frombuffer(added, np.int64)))
            if refused:  # the keys were refused: not read, so not known
                looked.unchecked += len(keys)
                continue
            try:
                looked.lost += await _one(token, keys, adds, reconciler, report, clock, stop)
            except Stopped:
                return
            except TokenNotFound:  # no dashboard left: nothing to add back into
                continue
            except SendError as exc:  # not a loss: nothing shows one, nor its absence
                looked.unchecked += len(keys)
                if isinstance(exc, AuthError):  # the keys may not read dashboards: no more
                    refused.append(exc)
                log.warning("invitees.recheck_failed", token=token, error=exc.code,
                            message=exc.message, emails=len(keys),
                            consequence="not looked at: the next run with --resume looks "
                            "again")  # fmt: skip

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(vouched)))):
                group.create_task(work())
    except* Exception as failed:  # the first failure, as itself: a fault, a bug
        raise failed.exceptions[0] from None
    return looked


async def _one(token: str, keys: Keys, adds: Adds, reconciler: Reconciler,
               report: Report, clock: Clock, stop: asyncio.Event) -> int:  # fmt: skip
    """Look at one dashboard, add back who lost their entry; how many are lost (none
    counted once the run is stopped: the next --resume looks again)."""
    for look in range(1, LOOKS + 1):
        if stop.is_set() or not len(keys):
            return 0
        board = await adds.read_board(token)
        if sharing_refusal(board.share_type, board.status) is not None:
            return 0  # nobody is sent to it any more: nothing to add back into
        if board.invitees is None and board.share_list is None:
            return 0  # it gives no allow-list to look at
        # An entry of any kind counts: one whose access expired since was not lost.
        entries = key_set([*(i.email for i in board.invitees or ()), *(board.share_list or ())])
        missing = keys[~member(entries, keys)]
        if not len(missing):
            return 0
        # Those of them invited: a fresh listing, keeping their invitations (and names).
        wanted = missing.tolist()
        listing = await reconciler.listing(token, clock.time(), wanted)
        names = [listing.invitations[k][1].email for k in wanted if k in listing.invitations]
        if not names:  # refused by the service: their rows failed, the next run adds them
            return 0
        if stop.is_set():
            return 0
        if look == LOOKS:
            log.error("invitees.lost", token=token, emails=len(names), looks=LOOKS,
                      consequence="they hold an invitation that grants nothing: someone "
                      "else keeps writing the dashboard from an older read; once they "
                      "stop, the same command with --resume looks again and adds them "
                      "back")  # fmt: skip
            return len(names)
        log.warning("invitees.missing", token=token, emails=len(names), look=look,
                    action="adding them back")  # fmt: skip
        added, until = await adds.add(token, names)
        if added:  # the others were added back by someone else meanwhile
            report.restored(token, added, until)
    return 0
