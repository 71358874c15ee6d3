"""Grouping valid pairs into per-token batches with a bound on what is held in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class Batch:
    """Up to ``--batch-size`` emails for one token: one list-form request."""

    token: str
    emails: list[str]


class Batcher:
    """Per-token buffers that emit a :class:`Batch` when full.

    Across all tokens at most ``max_buffered`` rows are held: past that the fullest buffer
    is emitted early, so memory stays flat however many tokens the input mixes.
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
        # Queue mode: when each buffer was started, for --linger.
        self._clock = clock
        self._since: dict[str, float] = {}

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
        for token, email in pairs:
            buffer = buffers.get(token)
            if buffer is None:
                buffer = buffers[token] = []
                if self._clock is not None:
                    self._since[token] = self._clock()
            buffer.append(email)
            self._buffered += 1
            if len(buffer) >= size:
                ready.append(self._pop(token))
            elif self._buffered > bound:
                ready.append(self._pop(max(buffers, key=lambda t: len(buffers[t]))))
        return ready

    def _pop(self, token: str) -> Batch:
        emails = self._buffers.pop(token)
        self._buffered -= len(emails)
        self._since.pop(token, None)
        return Batch(token, emails)

    def expired(self, linger: float) -> list[Batch]:
        """Partial batches whose first row has waited ``linger`` seconds (queue mode)."""
        if self._clock is None:
            return []
        deadline = self._clock() - linger
        old = [token for token, since in self._since.items() if since <= deadline]
        return [self._pop(token) for token in old]

    def drain(self) -> Iterator[Batch]:
        """Emit every partial batch (at the end of the input)."""
        while self._buffers:
            yield self._pop(next(iter(self._buffers)))
