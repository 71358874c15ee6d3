"""``--add-invitees``: adding addresses to a shared dashboard's invitees, and nothing else.

The API has no version field or ETag, so a write replaces the writable fields with what
the writer read. To keep another person's edit: read twice, write only if nobody changed
the dashboard in between (else read again, up to three times), then read back — every
earlier invitee unchanged and every new one present. Nothing is ever removed or changed.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from worker.errors import InviteWorkerError
from worker.send.client import InvitationClient
from worker.send.replies import Dashboard

log = structlog.get_logger("worker.invitees")

Paced = Callable[[Callable[[], Awaitable[Dashboard]]], Awaitable[Dashboard]]
#: Called as an edit's write is about to leave: whether the edit's lock was held all
#: along (False: lost, and taken again since; see worker.queue.edits).
Confirm = Callable[[], Awaitable[bool]]


async def add_invitees(
    paced: Paced, client: InvitationClient, token: str, emails: list[str],
    expires: str | None = None, confirm: Confirm | None = None,
) -> int | None:  # fmt: skip
    """Add ``emails`` to ``token``'s invitees; how many were new, or None if it failed.

    ``paced`` runs one request through the run's pacer and retry policy. The new invitees'
    ``access_expiration`` is ``expires`` (``--access-expires``; None: never). ``confirm``,
    called as the write is about to leave, says whether the edit's lock was held all
    along (see worker.queue.edits); False: the write does not go, the dashboard is read
    again.
    """
    read = functools.partial(client.get_dashboard, token)

    async def write(body: dict[str, Any]) -> Dashboard:
        if confirm is not None and not await confirm():
            raise _LockLost
        return await client.put_dashboard(token, body)

    for _ in range(3):
        first, before = (await paced(read)).raw, (await paced(read)).raw
        if writable(first) != writable(before):
            log.warning("invitees.concurrent_edit", token=token, action="reading again")
            continue
        body = writable(before)
        kept = invitee_list(before)
        present = {i["email"].lower() for i in kept}
        new = [e for e in dict.fromkeys(emails) if e.lower() not in present]
        body["invitees"] = [*kept, *({"email": e, "access_expiration": expires} for e in new)]
        try:
            await paced(functools.partial(write, body))
        except _LockLost:  # another worker may have edited since those reads
            continue
        after = {i["email"].lower(): i for i in invitee_list((await paced(read)).raw)}
        intact = all(after.get(i["email"].lower()) == i for i in kept)
        if intact and all(e.lower() in after for e in new):
            log.info("invitees.added", token=token, added=len(new))
            return len(new)
        log.error("invitees.update_failed", token=token, intact=intact,
                  reason="the read-back does not show the change as written")  # fmt: skip
        return None
    log.error("invitees.update_failed", token=token,
              reason="the dashboard kept changing while being read")  # fmt: skip
    return None


class _LockLost(InviteWorkerError):
    """The edit's lock was lost before its write left (taken again since)."""


#: The fields of a shared dashboard a PUT carries back: every writable one, as read.
WRITABLE = ("global_time", "global_time_selectable_enabled", "selectable_template_vars",
            "share_type", "status", "expiration", "embeddable_domains", "title",
            "viewing_preferences", "share_list", "invitees")  # fmt: skip


def writable(doc: dict[str, Any]) -> dict[str, Any]:
    """The writable fields of a dashboard object exactly as read (invitees: email and
    access expiration, the fields an update takes)."""
    body = {k: doc[k] for k in WRITABLE if k in doc}
    if "invitees" in body:
        body["invitees"] = invitee_list(doc)
    return body


def invitee_list(doc: dict[str, Any]) -> list[dict[str, Any]]:
    items = doc.get("invitees")
    return [
        {"email": i["email"], "access_expiration": i.get("access_expiration")}
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and isinstance(i.get("email"), str)
    ]
