"""``--prune``: removing addresses from a shared dashboard's invitees and share list, and
nothing else.

Made in the rounds of :mod:`worker.send.rounds`, as ``--add-invitees``'s adds are: read
twice and write only if nobody changed the dashboard in between; send back every
writable field exactly as read, without the entries to remove; then read back: every
other entry unchanged and the removed ones gone. Nothing to remove, nothing written. A
write applied without an answer shows in the next read, which takes its entries as taken.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from worker.send.client import InvitationClient
from worker.send.replies import Dashboard
from worker.send.rounds import Events, Paced, edit, invitee_list, writable

log = structlog.get_logger("worker.removal")

INVITEE, SHARE_LIST = "invitee", "share_list"


async def remove_entries(
    paced: Paced,
    client: InvitationClient,
    token: str,
    gone: frozenset[str],
    took: dict[str, set[str]],
    read_now: Callable[[], Awaitable[Dashboard]],
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, set[str]] | None:
    """Remove the entries of ``gone`` (lower-cased addresses) from ``token``'s invitees and
    share list: per address removed, which entries went (``took``, fresh); None if it could
    not be done safely (the dashboard kept changing, the writes went unanswered, or the
    read-back does not show the change).

    ``took`` is filled as soon as the PUT is answered, with what it took (less, once the
    read-back shows some still there), or as a read shows what an unanswered PUT took, so
    what was taken is known whatever happens next: a stop, a failed read-back. Once
    ``stopped()``, no PUT is made (:class:`Stopped`). Cut short — a stop, a read that
    failed — after a write with no answer, one more read (``read_now``, unpaced: a stop
    refuses a paced one) says what that write took; only if it fails too are its entries
    left unrecorded (the next run revokes their invitations, recorded as that alone).
    """
    read = functools.partial(client.get_dashboard, token)
    write = functools.partial(client.put_dashboard, token)
    return await edit(_Removal(gone, took), paced, read, write, token, stopped=stopped,
                      read_now=read_now)  # fmt: skip


class _Removal:
    """Removing the entries of ``gone`` (see :class:`worker.send.rounds.Change`), with
    what was taken kept in ``took`` as it is known."""

    log = log
    events = Events("removal.concurrent_edit", "removal.write_unsettled",
                    "removal.update_failed", "removal.done", "removed")  # fmt: skip

    def __init__(self, gone: frozenset[str], took: dict[str, set[str]]) -> None:
        self._gone, self._took = gone, took
        #: What a write whose outcome is unknown was taking (settled by the next read).
        self._unanswered: dict[str, set[str]] = {}
        # The planned write: what it removes, and the invitees and share list it keeps.
        self._removed: dict[str, set[str]] = {}
        self._kept_invitees: dict[str, dict[str, Any]] = {}
        self._kept_share: set[str] = set()
        self._earlier: dict[str, set[str]] = {}  # what earlier writes took, as it was written

    @property
    def pending(self) -> bool:
        return bool(self._unanswered)

    def _settle(self, still: dict[str, set[str]]) -> None:
        """Record what an unanswered write took, as a read shows ``still`` there of the
        entries to remove (the rest: taken, by it or by someone else)."""
        _add(self._took, _gone(self._unanswered, still))
        self._unanswered.clear()

    def settle(self, doc: dict[str, Any]) -> bool:
        still = _without(doc, self._gone)[1]
        self._settle(still)
        return not still

    def plan(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        body, self._removed, self._kept_invitees, self._kept_share = _without(doc, self._gone)
        self._settle(self._removed)
        return body if self._removed else None

    def unanswered(self) -> None:
        self._unanswered = {k: set(v) for k, v in self._removed.items()}

    def answered(self) -> None:
        self._earlier = {k: set(v) for k, v in self._took.items()}
        _add(self._took, self._removed)  # answered: taken, whatever follows

    def check(self, after: dict[str, Any]) -> dict[str, Any] | None:
        took, earlier, removed = self._took, self._earlier, self._removed
        now_invitees = {i["email"].lower(): i for i in invitee_list(after)}
        now_share = _lowered(after.get("share_list"))
        intact = all(now_invitees.get(k) == v for k, v in self._kept_invitees.items())
        intact = intact and self._kept_share - {""} <= now_share
        left = [e for e in removed if e in now_invitees or e in now_share]
        for email in left:  # still there (put back, or this PUT did not take): not taken
            back = {INVITEE} if email in now_invitees else set()
            back |= {SHARE_LIST} if email in now_share else set()
            took[email] = earlier.get(email, set()) | (removed[email] - back)
            if not took[email]:
                del took[email]
        return None if intact and not left else {"intact": intact, "still_there": len(left)}

    def result(self) -> dict[str, set[str]]:
        return dict(self._took)


def _without(
    doc: dict[str, Any], gone: frozenset[str]
) -> tuple[dict[str, Any], dict[str, set[str]], dict[str, dict[str, Any]], set[str]]:
    """The PUT body: every writable field of ``doc`` as read, without the entries of
    ``gone``; the entries it removes, the invitees it keeps and the share list it keeps."""
    body = writable(doc)
    removed: dict[str, set[str]] = {}
    kept_invitees: dict[str, dict[str, Any]] = {}
    for item in invitee_list(doc):
        lower = item["email"].lower()
        if lower in gone:
            removed.setdefault(lower, set()).add(INVITEE)
        else:
            kept_invitees[lower] = item
    if isinstance(doc.get("invitees"), list):
        body["invitees"] = list(kept_invitees.values())
    elif "invitees" in body:
        body["invitees"] = doc["invitees"]  # as read (null stays null)
    share = doc.get("share_list")
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
    return body, removed, kept_invitees, kept_share


def _add(took: dict[str, set[str]], more: dict[str, set[str]]) -> None:
    """Add ``more``'s entries to ``took``'s (an address's earlier ones stay)."""
    for email, entries in more.items():
        took.setdefault(email, set()).update(entries)


def _gone(unanswered: dict[str, set[str]], still: dict[str, set[str]]) -> dict[str, set[str]]:
    """The entries of ``unanswered`` not ``still`` there, per address."""
    out = {k: v - still.get(k, set()) for k, v in unanswered.items()}
    return {k: v for k, v in out.items() if v}


def _lowered(value: Any) -> set[str]:
    return {e.lower() for e in value if isinstance(e, str)} if isinstance(value, list) else set()
