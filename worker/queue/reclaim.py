"""Messages claimed back from a worker that stopped or stalled, before they are sent again.

One delivered more than ``--max-deliveries`` times is dead-lettered. One whose request
may have gone out (its intent is in the stream's pending list) is settled first: once
that request can no longer be in progress, a listing says what it created, recorded as
sent (which acknowledges it); only the rest is batched again.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import structlog

from worker.errors import AuthError, SendError
from worker.send.reconcile import found_outcome

if TYPE_CHECKING:
    from worker.queue.consumer import Consumer

log = structlog.get_logger("worker.queue")


async def screen_reclaimed(
    consumer: Consumer, fresh: list[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """Reclaimed messages: dead-letter the over-delivered, settle unknown outcomes; the
    rest, to be batched again."""
    ids = [mid for mid, _, _ in fresh]
    deliveries = await consumer.queue.deliveries(ids)
    kept = []
    for mid, token, email in fresh:
        if deliveries.get(mid, 0) > consumer.options.max_deliveries:
            why = f"delivered {deliveries[mid]} times without an outcome"
            consumer.dead_letter(mid, token, email, "max_deliveries", why)
        else:
            kept.append((mid, token, email))
    times = await consumer.queue.intent_times([mid for mid, _, _ in kept])
    unknown: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    landed: dict[str, float] = {}
    rest = []
    for mid, token, email in kept:
        if mid in times:
            at, timeout = times[mid]
            unknown[token].append((mid, email, at))
            # A request sent at ``at`` may still be in progress until its timeout has
            # passed (the one it was sent with; ours when an older worker did not say),
            # and the service may create its invitations until the very end.
            until = at + (timeout if timeout is not None else consumer.config.timeout)
            until += consumer.config.reconcile_delay
            landed[token] = max(landed.get(token, until), until)
        else:
            rest.append((mid, token, email))
    for token in sorted(unknown, key=landed.__getitem__):
        rest.extend(await _reconcile(consumer, token, unknown[token], landed[token]))
    return rest


async def _reconcile(
    consumer: Consumer, token: str, items: list[tuple[str, str, float]], landed: float
) -> list[tuple[str, str, str]]:
    """Messages a dead worker may have sent: once its request can no longer be in
    progress (``landed``), record what was created, return the rest."""
    emails = [email for _, email, _ in items]
    since = min(at for _, _, at in items)
    if consumer.state.aborted:
        return []  # refused keys: left pending for a worker with good ones
    mids = [mid for mid, _, _ in items]
    try:
        if (wait := landed - consumer.clock.time()) > 0:
            log.info("queue.waiting", token=token, messages=len(items),
                     seconds=round(wait, 3),
                     reason="the dead worker's request may still be in progress")  # fmt: skip
            # One listing first: refused keys end the run now, not after the wait.
            await consumer.sender.reconciler.listing(token, 0.0)
            # Claimed again every half --claim-idle meanwhile: no other worker takes them.
            if not await consumer.queue.keep(mids, landed, consumer.options.claim_idle / 2,
                                             consumer.clock, consumer.stop):  # fmt: skip
                return []  # stopping: left pending, settled by the next worker to hold them
        found = await consumer.sender.reconciler.created_since(token, emails, since, landed)
    except AuthError as exc:  # refused keys end the run; the messages stay pending
        consumer.state.abort(exc)
        return []
    except SendError as exc:
        log.error("reconcile.failed", token=token, emails=len(emails), error=exc.message)
        if not consumer.stop.is_set():  # left pending for its own failure: it counts
            consumer.held.forget(mid for mid, _, _ in items)
        return []  # left pending; claimed again later
    for mid, email, _ in items:
        if email.lower() in found:
            # Registered before the record is written: writing it acknowledges them.
            consumer.index.add(token, email, mid)
    outcome = found_outcome(token, emails, found, started_at=since,
                            finished_at=consumer.clock.time())  # fmt: skip
    if outcome is not None:
        # Counted as the sender counts what a listing settles (the summary's
        # reconciled_sent), then recorded, which acknowledges them.
        consumer.sender.stats.reconciled_sent += len(outcome.emails)
        consumer.record(outcome)
    created = len(outcome.emails) if outcome else 0
    log.info("queue.reconciled", token=token, created=created,
             not_created=len(items) - created)  # fmt: skip
    return [(mid, token, email) for mid, email, _ in items if email.lower() not in found]
