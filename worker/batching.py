"""Grouping valid pairs into per-token batches with a bound on what is held in memory."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Batch:
    """Up to ``--batch-size`` emails for one token: one list-form request."""

    token: str
    emails: list[str]


class Batcher:
    """Per-token buffers that emit a :class:`Batch` when full.

    Across all tokens at most ``max_buffered`` rows are held: past that a fullest buffer is
    emitted early, so memory stays flat however many tokens the input mixes. Finding it
    costs the same with 50,000 tokens as with 10 (an input with one dashboard per customer
    has that many): no buffer is looked at per row beyond the one the row went to.
    """

    def __init__(
        self, batch_size: int, max_buffered: int, clock: Callable[[], float] | None = None
    ) -> None:
        if batch_size < 1 or max_buffered < batch_size:
            raise ValueError("need 1 <= batch_size <= max_buffered")
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self._buffers: dict[str, list[str]] = {}
        self._buffered = 0
        # With a clock (queue mode, a pipe): when each buffer was started, for --linger.
        self._clock = clock
        self._since: dict[str, float] = {}
        # Kept only near the bound: for each size, the tokens in the order their buffers
        # reached it. A token whose buffer has since grown or gone is stale there, and is
        # dropped when it comes up; `_top` is at least the size of the fullest buffer.
        self._levels: list[deque[str]] | None = None
        self._top = 0
        # Rows added in all, and when the levels were last built: they hold at most one
        # entry per row since, and are built again once that is several times the tokens.
        self._added = 0
        self._indexed_at = 0

    @property
    def buffered(self) -> int:
        """Rows currently held."""
        return self._buffered

    def add(self, token: str, email: str) -> Batch | None:
        """Buffer one pair; returns a batch when that made one ready (full, or over bound)."""
        ready = self.add_many([(token, email)])
        return ready[0] if ready else None

    def add_many(self, pairs: list[tuple[str, str]]) -> list[Batch]:
        """Buffer many pairs; returns the batches they made ready (the hot path of a run)."""
        ready: list[Batch] = []
        buffers, size, bound = self._buffers, self.batch_size, self.max_buffered
        self._added += len(pairs)
        levels = self._levels
        for token, email in pairs:
            buffer = buffers.get(token)
            if buffer is None:
                buffer = buffers[token] = []
                if self._clock is not None:
                    self._since[token] = self._clock()
            buffer.append(email)
            self._buffered += 1
            held = len(buffer)
            if held >= size:
                ready.append(self._pop(token))
                levels = self._levels
                continue
            if levels is not None:
                levels[held].append(token)
                if held > self._top:
                    self._top = held
            if self._buffered > bound:
                ready.append(self._pop(self._fullest()))
                levels = self._levels
        return ready

    def _fullest(self) -> str:
        """The token of a fullest buffer (of those equally full, the first to get there)."""
        if self._levels is None or self._added - self._indexed_at > 3 * len(self._buffers) + 1024:
            self._index()
        levels, buffers, top = self._levels, self._buffers, self._top
        assert levels is not None
        while True:
            level = levels[top]
            while level:
                token = level.popleft()
                buffer = buffers.get(token)
                if buffer is not None and len(buffer) == top:
                    self._top = top
                    return token
            top -= 1  # no buffer holds this many rows any more

    def _index(self) -> None:
        """(Re)build the levels from the buffers, oldest first: O(tokens), once per as
        many rows, so a row costs the same however many tokens there are."""
        levels: list[deque[str]] = [deque() for _ in range(self.batch_size)]
        for token, emails in self._buffers.items():
            levels[len(emails)].append(token)
        self._levels, self._indexed_at = levels, self._added
        self._top = next((n for n in range(self.batch_size - 1, 0, -1) if levels[n]), 0)

    def _pop(self, token: str) -> Batch:
        emails = self._buffers.pop(token)
        self._buffered -= len(emails)
        self._since.pop(token, None)
        if self._levels is not None and self._buffered <= self.max_buffered // 2:
            # Far from the bound again: stop keeping the levels, and their cost per row.
            self._levels, self._top = None, 0
        return Batch(token, emails)

    def oldest(self) -> float | None:
        """When the longest-held partial batch was started (with a clock); None: none held."""
        return next(iter(self._since.values()), None)

    def expired(self, linger: float) -> list[Batch]:
        """Partial batches whose first row has waited ``linger`` seconds (with a clock)."""
        if self._clock is None:
            return []
        deadline = self._clock() - linger
        # Buffers are in the order they were started, so the expired ones come first: stop
        # at the first that is not (a clock set back only delays the ones behind it).
        old = []
        for token, since in self._since.items():
            if since > deadline:
                break
            old.append(token)
        return [self._pop(token) for token in old]

    def drain(self) -> Iterator[Batch]:
        """Emit every partial batch (at the end of the input), oldest first."""
        # By a list of the tokens: taking a dict's first key again and again walks over
        # every key deleted before it, quadratic in the number of tokens.
        while self._buffers:
            for token in list(self._buffers):
                if token in self._buffers:
                    yield self._pop(token)


#: A read of a pipe not back within this long is the input being quiet: only then do
#: partial batches go out (so --linger 0 does not break up a fast pipe's batches).
QUIET = 0.1
#: While rows keep coming (reads back within :data:`QUIET`), a partial batch goes out once
#: its first row has waited this long, or ``--linger`` if longer: a steady feed is served,
#: and a fast one's batches stay whole even at ``--linger 0``.
BUSY = 1.0


async def lingered(
    batcher: Batcher,
    ahead: asyncio.Future[Any],
    linger: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Batch]:
    """Partial batches to send while ``ahead``, the next read of an input that may wait,
    is not back (``batcher`` keeps time by ``clock``).

    Once the read has been out :data:`QUIET` seconds (a read in progress is not silence),
    each partial batch goes out as its first row comes to have waited ``linger``, as queue
    mode does once caught up: a pipe that stops is served. Rows that keep coming faster
    than that are served too, at :data:`BUSY` seconds (or ``linger``) of age.
    """
    for batch in batcher.expired(max(linger, BUSY)):
        yield batch
    wait = QUIET
    while batcher.buffered and not ahead.done():
        await asyncio.wait({ahead}, timeout=wait)
        if ahead.done():
            return
        for batch in batcher.expired(linger):
            yield batch
        oldest = batcher.oldest()
        if oldest is None:
            return
        wait = max(QUIET, oldest + linger - clock())
