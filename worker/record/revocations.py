"""How many people a report's ``--prune`` runs took access from, and what they took.

A removal may take more than one run: a stop after the PUT took a person's entries
leaves their invitation to the next run, and a DELETE recorded as it leaves, then
stopped in its wait, is recorded again by the run that makes it. Each of those records
names the person, so adding up the records counts one removal twice. Here the records
of one pair with no ``batch`` or ``skipped`` record of it in between are one removal; a
record after the person was sent (or skipped) again starts another.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from worker.validate.dedupe import locate

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


#: Kinds of ``removed`` told apart (three exist: invitation, invitee, share_list); one
#: past them is counted in ``revoked`` but not by what.
MAX_KINDS = 32


class Revocations:
    """The ``revoked`` records of a report, in the order they are replayed: 16 bytes an
    address named (its pair's key, where it falls among the pairs' records, what went)."""

    def __init__(self) -> None:
        #: Each address's pair key, and the number the next batch or skipped record gets.
        self.keys, self.at = array("q"), array("i")
        self._what = array("I")  # what went, one bit per kind (see _bits)
        self._bits: dict[str, int] = {}

    def add(self, keys: Iterable[int], at: int, removed: Iterable[str]) -> None:
        """One record: the pairs of ``keys``, recorded before the record numbered ``at``."""
        mask = 0
        for what in removed:
            if what not in self._bits and len(self._bits) < MAX_KINDS:
                self._bits[what] = 1 << len(self._bits)
            mask |= self._bits.get(what, 0)
        before = len(self.keys)
        self.keys.extend(keys)
        added = len(self.keys) - before
        self.at.extend([at] * added)
        self._what.extend([mask] * added)

    def count(
        self, keys: npt.NDArray[np.int64], owners: npt.NDArray[np.intc]
    ) -> tuple[int, Counter[str]]:
        """Removals, and removals by what went, given every pair's record (``keys``) and the
        number of each record (``owners``)."""
        import numpy as np

        if not self.keys:
            return 0, Counter()
        gone = np.frombuffer(self.keys, dtype=np.int64)
        at = np.frombuffer(self.at, dtype=np.intc)
        what = np.frombuffer(self._what, dtype=np.uint32)
        # The records of the revoked pairs only: a daily job prunes a few of many pairs.
        if len(keys):
            _, found = locate(np.unique(gone), keys)
            keys, owners = keys[found], owners[found]
        # Revocations and records in one order: by pair, then by place in the report; a
        # record numbered ``at`` came after the revocation that stands before it.
        key = np.concatenate([keys, gone])
        place = np.concatenate([owners.astype(np.int64), at.astype(np.int64)])
        is_record = np.concatenate([np.ones(len(keys), bool), np.zeros(len(gone), bool)])
        order = np.lexsort((is_record, place, key))
        key, is_record = key[order], is_record[order]
        # For each revocation: how many records of its pair come before it (its removal).
        seen = np.cumsum(is_record)
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
        before = seen - is_record - np.where(start > 0, seen[start - 1], 0)
        revoked = ~is_record
        removal = np.stack([key[revoked], before[revoked]], axis=1)
        masks = np.concatenate([np.zeros(len(keys), np.uint32), what])[order][revoked]
        by_what: Counter[str] = Counter()
        for name, bit in self._bits.items():
            if count := _distinct(removal[(masks & bit) != 0]):
                by_what[name] = count
        return _distinct(removal), by_what


def _distinct(rows: Any) -> int:
    import numpy as np

    return len(np.unique(rows, axis=0)) if len(rows) else 0
