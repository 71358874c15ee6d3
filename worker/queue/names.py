"""The streams on a Redis server, nearest a given name first: what a mistyped --stream
most likely meant."""

from __future__ import annotations

import difflib
import heapq
from typing import TYPE_CHECKING

from worker.errors import UsageError

if TYPE_CHECKING:
    from redis.asyncio import Redis

#: Stream names shown, of at most so many looked at.
SHOWN_STREAMS, SCANNED_STREAMS = 10, 20_000


async def closest_streams(redis: Redis, stream: str) -> tuple[list[str], bool]:
    """Up to :data:`SHOWN_STREAMS` names of streams there, likeliest meant first, and
    whether there are more.

    Every stream is looked at (up to :data:`SCANNED_STREAMS`): on a shared server the
    meant one may come anywhere in SCAN's order.
    """
    names: list[str] = []
    async for name in redis.scan_iter(_type="stream", count=1000):
        if name != stream:
            names.append(name)
        if len(names) >= SCANNED_STREAMS:
            break
    closest = heapq.nsmallest(
        SHOWN_STREAMS, names,
        key=lambda name: (-difflib.SequenceMatcher(None, stream, name).ratio(), name),
    )  # fmt: skip
    return closest, len(names) > len(closest)


def wrong_type(stream: str, kind: str) -> UsageError | None:
    """The refusal of a ``--stream`` that names a key of another type (a string, a
    hash): a mistyped name. None for a stream, or nothing there (``kind`` ``none``)."""
    if kind in ("none", "stream"):
        return None
    return UsageError(f"{stream!r} is a Redis {kind}, not a stream; check --stream")
