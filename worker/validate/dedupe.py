"""The duplicate index: every valid (token, email) pair of a run, in about 13 bytes each.

A Python ``set`` of 64-bit keys costs about 70 bytes per key (an int object plus its slot),
which is most of a large run's memory. :class:`PairIndex` keeps the bulk of the keys in one
sorted ``int64`` array instead and only the recent ones in a small set. Lookups go a chunk
of rows at a time: one vectorised binary search against the array, set operations in C for
the rest, so the per-row Python work stays a couple of C calls.

When the recent set outgrows :data:`MERGE_FRACTION` of the array it is merged in (two sorted
runs, merged in linear time). The array grows geometrically, so each key is copied a
bounded number of times over a run, and the set never holds more than a fraction of the
keys: 8 bytes per key in the array, about 13 per key in all. numpy is imported at the first
merge: a run of fewer than :data:`MIN_RECENT` pairs never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: Keys held in the recent set before the first merge into the array.
MIN_RECENT = 1 << 16
#: The recent set is merged into the array when it holds more keys than this share of it.
MERGE_FRACTION = 1 / 16


class PairIndex:
    """A set of 64-bit keys (see :func:`worker.validate.pair_key`), kept compact."""

    __slots__ = ("_base", "_order", "_recent")

    def __init__(self) -> None:
        self._base: npt.NDArray[np.int64] | None = None
        self._recent: set[int] = set()
        # The recent keys again, in a list: building the array from a list is three times
        # faster than from a set, and the list holds only references to the same ints.
        self._order: list[int] = []

    @classmethod
    def of_sorted(cls, keys: npt.NDArray[np.int64]) -> PairIndex:
        """An index of ``keys``, already sorted and distinct (an owned array, kept as is)."""
        index = cls()
        if len(keys):
            index._base = keys
        return index

    def __len__(self) -> int:
        return len(self._recent) + (0 if self._base is None else len(self._base))

    def __contains__(self, key: object) -> bool:
        return key in self._recent or (isinstance(key, int) and bool(self._in_base([key])))

    def find_many(self, keys: Sequence[int]) -> set[int]:
        """Those of ``keys`` that are present."""
        found = self._in_base(keys) if self._base is not None else set()
        found.update(self._recent.intersection(keys))
        return found

    def holds_with(self, token: str, addresses: Sequence[int]) -> list[bool]:
        """For each address key (the hash of a lower-cased address), whether the index
        holds its pair with ``token``: :func:`worker.validate.pair_key`, in bulk."""
        token_hash = hash(token.lower())
        pairs = [token_hash ^ address for address in addresses]
        found = self.find_many(pairs)
        return [pair in found for pair in pairs]

    def add(self, key: int) -> bool:
        """Add one key; False when it was already there."""
        return not self.add_many([key])

    def add_many(self, keys: Sequence[int]) -> list[int]:
        """Add every key; return the positions of those already present (or repeated).

        A key repeated within ``keys`` counts as present from its second occurrence on, so
        the first occurrence is the one kept, as when adding one at a time.
        """
        recent = self._recent
        in_base = self._in_base(keys) if self._base is not None else None
        if not in_base and recent.isdisjoint(keys):  # the common case, all in C
            before = len(recent)
            recent.update(keys)
            if len(recent) - before == len(keys):
                self._order.extend(keys)
                self._maybe_merge()
                return []
            repeats = _repeats_within(keys)
            skip = set(repeats)
            self._order.extend(k for p, k in enumerate(keys) if p not in skip)
        else:
            repeats = []
            add, keep = recent.add, self._order.append
            for position, key in enumerate(keys):
                if key in recent or (in_base is not None and key in in_base):
                    repeats.append(position)
                else:
                    add(key)
                    keep(key)
        self._maybe_merge()
        return repeats

    def _in_base(self, keys: Sequence[int]) -> set[int]:
        """The keys found in the sorted array (one vectorised binary search)."""
        base = self._base
        if base is None or not len(base) or not keys:
            return set()
        import numpy as np

        needles = np.array(keys, dtype=np.int64)
        needles.sort()  # sorted needles walk the array in order: far fewer cache misses
        _, found = locate(base, needles)
        hits: Any = needles[found]
        return set(hits.tolist()) if len(hits) else set()

    def _maybe_merge(self) -> None:
        recent = self._recent
        base_size = 0 if self._base is None else len(self._base)
        if len(recent) <= max(MIN_RECENT, base_size * MERGE_FRACTION):
            return
        import numpy as np

        fresh = np.array(self._order, dtype=np.int64)
        fresh.sort()
        if self._base is None:
            self._base = fresh
        else:
            # Grow the array in place (realloc: never the old and a new copy at once), put
            # the new run after the old one and let timsort merge the two sorted runs in
            # linear time, with a buffer the size of the smaller run.
            base, size = self._base, len(self._base)
            base.resize(size + len(fresh), refcheck=False)
            base[size:] = fresh
            base.sort(kind="stable")
        recent.clear()
        self._order.clear()


def locate(haystack: npt.NDArray[np.int64], needles: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    """For each needle, its position in the sorted, non-empty ``haystack`` (or where it would
    go, kept in bounds), and whether it is there."""
    import numpy as np

    at = haystack.searchsorted(needles)
    np.minimum(at, len(haystack) - 1, out=at)
    return at, haystack.take(at) == needles


def member(keys: npt.NDArray[np.int64], needles: npt.NDArray[np.int64]) -> Any:
    """For each needle, whether it is in the sorted ``keys`` (a boolean array)."""
    import numpy as np

    if not len(keys) or not len(needles):
        return np.zeros(len(needles), dtype=bool)
    # Three numpy calls, not locate's four: a batch is screened between a thousand other
    # tokens' batches, and each call then costs microseconds, whatever its size. A clipped
    # position past the end holds the last key, which that needle cannot equal.
    return keys.take(keys.searchsorted(needles), mode="clip") == needles


def _repeats_within(keys: Sequence[int]) -> list[int]:
    """Positions of keys that repeat an earlier key of the same sequence."""
    first: set[int] = set()
    repeats = []
    for position, key in enumerate(keys):
        if key in first:
            repeats.append(position)
        else:
            first.add(key)
    return repeats
