"""``--prune``: removing addresses from a shared dashboard's invitees and share list, and
nothing else.

The discipline of ``--add-invitees`` (see :mod:`worker.send.invitees`): the API has no
version field or ETag, so read twice and write only if nobody changed the dashboard in
between (else read again, up to three times); send back every writable field exactly as
read, without the entries to remove; then read back: every other entry unchanged and the
removed ones gone. Nothing to remove, nothing written. A write goes once for the reads it
was made from (see :class:`worker.send.retry.Once`): one that was applied without an
answer shows in the next read, which takes its entries as taken.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from worker.errors import InviteWorkerError, SendError, Stopped
from worker.send.client import InvitationClient
from worker.send.invitees import (
    CHANGING,
    ROUNDS,
    UNSETTLED,
    Paced,
    dashboard_object,
    invitee_list,
    read_object,
    writable,
)
from worker.send.replies import Dashboard
from worker.send.retry import Once, Unsettled

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
    removal = _Removal(paced, client, token, gone, took)
    try:
        return await removal.rounds(stopped)
    except (Stopped, SendError):
        if removal.unanswered:
            with contextlib.suppress(InviteWorkerError):
                removal.settle(_without(dashboard_object(await read_now()), gone)[1])
        raise


class _Removal:
    """One dashboard's removal: its rounds of reads and a write, and what they took."""

    def __init__(self, paced: Paced, client: InvitationClient, token: str,
                 gone: frozenset[str], took: dict[str, set[str]]) -> None:  # fmt: skip
        self._paced, self._client, self._token, self._gone = paced, client, token, gone
        self.took = took
        #: What a write whose outcome is unknown was taking (settled by the next read).
        self.unanswered: dict[str, set[str]] = {}

    def settle(self, still: dict[str, set[str]]) -> None:
        """Record what an unanswered write took, as a read shows ``still`` there of the
        entries to remove (the rest: taken, by it or by someone else)."""
        _add(self.took, _gone(self.unanswered, still))
        self.unanswered.clear()

    async def _read(self) -> dict[str, Any]:
        return await read_object(self._paced, functools.partial(self._client.get_dashboard,
                                                                 self._token))  # fmt: skip

    async def rounds(self, stopped: Callable[[], bool]) -> dict[str, set[str]] | None:
        """Read twice, write once, read back; up to :data:`ROUNDS` times."""
        token, gone, took = self._token, self._gone, self.took
        why = CHANGING  # why the rounds ran out
        changes = failed = 0  # rounds that saw the dashboard change; writes that failed
        while changes < ROUNDS:
            first, before = await self._read(), await self._read()
            body, removed, kept_invitees, kept_share = _without(before, gone)
            self.settle(removed)
            if not removed:  # nothing to write
                return dict(took)
            if writable(first) != writable(before):
                why, changes = CHANGING, changes + 1
                log.warning("removal.concurrent_edit", token=token, action="reading again")
                continue
            if stopped():  # a stop came while the dashboard was read: nothing taken yet
                raise Stopped("stopping: the dashboard was not changed")
            write = functools.partial(self._client.put_dashboard, token, body)
            try:
                await self._paced(Once(write, tries=failed + 1))
            except Unsettled as exc:
                if exc.maybe_applied:
                    self.unanswered = {k: set(v) for k, v in removed.items()}
                if exc.stopped:  # settled by the caller's one more read
                    raise Stopped("stopping: the dashboard's write is not settled") from None
                why, failed = UNSETTLED, failed + exc.failed
                log.warning("removal.write_unsettled", token=token,
                            maybe_applied=exc.maybe_applied,
                            action="giving up" if exc.final else "reading again")  # fmt: skip
                if exc.final:
                    break
                continue
            earlier = {k: set(v) for k, v in took.items()}  # what earlier writes took
            _add(took, removed)  # answered: taken, whatever follows
            after = await self._read()
            now_invitees = {i["email"].lower(): i for i in invitee_list(after)}
            now_share = _lowered(after.get("share_list"))
            intact = all(now_invitees.get(k) == v for k, v in kept_invitees.items())
            intact = intact and kept_share - {""} <= now_share
            left = [e for e in removed if e in now_invitees or e in now_share]
            for email in left:  # still there (put back, or this PUT did not take): not taken
                back = {INVITEE} if email in now_invitees else set()
                back |= {SHARE_LIST} if email in now_share else set()
                took[email] = earlier.get(email, set()) | (removed[email] - back)
                if not took[email]:
                    del took[email]
            if intact and not left:
                log.info("removal.done", token=token, removed=len(took))
                return dict(took)
            log.error("removal.update_failed", token=token, intact=intact,
                      still_there=len(left),
                      reason="the read-back does not show the change as written")  # fmt: skip
            return None
        # The last write went unanswered: what it did shows in one more read.
        if self.unanswered:
            still = _without(await self._read(), gone)[1]
            self.settle(still)
            if not still:
                log.info("removal.done", token=token, removed=len(took))
                return dict(took)
        log.error("removal.update_failed", token=token, reason=why)
        return None


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
