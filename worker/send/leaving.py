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

from worker.errors import HeldUp


class Asking:
    """What the request in progress asks as it leaves (the time limit left, or an
    exception that keeps it from leaving), until :meth:`done`.

    Held through a context variable, which every timer and task made during the request
    copies, a cancelled timer included, and the loop keeps those until it sweeps them.
    So what they keep is this box, emptied once the request is over, not the sender's
    state behind ``leaving`` (measured: 3 MB more at the peak of a 1M-row run)."""

    __slots__ = ("leaving",)

    def __init__(self, leaving: Callable[[], float | None] | None) -> None:
        self.leaving = leaving

    def done(self) -> None:
        """The request is over: nothing is asked again."""
        self.leaving = None


#: The request in progress in this task (None: one that asks nothing).
LEAVING: ContextVar[Asking | None] = ContextVar("leaving", default=None)


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
        asking = LEAVING.get()
        if asking is not None and asking.leaving is not None:
            try:
                asking.leaving()
            except BaseException:
                conn.release()  # nothing was written on it: it serves the next request
                raise
        return conn


class OnceBody(aiohttp.BytesPayload):
    """A request body written once. aiohttp sends a PUT again by itself when a reused
    connection drops before the answer (HTTP allows it for idempotent methods), but a
    dashboard's write sent again carries a body read before, over whatever changed
    meanwhile: whether to write again is the writer's to decide, after reading again.
    Once written, this body is consumed (aiohttp, from 3.12, then gives up with the
    error) and refuses a second write (older versions): the request has no answer."""

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/json")
        self._written = False

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._leaving()
        await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._leaving()
        await super().write_with_length(writer, content_length)

    def _leaving(self) -> None:
        if self._written:
            raise ConnectionError("the connection dropped; the body is not sent again")
        self._written = self._consumed = True


class GatedBody(OnceBody):
    """A request body that asks once more as aiohttp writes it: the headers go with it
    (aiohttp, from 3.12, holds them back for the body), so nothing has left before. An
    older aiohttp may have sent the headers alone: the request the service got is then
    incomplete, its connection closed, and nothing is created."""

    def __init__(self, value: bytes, asking: Asking) -> None:
        super().__init__(value)
        self._asking = asking

    def _leaving(self) -> None:
        if self._asking.leaving is not None:
            self._asking.leaving()  # raises HeldUp to keep it from leaving: nothing written
        super()._leaving()


def held_back(exc: BaseException) -> HeldUp | None:
    """The refusal a :class:`GatedBody` raised, which aiohttp hands on wrapped in a
    connection error (its cause); None for any other error."""
    cause = exc.__cause__
    return cause if isinstance(cause, HeldUp) else None
