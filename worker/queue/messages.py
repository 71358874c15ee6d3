"""What a stream message is to the worker: its fields read, its intents kept in Redis.

Also the one error for Redis failing us for good (:func:`queue_lost`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.exceptions import RedisError, ResponseError

from worker.errors import QueueLost
from worker.outcome import Outcome
from worker.queue.stream import StreamQueue
from worker.validate import Reason


def queue_lost(exc: RedisError, where: str) -> QueueLost:
    """The fatal error for Redis failing us after its reconnection attempts."""
    if isinstance(exc, ResponseError):
        return QueueLost(
            f"Redis at {where} refused the stream: {exc}. The stream or its consumer group is "
            "gone (a Redis restart that lost its data?); what was settled is in the report, "
            "the rest must be enqueued again"
        )
    return QueueLost(
        f"lost Redis at {where}: {exc}. Reconnecting did not help; unsettled messages stay "
        "pending in the group for the next worker"
    )


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


class RedisIntents:
    """The sender's intent log in stream mode: send times kept in Redis, per message."""

    def __init__(self, queue: StreamQueue, index: dict[tuple[str, str], str], where: str) -> None:
        self._queue, self._index, self._where = queue, index, where

    async def intent(self, token: str, emails: list[str], at: float) -> str:
        ids = [self._index[(token, e.lower())] for e in emails]
        try:
            await self._queue.record_intents(ids, at)
        except RedisError as exc:  # no intent stored: the request must not leave
            raise queue_lost(exc, self._where) from None
        return ids[0]

    def clear(self, ident: str) -> None:
        """Intents are removed when their messages are acknowledged."""
