"""The last word on whether a write leaves: asked again once its connection is in hand.

A request's intent is recorded, then it is let go (``Journaled.held_up``). Whoever settles
that intent — a worker that claimed its messages, ``--resume`` — takes a request that did
not leave within ``--reconcile-delay`` of its intent for one that never will, lists what
it created after ``--timeout`` and sends the rest again. A process stalled between the
decision and the write (stopped, its VM paused, starved of CPU while it made its first
connection) would send afterwards all the same, and invite those people twice. So the
decision is taken again here, when the connection is in hand and nothing is left to wait
for: aiohttp writes the request in the same turn of the event loop, or the next one.

Imported with aiohttp, by the first request that needs it (see :mod:`worker.send.client`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import aiohttp
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

#: The request in progress in this task: what to ask as it leaves (the time limit left,
#: or an exception that keeps it from leaving); None for a request that asks nothing.
LEAVING: ContextVar[Callable[[], float | None] | None] = ContextVar("leaving", default=None)


class GatedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, which asks :data:`LEAVING` once it has the connection."""

    # aiohttp's signature, timeout= included: it passes the arguments by name.
    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        leaving = LEAVING.get()
        if leaving is not None:
            try:
                leaving()
            except BaseException:
                conn.release()  # nothing was written on it: it serves the next request
                raise
        return conn
