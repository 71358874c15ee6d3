"""``--prune``: removing addresses from a shared dashboard's invitees and share list, and
nothing else.

The discipline of ``--add-invitees`` (see :mod:`worker.send.invitees`): the API has no
version field or ETag, so read twice and write only if nobody changed the dashboard in
between (else read again, up to three times); send back every writable field exactly as
read, without the entries to remove; then read back: every other entry unchanged and the
removed ones gone. Nothing to remove, nothing written. A write goes once for the reads it
was made from (see :func:`worker.send.invitees.once`): one that was applied without an
answer shows in the next reads, which take its entries as taken.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import structlog

from worker.errors import Stopped
from worker.send.client import InvitationClient
from worker.send.invitees import (
    CHANGING,
    ROUNDS,
    UNSETTLED,
    Paced,
    WriteAgain,
    invitee_list,
    once,
    writable,
)

log = structlog.get_logger("worker.removal")

INVITEE, SHARE_LIST = "invitee", "share_list"


async def remove_entries(
    paced: Paced,
    client: InvitationClient,
    token: str,
    gone: frozenset[str],
    took: dict[str, set[str]],
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, set[str]] | None:
    """Remove the entries of ``gone`` (lower-cased addresses) from ``token``'s invitees and
    share list: per address removed, which entries went; None if it could not be done
    safely (the dashboard kept changing, or the read-back does not show the change).

    ``took`` is filled as soon as the PUT is answered, with what it took (less, once the
    read-back shows some still there), so what was taken is known whatever happens next:
    a stop, a failed read-back. Once ``stopped()``, no PUT is made (:class:`Stopped`).
    """
    read = functools.partial(client.get_dashboard, token)
    unanswered: dict[str, set[str]] = {}  # what a write that may have been applied took
    why = CHANGING  # why the rounds ran out
    for _ in range(ROUNDS):
        first, before = (await paced(read)).raw, (await paced(read)).raw
        if writable(first) != writable(before):
            why = CHANGING
            log.warning("removal.concurrent_edit", token=token, action="reading again")
            continue
        body = writable(before)
        removed: dict[str, set[str]] = {}
        kept_invitees: dict[str, dict[str, Any]] = {}
        for item in invitee_list(before):
            lower = item["email"].lower()
            if lower in gone:
                removed.setdefault(lower, set()).add(INVITEE)
            else:
                kept_invitees[lower] = item
        if isinstance(before.get("invitees"), list):
            body["invitees"] = list(kept_invitees.values())
        elif "invitees" in body:
            body["invitees"] = before["invitees"]  # as read (null stays null)
        share = before.get("share_list")
        kept_share: set[str] = set()
        if isinstance(share, list):
            body["share_list"] = []
            for entry in share:
                lower = entry.lower() if isinstance(entry, str) else None
                if lower is not None and lower in gone:
                    removed.setdefault(lower, set()).add(SHARE_LIST)
                else:
                    body["share_list"].append(entry)
                    kept_share.add(lower or "")
        # An unanswered write's entries these reads show gone: it took them (or someone
        # else did; they are gone either way).
        applied = _gone(unanswered, removed)
        took.update((k, set(v)) for k, v in applied.items())
        if not removed:
            return applied
        if stopped():  # a stop came while the dashboard was read: nothing taken yet
            raise Stopped("stopping: the dashboard was not changed")
        try:
            await paced(once(functools.partial(client.put_dashboard, token, body)))
        except WriteAgain:
            unanswered = {k: set(v) for k, v in removed.items()}
            why = UNSETTLED
            log.warning("removal.write_unsettled", token=token, action="reading again")
            continue
        took.update((k, set(v)) for k, v in removed.items())  # answered: taken, whatever follows
        after = (await paced(read)).raw
        now_invitees = {i["email"].lower(): i for i in invitee_list(after)}
        now_share = _lowered(after.get("share_list"))
        intact = all(now_invitees.get(k) == v for k, v in kept_invitees.items())
        intact = intact and kept_share - {""} <= now_share
        left = [e for e in removed if e in now_invitees or e in now_share]
        for email in left:  # still there (put back, or the PUT did not take): not taken
            took[email] -= {INVITEE} if email in now_invitees else set()
            took[email] -= {SHARE_LIST} if email in now_share else set()
            if not took[email]:
                del took[email]
        if intact and not left:
            log.info("removal.done", token=token, removed=len(removed) + len(applied))
            return {**applied, **removed}
        log.error("removal.update_failed", token=token, intact=intact, still_there=len(left),
                  reason="the read-back does not show the change as written")  # fmt: skip
        return None
    log.error("removal.update_failed", token=token,
              reason=why)  # fmt: skip
    return None


def _gone(unanswered: dict[str, set[str]], still: dict[str, set[str]]) -> dict[str, set[str]]:
    """The entries of ``unanswered`` not ``still`` there, per address."""
    out = {k: v - still.get(k, set()) for k, v in unanswered.items()}
    return {k: v for k, v in out.items() if v}


def _lowered(value: Any) -> set[str]:
    return {e.lower() for e in value if isinstance(e, str)} if isinstance(value, list) else set()
