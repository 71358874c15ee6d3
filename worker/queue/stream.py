"""A Redis Stream consumed through a consumer group: reading, claiming, settling.

Besides the stream and its group, two keys belong to a group:

- ``<stream>:<group>:intents`` — a hash of message id -> the time a request carrying that
  message was sent and the timeout it was sent with (``"SENT TIMEOUT"``; older workers
  wrote the time alone). It is written *before* the request (Redis has acknowledged it by
  the time the POST goes out) and removed when the message is acknowledged. A message
  claimed from a dead worker that still has an intent has an unknown outcome: once that
  request can no longer be in progress, the token's invitations are listed before it is
  sent again.
- the dead-letter stream (``<stream>:dead`` by default) — messages that failed for good or
  were delivered too often, with the error;
- ``<stream>:<group>:pairs:<period>`` — hashes of ``token\temail`` -> the message that
  holds the pair, for at least :data:`HOLD_SECONDS`: the same pair enqueued twice and read
  by two workers at once is sent by one of them, the other message is rejected as a
  ``duplicate``. A message that fails for good lets go of its pair, so that it can be
  requeued.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from worker.clock import Clock, sleep_unless
from worker.errors import FatalError
from worker.queue.failures import RedisFailures
from worker.queue.lease import lease_key, taken_over
from worker.queue.scripts import ACK, DEAD_LETTER, DROP_INTENTS, ENQUEUE, HOLD, INTENTS

#: A message: its id and its fields as Redis sends them, ``[name, value, name, value…]``
#: (None: deleted from the stream meanwhile).
Message = tuple[str, list[str] | None]

#: How long a message holds its pair against duplicates in other workers, at least. Past
#: that, the dashboard check (the token's invitations, listed) is what tells a pair was
#: invited. Pairs are held in one hash per period, the current and the previous one read.
HOLD_SECONDS = 3600


class StreamQueue:
    """One consumer's view of a stream and its group."""

    def __init__(
        self, redis: Redis, stream: str, group: str, consumer: str, dead_letter: str,
        where: str = "",
    ) -> None:  # fmt: skip
        self.redis = redis
        self.stream, self.group, self.consumer = stream, group, consumer
        self.dead_letter = dead_letter
        #: What a Redis error means, as the failure that ends the run.
        self.failure = RedisFailures(redis, where or stream, stream, group, dead_letter)
        self.intents_key = f"{stream}:{group}:intents"
        #: This process's hold on its consumer name (see :mod:`worker.queue.lease`).
        self.lease_key = lease_key(stream, group, consumer)
        self.lease_token = secrets.token_hex(16)
        self.pairs_prefix = f"{stream}:{group}:pairs:"
        # XREADGROUP replies are taken as Redis sends them: redis-py's conversion of each
        # message's fields to a dict cost more than the rest of reading it.
        redis.set_response_callback("XREADGROUP", _as_sent)
        # XAUTOCLAIM's too: as a dict, a message's fields lose a name given twice, and a
        # claimed message must be read exactly as a new one is.
        redis.set_response_callback("XAUTOCLAIM", _as_sent)
        self._intents: Any = redis.register_script(INTENTS)
        self._drop_intents: Any = redis.register_script(DROP_INTENTS)
        #: Intents of requests the service answered without creating anything (ids and
        #: the value recorded), dropped by :meth:`drop_answered` at the next flush.
        self.answered: list[tuple[list[str], str]] = []
        self._hold: Any = redis.register_script(HOLD)
        self._dead_letter: Any = redis.register_script(DEAD_LETTER)
        self._ack: Any = redis.register_script(ACK)

    async def ensure_group(self) -> bool:
        """Create the group (and the stream) if missing; reading starts at the beginning.
        Returns whether the stream itself was missing.

        It is looked for first: XGROUP CREATE is a write, which a full (OOM) or read-only
        Redis refuses even when the group exists.
        """
        missing = False
        try:
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no such key (or not a stream: XGROUP CREATE says which)
            groups, missing = [], not await self.redis.exists(self.stream)
        if any(_name(group["name"]) == self.group for group in groups):
            return False
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        return missing

    async def read_new(self, count: int, block: float) -> list[Message]:
        """Messages never delivered to this group, waiting up to ``block`` seconds."""
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count,
            block=max(1, int(block * 1000)),
        )  # fmt: skip
        return _entries(reply)

    async def read_own_pending(self, count: int = 500) -> list[Message]:
        """Messages delivered to this consumer earlier and never acknowledged."""
        out: list[Message] = []
        last = "0"
        while True:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: last}, count=count
            )
            entries = _entries(reply)
            if not entries:
                return out
            out.extend(entries)
            last = entries[-1][0]

    async def claim_idle(self, min_idle: float, count: int = 500) -> list[Message]:
        """Take over messages other consumers left unacknowledged for ``min_idle`` seconds.

        XAUTOCLAIM returns a cursor; it is followed until it comes back to ``0-0``.
        Messages deleted from the stream meanwhile come back with no fields.
        """
        out: list[Message] = []
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, int(min_idle * 1000),
                start_id=cursor, count=count,
            )  # fmt: skip
            cursor, claimed = reply[0], reply[1]
            out.extend((mid, fields or None) for mid, fields in claimed)
            out.extend((mid, None) for mid in (reply[2] if len(reply) > 2 else []))
            if cursor in ("0-0", b"0-0"):
                return out

    async def keep(
        self, ids: list[str], until: float, every: float, clock: Clock, stop: asyncio.Event
    ) -> bool:
        """Hold these messages (ours) until ``until``, claiming them again every ``every``
        seconds so their idle time starts over (JUSTID: not counted as a delivery), and no
        other consumer claims them meanwhile. False if ``stop`` is set first."""
        while (wait := until - clock.time()) > 0:
            if not await sleep_unless(clock, min(wait, every), stop):
                return False
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0, [*ids], justid=True)
        return True

    async def deliveries(self, ids: list[str]) -> dict[str, int]:
        """How many times each message was delivered (one pipelined query per id)."""
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for mid in ids:
                pipe.xpending_range(self.stream, self.group, mid, mid, 1)
            replies = await pipe.execute()
        return {rows[0]["message_id"]: int(rows[0]["times_delivered"]) for rows in replies if rows}

    async def group_pending(self) -> int:
        """Messages delivered to some consumer of the group and not yet acknowledged."""
        summary = await self.redis.xpending(self.stream, self.group)
        return int(summary["pending"])

    async def record_intents(self, ids: list[str], value: str) -> tuple[set[str], set[str]]:
        """Before sending: these messages go out in a request; ``value`` says when it was
        sent and how long it may take (see :func:`intent_value`; one script). Returns the
        ids not recorded, not to be sent here: those another consumer holds or settled,
        and those whose entry was trimmed while no longer pending for this one."""
        keys = [self.intents_key, self.stream, self.lease_key]
        args = [",".join(ids), value, self.group, self.consumer, self.lease_token]
        others = tagged(await self._intents(keys=keys, args=args))
        if "l" in others:  # no intent recorded: the request must not leave
            raise await self.name_lost()
        return others["c"], others["t"]

    async def name_lost(self) -> FatalError:
        """The failure of a worker that found its consumer name not its own: taken over,
        unless the queue itself is gone (a Redis that came back empty lost the name with
        the group: the failure the group's own error, NOGROUP, means)."""
        try:
            await self.group_pending()
            gone = not await self.redis.exists(self.lease_key)
        except RedisError as exc:
            return await self.failure(exc)
        return taken_over(self.consumer, gone=gone)

    async def drop_answered(self) -> None:
        """Drop the intents of :attr:`answered`: a worker claiming those messages need not
        wait out a request the service already answered."""
        answered, self.answered = self.answered, []
        for ids, value in answered:
            await self._drop_intents(keys=[self.intents_key], args=[",".join(ids), value])

    async def intent_times(self, ids: list[str]) -> dict[str, tuple[float, float | None]]:
        """The recorded send time and timeout (None: not recorded) of each message that
        has an intent."""
        if not ids:
            return {}
        values = await self.redis.hmget(self.intents_key, ids)
        return {mid: _intent(str(v)) for mid, v in zip(ids, values, strict=True) if v is not None}

    def _pair_hashes(self, now: float) -> tuple[str, str]:
        """This period's hash of held pairs, and the previous period's."""
        period = hold_period(now)
        return f"{self.pairs_prefix}{period}", f"{self.pairs_prefix}{period - 1}"

    async def hold_pairs(
        self, mids: list[str], pairs: list[tuple[str, str]], now: float
    ) -> set[str]:
        """Each message takes its pair (one script); returns the ids of those whose pair
        another message holds: duplicates, to be rejected."""
        text = _pair_lines(zip(mids, pairs, strict=True))
        # A hash lives two periods: a pair stays held between one and two periods.
        taken = await self._hold(keys=list(self._pair_hashes(now)),
                                 args=[2 * HOLD_SECONDS, text])  # fmt: skip
        return {str(mid) for mid in taken}

    async def settle(
        self, acks: list[str], dead: list[tuple[str, dict[str, str]]], now: float
    ) -> None:
        """Atomically copy ``dead`` to the dead-letter stream (letting go of their pairs,
        where they still hold them), then acknowledge everything: one script, whose
        copies come first (a refused copy leaves everything pending)."""
        ids = acks + [mid for mid, _ in dead]
        if not ids:
            return
        if not dead:  # the common case: one script acknowledges a whole flush
            await self._ack(keys=[self.stream, self.intents_key], args=[self.group, ",".join(ids)])
            return
        pairs = _pair_lines((mid, (f["token"], f["email"])) for mid, f in dead)
        copies = json.dumps([[x for item in f.items() for x in item] for _, f in dead],
                            ensure_ascii=False)  # fmt: skip
        keys = [self.stream, self.intents_key, self.dead_letter, *self._pair_hashes(now)]
        await self._dead_letter(keys=keys, args=[self.group, ",".join(ids), pairs, copies])


