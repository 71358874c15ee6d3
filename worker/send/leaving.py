"""The last word on whether a write leaves: asked again once its connection is in hand.

A request's intent is recorded, then it is let go (``Journaled.held_up``). Whoever settles
that intent — a worker that claimed its messages, ``--resume`` — takes a request that did
not leave within ``--reconcile-delay`` of its intent for one that never will, lists what
it created after ``--timeout`` and sends the rest again. A process stalled between the
decision and the write (stopped, its VM paused, starved of CPU while it made its first
connection) would send afterwards all the same, and invite those people twice. So the
decision is taken again here: when the connection is in hand (after any wait for a pool
slot or a new connection), and once more as the body is written, with the headers, in the
same step as the socket write. The second matters on Python 3.11, where aiohttp writes a
body in a task of its own, a turn of the event loop after the connection was handed over.
Only a stall within that last step, between the check and the system call, escapes it.

Imported with aiohttp, by the first request that needs it (see :mod:`worker.send.client`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from worker.errors import SendError

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


class GatedBody(aiohttp.BytesPayload):
    """A request body that asks ``leaving`` once more as aiohttp writes it: the headers go
    with it (aiohttp holds them back for the body), so nothing has left before."""

    def __init__(self, value: bytes, leaving: Callable[[], float | None]) -> None:
        super().__init__(value, content_type="application/json")
        self._leaving = leaving

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._leaving()
        await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._leaving()
        await super().write_with_length(writer, content_length)


def held_back(exc: BaseException) -> SendError | None:
    """The refusal a :class:`GatedBody` raised, which aiohttp hands on wrapped in a
    connection error (its cause); None for any other error."""
    cause = exc.__cause__
    return cause if isinstance(cause, SendError) else None
