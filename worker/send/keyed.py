"""One lock per key (a token), that exists only while someone holds it or waits for it.

A long-lived queue worker meets ever more tokens, so a lock per token ever met would grow
without bound; yet deleting one when it *looks* free is a race: between ``release()``
and the waiter it wakes resuming, ``locked()`` is already False, and the next comer would
make a second lock and run beside the waiter. Counting the holders and waiters instead
lets a lock go exactly when nobody can still be serialized by it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class KeyedLocks:
    """``async with locks.hold(key):`` serializes everyone holding the same key."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        """How many keys are held or waited for now."""
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock (made on first use, dropped when its last user leaves)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]
