"""``--prune``'s last step on a dashboard: take away its entries, then its invitations,
each recorded in the report as it goes (see :func:`take_away`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from worker.errors import BadRequest
from worker.send.prune import INVITATION, Pruner, Survey
from worker.send.removal import INVITEE, SHARE_LIST

if TYPE_CHECKING:
    from worker.record.report import Report


async def take_away(
    pruner: Pruner,
    report: Report,
    survey: Survey,
    stop: asyncio.Event,
    refuse: Callable[[str], None],
) -> None:
    """Entries first (no new link can be asked for), then invitations, in batches.
    ``refuse`` records why the entries could not be taken (and so nothing was revoked),
    before what they took is: a report that then fails to write keeps the refusal.

    Every entry a PUT took is recorded before this returns or raises: with the
    invitation, as its DELETE leaves (see :func:`_revoke`); alone, when the person holds
    none, or when their DELETE is not made (a stop, a refusal) or the read-back fails.
    Otherwise a person back on the list would be taken for served with no entry, and
    nothing would say why. Only a kill leaves those whose DELETE had not left yet with
    entries gone unrecorded: they still hold their invitation, and a ``--prune
    --add-invitees`` run adds their entry back if the list names them again.
    """
    token, entries = survey.token, survey.holding(INVITEE) + survey.holding(SHARE_LIST)
    took: dict[str, set[str]] = {}  # lower-cased address -> entries the PUT took
    recorded: set[str] = set()  # lower-cased addresses with their revoked record

    def record_entries(but: Collection[str] = ()) -> None:
        """Record what the PUT took from those not recorded yet (nor in ``but``)."""
        left = [(survey.remove[k][0], v) for k, v in took.items()
                if k not in recorded and k not in but]  # fmt: skip
        for what, emails in groups(left).items():
            recorded.update(e.lower() for e in emails)  # once: a write the disk refused too
            report.revoked(token, emails, list(what))

    try:
        if entries and await pruner.remove_entries(token, entries, took) is None:
            gone = "nothing was removed from it"
            if took:
                gone = (f"{len(took):,} people's entries are gone all the same (recorded), "
                        "no invitation was revoked")  # fmt: skip
            refuse(f"the dashboard's invitees could not be changed safely (see "
                   f"removal.update_failed): {gone}; run again")  # fmt: skip
            return
        invited = survey.holding(INVITATION)
        record_entries(but={e.lower() for e in invited})  # holders: with their invitation
        await _revoke(pruner, report, token, invited, took, recorded, stop)
    finally:
        record_entries()


async def _revoke(pruner: Pruner, report: Report, token: str, invited: list[str],
                  took: dict[str, set[str]], recorded: set[str],
                  stop: asyncio.Event) -> None:  # fmt: skip
    """Revoke the invitations of ``invited`` in list-form DELETEs, each recorded (with the
    entries the PUT ``took`` from them) before it leaves, adding those recorded to
    ``recorded``.

    Before, not after: a DELETE whose answer never comes (the process killed while it is
    out) may have revoked them, and a report still saying them served would make the next
    ``--resume`` skip them when the list names them again, with neither invitation nor
    entry. A record of a revocation that then did not happen (the batch refused, or
    stopped in its wait) only makes the next run check them against the service
    (invited: skipped; not named: revoked again), and it overstates the counts by that
    one batch; a batch not yet begun is not recorded.
    """
    batches = [invited]
    while batches:
        if stop.is_set():
            return
        batch = batches.pop(0)
        if not batch:  # nobody's invitation to revoke (only entries went)
            continue
        size = pruner.list_size()
        if len(batch) > size:
            batches[:0] = [batch[:size], batch[size:]]
            continue
        fresh = [e for e in batch if e.lower() not in recorded]  # halves are recorded
        recorded.update(e.lower() for e in fresh)  # once: a write the disk refused too
        held = ((e, took.get(e.lower(), set()) | {INVITATION}) for e in fresh)
        for what, emails in groups(held).items():
            report.revoked(token, emails, list(what))
        if pruner.durable and fresh:  # --fsync: the record survives a power loss too
            await report.sync()
        try:
            await pruner.revoke(token, batch)
        except BadRequest:
            if len(batch) == 1:
                raise
            # Refused for its size, or for one address in it: halves find out which.
            batches[:0] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
            pruner.splits += 1


def groups(removals: Iterable[tuple[str, set[str]]]) -> dict[tuple[str, ...], list[str]]:
    """(address, what is removed) pairs grouped by what: one record per group."""
    out: dict[tuple[str, ...], list[str]] = {}
    for email, what in removals:
        if what:
            out.setdefault(tuple(sorted(what)), []).append(email)
    return out
