"""The deliveries a run added to the messages it holds, given back when it ends for a
reason that is not theirs.

Redis counts each delivery of a message (XREADGROUP, XAUTOCLAIM), and ``--max-deliveries``
dead-letters a message delivered too often: that catches a poison message, one that
crashes or wedges every worker that reads it. A run that ends because the service refused
the keys, because it was told to stop, or because Redis or the disk failed says nothing
about its messages, yet it added one delivery to each message it read or claimed; a few
such runs in a row (a Deployment crash-looping on a rotated key, an hourly CronJob) and
the next worker with good keys would dead-letter messages nothing was wrong with.

So a worker counts the deliveries it added to each message it holds unsettled, and when
the run ends that way gives them back: one script per slice checks, for each message, that
it is still pending *for this consumer* (one another worker has claimed meanwhile is left
alone) and takes this run's deliveries off its count, its idle time unchanged (XCLAIM to
itself with ``IDLE``, ``RETRYCOUNT`` and ``JUSTID``). A run halted by a bug keeps them:
that is the case the count exists for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from redis.exceptions import RedisError

from worker.errors import ConsumerTakenOver, InternalError, QueueLost
from worker.queue.stream import StreamQueue, tagged
from worker.state import RunState

log = structlog.get_logger("worker.queue")

#: Messages given back per script call: Redis runs a script alone, so a slice keeps it short.
SLICE = 1000

# KEYS: stream. ARGV: group, consumer, "id\tdeliveries\n...". Returns how many were given
# back. XPENDING filtered by consumer answers only for a message still ours; the check and
# the XCLAIM are one script, so no other worker's claim can come between them.
_GIVE_BACK = r"""
local given = 0
for id, n in string.gmatch(ARGV[3], '([^\t\n]+)\t(%d+)\n') do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])[1]
  if entry then
    local count = math.max(tonumber(entry[4]) - tonumber(n), 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', entry[3],
               'RETRYCOUNT', count, 'JUSTID')
    given = given + 1
  end
end
return given
"""


# KEYS: stream. ARGV: group, consumer, "id\n...". Each message still pending for this
# consumer has its idle time started over (XCLAIM to itself with JUSTID: no delivery
# counted), so no other worker takes it for abandoned; unless its entry was deleted from
# the stream (trimmed): an XCLAIM would drop it from the pending list, and it is still
# ours to send. Returns the others: "l:ID" for one another consumer holds now, or one
# settled (acknowledged while its entry is still in the stream); "n:ID" for one pending
# for nobody whose entry is gone (the request that would send it records it failed).
_KEEP = r"""
local others = {}
for id in string.gmatch(ARGV[3], '([^\n]+)\n') do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  local kept = redis.call('XRANGE', KEYS[1], id, id)[1]
  if entry and entry[2] == ARGV[2] then
    if kept then redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID') end
  elseif entry or kept then
    others[#others + 1] = 'l:' .. id
  else
    others[#others + 1] = 'n:' .. id
  end
end
return others
"""


class HeldDeliveries:
    """Message id -> deliveries this run added, for each message read and not settled."""

    def __init__(self) -> None:
        self._added: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._added)

    def get(self, mid: str) -> int:
        """The deliveries this run added to ``mid`` (0 if not held)."""
        return self._added.get(mid, 0)

    def taken(self, mid: str) -> None:
        """``mid`` was read or claimed: one delivery more."""
        self._added[mid] = self._added.get(mid, 0) + 1

    def claimed_again(self, mid: str) -> None:
        """A message still held was claimed back by this consumer (it was slow): counted."""
        if mid in self._added:
            self._added[mid] += 1

    def forget(self, mids: Iterable[str | None]) -> None:
        """These are settled, or left pending for a reason of their own: counts stand."""
        pop = self._added.pop
        for mid in mids:
            if mid is not None:
                pop(mid, None)

    async def keep(self, queue: StreamQueue, settling: Iterable[str]) -> set[str]:
        """Start over the idle time of every message held, so that no other worker claims
        one as abandoned while it waits here (in a buffer, behind a long listing, for the
        rate limit). One no longer pending for this consumer and not being ``settling``
        here was claimed by another worker (this one stalled past ``--claim-idle``): it
        is let go of, and said. Returns the ids found still pending for this consumer."""
        if not self._added:
            return set()
        script: Any = queue.redis.register_script(_KEEP)
        mids = list(self._added)
        replies: list[str | bytes] = []
        for start in range(0, len(mids), SLICE):
            text = "".join(f"{mid}\n" for mid in mids[start : start + SLICE])
            replies += await script(keys=[queue.stream], args=[queue.group, queue.consumer, text])
        others = tagged(replies)
        ours = set(mids).difference(others["l"], others["n"])
        lost = others["l"]
        # Only what is still held: one settled meanwhile (acknowledged as the script ran)
        # was let go of by its settling, not by another worker.
        lost.intersection_update(self._added)
        lost.difference_update(settling)
        if lost:
            self.forget(lost)
            log.warning("queue.claimed_elsewhere", messages=len(lost),
                        action="let go of: another worker holds them now")  # fmt: skip
        return ours

    async def give_back(self, queue: StreamQueue, state: RunState) -> None:
        """At the end of a run: give back the deliveries, unless the run's end may be the
        messages' doing (a bug), Redis is lost (each command would wait out the retries),
        or another process took over the consumer name (the messages are its own now)."""
        if not self._added or isinstance(state.fatal, (InternalError, QueueLost,
                                                       ConsumerTakenOver)):  # fmt: skip
            return
        script: Any = queue.redis.register_script(_GIVE_BACK)
        items = list(self._added.items())
        given = 0
        try:
            for start in range(0, len(items), SLICE):
                text = "".join(f"{mid}\t{n}\n" for mid, n in items[start : start + SLICE])
                given += int(await script(keys=[queue.stream],
                                          args=[queue.group, queue.consumer, text]))  # fmt: skip
        except RedisError as exc:
            # Nothing is lost: the messages stay pending, with this run's deliveries counted.
            log.warning("queue.deliveries_kept", messages=len(items) - given,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return
        self._added.clear()
        log.info("queue.deliveries_given_back", messages=given,
                 claimed_by_others=len(items) - given)  # fmt: skip
