"""What a stream message is to the worker: its fields read, its intents kept in Redis."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec
import structlog
from redis.exceptions import RedisError

from worker.outcome import Outcome
from worker.queue.stream import StreamQueue, intent_value
from worker.record.journal import Claimed
from worker.validate import Reason

log = structlog.get_logger("worker.queue")


def parse_message(fields: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """``(token, email, reason)`` from ``token``/``email`` fields or a JSON ``payload``."""
    values: dict[str, Any] = fields
    if "payload" in fields and "token" not in fields:
        try:
            payload = msgspec.json.decode(fields["payload"])
        except ValueError:  # msgspec.DecodeError, or a UnicodeError inside a string
            return None, None, Reason.INVALID_JSON
        if not isinstance(payload, dict):
            return None, None, Reason.NOT_AN_OBJECT
        values = payload
    token, email = values.get("token"), values.get("email")
    if token is not None and not isinstance(token, str):
        return None, None, Reason.NOT_A_STRING
    if email is not None and not isinstance(email, str):
        return None, None, Reason.NOT_A_STRING
    return token, email, None


def unset_record(outcome: Outcome) -> None:
    """The placeholder for ``Consumer.record`` before the runner sets it."""
    raise RuntimeError("Consumer.record must be set before consuming")


class MessageIndex:
    """Which stream message each pair in hand came from, until its outcome settles it.

    Keyed per token by the address exactly as its batch carries it: an outcome names its
    emails with the very strings of its batch, and the validator has made them unique per
    token (case aside), so the hot path builds no tuple and lower-cases nothing.
    """

    def __init__(self) -> None:
        self._by_token: dict[str, dict[str, str]] = {}

    def __len__(self) -> int:
        # Counted when asked (a progress redraw, the drain check), not kept at every change.
        return sum(len(ids) for ids in self._by_token.values())

    def add(self, token: str, email: str, mid: str) -> None:
        """Remember that ``(token, email)`` came from message ``mid``."""
        self._by_token.setdefault(token, {})[email] = mid

    def add_pairs(self, pairs: list[tuple[str, str]], mids: list[str]) -> None:
        """:meth:`add` for each pair and its message id, in order."""
        by_token = self._by_token
        for (token, email), mid in zip(pairs, mids, strict=True):
            ids = by_token.get(token)
            if ids is None:
                ids = by_token[token] = {}
            ids[email] = mid

    def ids(self, token: str, emails: list[str]) -> list[str]:
        """The message ids of ``emails`` of ``token`` (all in hand)."""
        ids = self._by_token[token]
        return [ids[email] for email in emails]

    def pop(self, token: str, emails: list[str]) -> list[str | None]:
        """Forget these pairs; their message ids (None for one not in hand)."""
        ids = self._by_token.get(token)
        if ids is None:
            return [None] * len(emails)
        take = ids.pop
        mids = [take(email, None) for email in emails]
        if not ids:
            del self._by_token[token]
        return mids

    def values(self) -> set[str]:
        """Every message id in hand."""
        return {mid for ids in self._by_token.values() for mid in ids.values()}

    def pairs(self, of: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """The message ids in hand that are in ``of``, and their pairs, in the same order."""
        mids: list[str] = []
        pairs: list[tuple[str, str]] = []
        for token, ids in self._by_token.items():
            for email, mid in ids.items():
                if mid in of:
                    mids.append(mid)
                    pairs.append((token, email))
        return mids, pairs


class RecentlySettled:
    """Message ids settled lately: at least ``limit`` of the latest, in a few generations.

    A set per generation, not one ordered mapping trimmed id by id: adding a settled
    batch's ids is one C-level update, and a lookup checks at most five sets.
    """

    def __init__(self, limit: int) -> None:
        self._generation = max(1, limit // 4)
        self._current: set[str] = set()
        self._older: deque[set[str]] = deque(maxlen=4)

    def update(self, mids: Iterable[str]) -> None:
        """Remember these ids; the oldest generation goes once four are full."""
        self._current.update(mids)
        if len(self._current) >= self._generation:
            self._older.append(self._current)
            self._current = set()

    def __contains__(self, mid: object) -> bool:
        return mid in self._current or any(mid in older for older in self._older)


class RedisIntents:
    """The sender's intent log in stream mode: send times kept in Redis, per message.

    An intent is removed with its messages' acknowledgement; one whose request the service
    answered without creating anything (a refusal, a 429) is dropped at the next flush, so
    that a worker claiming the messages later (after refused keys, say) sends them without
    first waiting out a request that can no longer create anything.
    """

    def __init__(self, queue: StreamQueue, index: MessageIndex) -> None:
        self._queue, self._index = queue, index
        self._last_at = 0.0

    async def intent(
        self, token: str, emails: list[str], at: float, request_timeout: float | None = None
    ) -> str:
        ids = self._index.ids(token, emails)
        # Each request's value is its own, so dropping one never drops a later one's.
        at = self._last_at = max(at, math.nextafter(self._last_at, math.inf))
        value = intent_value(at, request_timeout)
        try:
            claimed, trimmed = await self._queue.record_intents(ids, value)
        except RedisError as exc:  # no intent stored: the request must not leave
            raise await self._queue.failure(exc) from None
        ident = f"{value}|{','.join(m for m in ids if m not in claimed and m not in trimmed)}"
        if claimed or trimmed:  # not sent here: another worker has them, or may have
            gone = [email for email, mid in zip(emails, ids, strict=True) if mid in claimed]
            self._index.pop(token, gone)  # that worker settles them, this one never does
            if gone:
                log.warning("queue.claimed_elsewhere", token=token, messages=len(gone),
                            action="not sent here: another worker holds them now")  # fmt: skip
            cut = [email for email, mid in zip(emails, ids, strict=True) if mid in trimmed]
            raise Claimed(ident, gone, cut)
        return ident

    def clear(self, ident: str) -> None:
        """Intents are removed when their messages are acknowledged."""

    def answered(self, ident: str) -> None:
        """The request created nothing: its intent goes at the next flush (unless a later
        request for the same messages replaced it)."""
        value, _, ids = ident.partition("|")
        self._queue.answered.append((ids.split(","), value))
