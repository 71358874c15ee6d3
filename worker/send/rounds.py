"""One edit of a shared dashboard, made safely: the rounds ``--add-invitees`` and
``--prune`` share (what each changes: :mod:`worker.send.invitees`,
:mod:`worker.send.removal`).

The API has no version field or ETag, so a write replaces the writable fields with what
the writer read. To keep another person's edit: read twice, write only if nobody changed
the dashboard in between (else read again, up to :data:`ROUNDS` times), then read back.

A write is made once for the reads it came from (:class:`worker.send.paced.Once`):
refused (a 429, a 5xx), cut or unanswered, it is backed off as a retry would be and the
dashboard is read twice again — up to ``--max-attempts`` writes — so a body read before
never lands on what changed since. What a write applied without an answer did shows in
those reads, or in one more after the last round.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from structlog.typing import FilteringBoundLogger

from worker.errors import InviteWorkerError, SendError, Stopped, UnexpectedResponse
from worker.send.paced import Once, Unsettled
from worker.send.replies import Dashboard

Paced = Callable[[Callable[[], Awaitable[Dashboard]]], Awaitable[Dashboard]]
R = TypeVar("R", bound=Sized, covariant=True)

#: Rounds whose two reads disagree before an edit is given up (failed writes: as many as
#: --max-attempts allows), and why it was.
ROUNDS = 3
CHANGING = "the dashboard kept changing while being read"
UNSETTLED = "its writes kept failing (refused or unanswered) up to --max-attempts"

#: The fields of a shared dashboard a PUT carries back: every writable one, as read.
WRITABLE = ("global_time", "global_time_selectable_enabled", "selectable_template_vars",
            "share_type", "status", "expiration", "embeddable_domains", "title",
            "viewing_preferences", "share_list", "invitees")  # fmt: skip


class LockLost(InviteWorkerError):
    """The edit's lock was lost before its write left (taken again since): the write did
    not go, and the dashboard is read again."""


@dataclass(frozen=True, slots=True)
class Events:
    """An edit's event names, each spelled out where it is made (docs/running.md lists
    them), and the done event's count field."""

    concurrent_edit: str
    write_unsettled: str
    update_failed: str
    done: str
    count: str


class Change(Protocol, Generic[R]):
    """What one edit changes, told by the dashboard objects the rounds read."""

    #: The edit's logger and its events.
    log: FilteringBoundLogger
    events: Events

    @property
    def pending(self) -> bool:
        """Whether a write whose answer never came may have been applied."""

    def settle(self, doc: dict[str, Any]) -> bool:
        """Take what an unanswered write did, as ``doc`` shows it; whether nothing is
        left to do."""

    def plan(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Settle by ``doc`` (as :meth:`settle`), then the write's body from it; None:
        nothing to write."""

    def unanswered(self) -> None:
        """The planned write may have been applied: the next read settles it."""

    def answered(self) -> None:
        """The planned write was answered (before its read-back)."""

    def check(self, after: dict[str, Any]) -> dict[str, Any] | None:
        """Whether the read-back ``after`` shows the write as made: None, or what to log."""

    def result(self) -> R:
        """What the edit did."""


async def edit(
    change: Change[R],
    paced: Paced,
    read: Callable[[], Awaitable[Dashboard]],
    write: Callable[[dict[str, Any]], Awaitable[Dashboard]],
    token: str,
    *,
    stopped: Callable[[], bool] = lambda: False,
    read_now: Callable[[], Awaitable[Dashboard]] | None = None,
) -> R | None:
    """Make ``change`` to ``token``'s dashboard; what it did, or None if it could not be
    done safely (the dashboard kept changing, the writes kept failing, or the read-back
    does not show the change).

    ``paced`` runs one request through the run's pacer and retry policy. Once
    ``stopped()``, no write is made (:class:`Stopped`). Cut short — a stop, a read that
    failed — after a write with no answer, one more read (``read_now``, unpaced: a stop
    refuses a paced one) settles what that write did, if given.
    """
    try:
        return await _rounds(change, paced, read, write, token, stopped)
    except (Stopped, SendError):
        if change.pending and read_now is not None:
            with contextlib.suppress(InviteWorkerError):
                change.settle(dashboard_object(await read_now()))
        raise


async def _rounds(
    change: Change[R],
    paced: Paced,
    read: Callable[[], Awaitable[Dashboard]],
    write: Callable[[dict[str, Any]], Awaitable[Dashboard]],
    token: str,
    stopped: Callable[[], bool],
) -> R | None:
    log, events = change.log, change.events
    why = CHANGING  # why the rounds ran out
    changes = failed = 0  # rounds that saw the dashboard change; writes that failed
    while changes < ROUNDS:
        first, before = await read_object(paced, read), await read_object(paced, read)
        body = change.plan(before)
        if body is None:  # nothing to write: no window for another person's edit to be lost
            return _done(change, token)
        if writable(first) != writable(before):
            why, changes = CHANGING, changes + 1
            log.warning(events.concurrent_edit, token=token, action="reading again")
            continue
        if stopped():  # a stop came while the dashboard was read: nothing written yet
            raise Stopped("stopping: the dashboard was not changed")
        try:
            await paced(Once(functools.partial(write, body), tries=failed + 1))
        except LockLost:  # another worker may have edited since those reads
            changes += 1
            continue
        except Unsettled as exc:
            if exc.maybe_applied:
                change.unanswered()
            if exc.stopped:  # settled by one more read, where the caller gives one
                raise Stopped("stopping: the dashboard's write is not settled") from None
            why, failed = UNSETTLED, failed + exc.failed
            log.warning(events.write_unsettled, token=token, maybe_applied=exc.maybe_applied,
                        action="giving up" if exc.final else "reading again")  # fmt: skip
            if exc.final:
                break
            continue
        change.answered()
        wrong = change.check(await read_object(paced, read))
        if wrong is None:
            return _done(change, token)
        log.error(events.update_failed, token=token, **wrong,
                  reason="the read-back does not show the change as written")  # fmt: skip
        return None
    # The last write went unanswered: what it did shows in one more read.
    if change.pending and change.settle(await read_object(paced, read)):
        return _done(change, token)
    log.error(events.update_failed, token=token, reason=why)
    return None


def _done(change: Change[R], token: str) -> R:
    result = change.result()
    events = change.events
    change.log.info(events.done, token=token, **{events.count: len(result)})
    return result


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


def writable(doc: dict[str, Any]) -> dict[str, Any]:
    """The writable fields of a dashboard object exactly as read (invitees: email and
    access expiration, the fields an update takes)."""
    body = {k: doc[k] for k in WRITABLE if k in doc}
    if "invitees" in body:
        body["invitees"] = invitee_list(doc)
    return body


def invitee_list(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The invitees of a dashboard object, each its email and access expiration."""
    items = doc.get("invitees")
    return [
        {"email": i["email"], "access_expiration": i.get("access_expiration")}
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and isinstance(i.get("email"), str)
    ]