def hold_period(now: float) -> int:
    """The period of pair holds ``now`` (epoch seconds) falls in."""
    return int(now // HOLD_SECONDS)


def tagged(reply: Iterable[str | bytes]) -> defaultdict[str, set[str]]:
    """A script's ``"T:ID"`` answers as the ids of each tag ``T`` (none: an empty set)."""
    by_tag: defaultdict[str, set[str]] = defaultdict(set)
    for answer in map(_name, reply):
        by_tag[answer[:1]].add(answer[2:])
    return by_tag


def _pair_lines(items: Iterable[tuple[str, tuple[str, str]]]) -> str:
    """``id\ttoken\temail\n`` for each message and its pair, the address lower-cased: the
    pair scripts' (HOLD, RELEASE) argument."""
    return "".join(f"{mid}\t{token}\t{email.lower()}\n" for mid, (token, email) in items)


def _name(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def intent_value(at: float, request_timeout: float | None) -> str:
    """An intent as stored: ``"SENT TIMEOUT"`` (``"SENT"`` when the timeout is unknown)."""
    return repr(at) if request_timeout is None else f"{at!r} {request_timeout!r}"


def _intent(value: str) -> tuple[float, float | None]:
    """An intent's ``"SENT TIMEOUT"`` (or, written by an older worker, ``"SENT"``)."""
    sent, _, timeout = value.partition(" ")
    return float(sent), float(timeout) if timeout else None


def _as_sent(response: Any, **options: Any) -> Any:
    """The reply as Redis sent it: ``{stream: [[id, [name, value…]], …]}`` in RESP3,
    ``[[stream, [[id, [name, value…]], …]]]`` in RESP2."""
    return response


def _entries(reply: Any) -> list[Message]:
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(mid, fields or None) for mid, fields in entries]


async def enqueue_rows(redis: Redis, stream: str, rows: list[tuple[str, str]]) -> int:
    """Add validated ``(token, email)`` rows as ``token``/``email`` messages, in one script."""
    script: Any = redis.register_script(ENQUEUE)
    text = "".join(f"{token}\t{email}\n" for token, email in rows)
    return int(await script(keys=[stream], args=[text]))
