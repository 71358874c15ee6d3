"""Grouping valid pairs into per-token batches with a bound on what is held in memory."""

from __future__ import annotations

from collections.abc import Iterator
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

    def __init__(self, batch_size: int, max_buffered: int) -> None:
        if batch_size < 1 or max_buffered < batch_size:
            raise ValueError("need 1 <= batch_size <= max_buffered")
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self._buffers: dict[str, list[str]] = {}
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Rows currently held."""
        return self._buffered

    def add(self, token: str, email: str) -> Batch | None:
        """Buffer one pair; returns a batch when that made one ready (full, or over bound)."""
        buffer = self._buffers.get(token)
        if buffer is None:
            buffer = self._buffers[token] = []
        buffer.append(email)
        if len(buffer) >= self.batch_size:
            del self._buffers[token]
            self._buffered -= len(buffer) - 1
            return Batch(token, buffer)
        self._buffered += 1
        if self._buffered > self.max_buffered:
            return self._pop_fullest()
        return None

    def _pop_fullest(self) -> Batch:
        token = max(self._buffers, key=lambda t: len(self._buffers[t]))
        emails = self._buffers.pop(token)
        self._buffered -= len(emails)
        return Batch(token, emails)

    def drain(self) -> Iterator[Batch]:
        """Emit every partial batch (at the end of the input)."""
        while self._buffers:
            token, emails = self._buffers.popitem()
            self._buffered -= len(emails)
            yield Batch(token, emails)
