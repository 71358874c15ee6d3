"""``--add-invitees``: adding addresses to a shared dashboard's invitees, and nothing else.

Made in the rounds of :mod:`worker.send.rounds`: read twice, write only if nobody changed
the dashboard in between, then read back — every earlier invitee unchanged and every new
one present. Nothing is ever removed or changed. What a write applied without an answer
did shows in a later read: its addresses shown with the expiration it wrote are its own.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from worker.send.client import InvitationClient
from worker.send.compact import iso_epoch
from worker.send.replies import Dashboard
from worker.send.rounds import Events, LockLost, Paced, edit, invitee_list, writable

log = structlog.get_logger("worker.invitees")

#: Called as an edit's write is about to leave: whether the edit's lock was held all
#: along (False: lost, and taken again since; see worker.queue.edits).
Confirm = Callable[[], Awaitable[bool]]


async def add_invitees(
    paced: Paced, client: InvitationClient, token: str, emails: list[str],
    expires: str | None = None, confirm: Confirm | None = None,
) -> list[str] | None:  # fmt: skip
    """Add ``emails`` to ``token``'s invitees; those of them it added (the others were
    there already), or None if it failed.

    ``paced`` runs one request through the run's pacer and retry policy. The new invitees'
    ``access_expiration`` is ``expires`` (``--access-expires``; None: never). ``confirm``,
    called as the write is about to leave, says whether the edit's lock was held all
    along (see worker.queue.edits); False: the write does not go, the dashboard is read
    again.
    """

    async def write(body: dict[str, Any]) -> Dashboard:
        if confirm is not None and not await confirm():
            raise LockLost
        return await client.put_dashboard(token, body)

    read = functools.partial(client.get_dashboard, token)
    return await edit(_Adding(emails, expires), paced, read, write, token)


class _Adding:
    """Adding ``emails`` (see :class:`worker.send.rounds.Change`)."""

    log = log
    events = Events("invitees.concurrent_edit", "invitees.write_unsettled",
                    "invitees.update_failed", "invitees.added", "added")  # fmt: skip

    def __init__(self, emails: list[str], expires: str | None) -> None:
        self._emails, self._expires, self._until = emails, expires, iso_epoch(expires)
        self._unanswered: dict[str, str] = {}  # lower-cased -> as given: in a write with no answer
        self._added: list[str] = []  # of those, the ones the dashboard showed added since
        self._new: list[str] = []  # in the planned write
        self._kept: list[dict[str, Any]] = []  # the invitees it keeps as they were

    @property
    def pending(self) -> bool:
        return bool(self._unanswered)

    def _shown(self, doc: dict[str, Any]) -> set[str]:
        """Take what an unanswered write added, as ``doc`` shows it; the addresses shown."""
        shown = {i["email"].lower(): i for i in invitee_list(doc)}
        # Ours as far as can be told: shown, with the expiration that write gave it.
        self._added.extend(e for k, e in self._unanswered.items()
                           if k in shown and _expiry(shown[k]) == self._until)  # fmt: skip
        self._unanswered.clear()  # the rest: not added, written again if still missing
        return set(shown)

    def settle(self, doc: dict[str, Any]) -> bool:
        return {e.lower() for e in self._emails} <= self._shown(doc)

    def plan(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        present = self._shown(doc)
        self._new = [e for e in dict.fromkeys(self._emails) if e.lower() not in present]
        if not self._new:
            return None
        body = writable(doc)
        self._kept = invitee_list(doc)
        added = ({"email": e, "access_expiration": self._expires} for e in self._new)
        body["invitees"] = [*self._kept, *added]
        return body

    def unanswered(self) -> None:
        self._unanswered.update((e.lower(), e) for e in self._new)

    def answered(self) -> None:
        pass  # added once the read-back shows them

    def check(self, after: dict[str, Any]) -> dict[str, Any] | None:
        now = {i["email"].lower(): i for i in invitee_list(after)}
        intact = all(now.get(i["email"].lower()) == i for i in self._kept)
        if intact and all(e.lower() in now for e in self._new):
            self._added += self._new
            return None
        return {"intact": intact}

    def result(self) -> list[str]:
        return self._added


def _expiry(item: dict[str, Any]) -> float | None:
    value = item.get("access_expiration")
    return iso_epoch(value) if isinstance(value, str) else None
