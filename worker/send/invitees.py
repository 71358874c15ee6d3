"""``--add-invitees``: adding addresses to a shared dashboard's invitees, and nothing else.

The API has no version field or ETag, so a write replaces the writable fields with what
the writer read. To keep another person's edit: read twice, write only if nobody changed
the dashboard in between (else read again, up to three times), then read back — every
earlier invitee unchanged and every new one present. Nothing is ever removed or changed.

A write is made once for the reads it came from (:class:`worker.send.retry.Once`):
refused (a 429, a 5xx), cut or unanswered, it is backed off as a retry would be and the
dashboard is read twice again — up to ``--max-attempts`` writes — so a body read before
never lands on what changed since. What a write applied without an answer did shows in
those reads, or in one more after the last round: its addresses shown with the
expiration it wrote are its own.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from worker.errors import InviteWorkerError, Stopped, UnexpectedResponse
from worker.send.client import InvitationClient
from worker.send.compact import iso_epoch
from worker.send.replies import Dashboard
from worker.send.retry import Once, Unsettled

log = structlog.get_logger("worker.invitees")

Paced = Callable[[Callable[[], Awaitable[Dashboard]]], Awaitable[Dashboard]]
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
    read = functools.partial(client.get_dashboard, token)

    async def write(body: dict[str, Any]) -> Dashboard:
        if confirm is not None and not await confirm():
            raise _LockLost
        return await client.put_dashboard(token, body)

    until = iso_epoch(expires)
    unanswered: dict[str, str] = {}  # lower-cased -> as given: in a write with no answer
    added: list[str] = []  # of those, the ones the dashboard showed added since

    def settle(doc: dict[str, Any]) -> set[str]:
        """Take what an unanswered write added, as ``doc`` shows it; the addresses shown."""
        shown = {i["email"].lower(): i for i in invitee_list(doc)}
        # Ours as far as can be told: shown, with the expiration that write gave it.
        added.extend(e for k, e in unanswered.items()
                     if k in shown and _expiry(shown[k]) == until)  # fmt: skip
        unanswered.clear()  # the rest: not added, written again if still missing
        return set(shown)

    why = CHANGING  # why the rounds ran out
    changes = failed = 0  # rounds that saw the dashboard change; writes that failed
    while changes < ROUNDS:
        first, before = await read_object(paced, read), await read_object(paced, read)
        present = settle(before)
        new = [e for e in dict.fromkeys(emails) if e.lower() not in present]
        if not new:  # nothing to write: no window for another person's edit to be lost
            log.info("invitees.added", token=token, added=len(added))
            return added
        if writable(first) != writable(before):
            why, changes = CHANGING, changes + 1
            log.warning("invitees.concurrent_edit", token=token, action="reading again")
            continue
        body = writable(before)
        kept = invitee_list(before)
        body["invitees"] = [*kept, *({"email": e, "access_expiration": expires} for e in new)]
        try:
            await paced(Once(functools.partial(write, body), tries=failed + 1))
        except _LockLost:  # another worker may have edited since those reads
            changes += 1
            continue
        except Unsettled as exc:
            if exc.stopped:  # what it added is allowed, and invited by the next run
                raise Stopped("stopping: the dashboard's write is not settled") from None
            if exc.maybe_applied:
                unanswered.update((e.lower(), e) for e in new)
            why, failed = UNSETTLED, failed + exc.failed
            log.warning("invitees.write_unsettled", token=token, maybe_applied=exc.maybe_applied,
                        action="giving up" if exc.final else "reading again")  # fmt: skip
            if exc.final:
                break
            continue
        after = {i["email"].lower(): i for i in invitee_list(await read_object(paced, read))}
        intact = all(after.get(i["email"].lower()) == i for i in kept)
        if intact and all(e.lower() in after for e in new):
            log.info("invitees.added", token=token, added=len(added) + len(new))
            return added + new
        log.error("invitees.update_failed", token=token, intact=intact,
                  reason="the read-back does not show the change as written")  # fmt: skip
        return None
    # The last write went unanswered: what it did shows in one more read.
    if unanswered and {e.lower() for e in emails} <= settle(await read_object(paced, read)):
        log.info("invitees.added", token=token, added=len(added))
        return added
    log.error("invitees.update_failed", token=token,
              reason=why)  # fmt: skip
    return None


async def read_object(paced: Paced, read: Callable[[], Awaitable[Dashboard]]) -> dict[str, Any]:
    """The dashboard object, read through ``paced``: what a write is made from and what
    tells what a write did, so anything but an object with an allow-list field (a page a
    proxy answered 200, a truncated body) is refused rather than read as empty."""
    answer = await paced(read)
    return dashboard_object(answer)


def dashboard_object(answer: Dashboard) -> dict[str, Any]:
    """``answer``'s object; :class:`UnexpectedResponse` if it is none (see read_object)."""
    doc = answer.raw
    if "invitees" not in doc and "share_list" not in doc:
        raise UnexpectedResponse("the shared dashboard read back is not a dashboard object "
                                 "(no invitees nor share_list)", http_status=200)  # fmt: skip
    return doc


def _expiry(item: dict[str, Any]) -> float | None:
    value = item.get("access_expiration")
    return iso_epoch(value) if isinstance(value, str) else None


class _LockLost(InviteWorkerError):
    """The edit's lock was lost before its write left (taken again since)."""


#: Rounds whose two reads disagree before an edit is given up (failed writes: as many as
#: --max-attempts allows), and why it was.
ROUNDS = 3
CHANGING = "the dashboard kept changing while being read"
UNSETTLED = "its writes kept failing (refused or unanswered) up to --max-attempts"


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
