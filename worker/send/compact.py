"""Per-token state in a few bytes per address: what the dashboard check and reconciliation
decide from, and nothing else.

A dashboard may allow, and list invitations for, millions of addresses. Holding them as
strings and invitation objects costs hundreds of bytes each and grows with what the
service holds, not with the run's work. Here an address is a 64-bit hash of its
lower-cased form (:func:`address_key`, as the duplicate index keys its pairs), kept in
sorted ``int64`` arrays beside ``float64`` times: 8 bytes per allowed address, 24 per
listed one while a listing is built, 8 per address the check skips.

A collision between two addresses of one dashboard can only make the worker *not* send:
an address taken for another that is invited, in a session or created since a send is
skipped or recorded sent; one taken for an allowed address is sent and the service's
400 decides. It never sends twice. Python's string hash is salted per process, so a
collision does not repeat in the next run.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from worker.outcome import Invitation
from worker.validate.dedupe import locate

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from worker.send.listed import Listed
else:

    class _Numpy:
        """numpy, imported at its first use: a run's start (its report, its lock) and a
        dry run need not wait the tenths of a second its import takes."""

        def __getattr__(self, name: str) -> Any:
            import numpy

            globals()["np"] = numpy
            return getattr(numpy, name)

    np = _Numpy()

#: Creation times remembered while a listing is read (a listing of invitations made a
#: request at a time holds few distinct ones).
MAX_TIMES = 1024
#: Pages folded before their keys are merged into one sorted run (bounds the chunks held).
MERGE_EVERY = 64

# A page's columns, read in C rather than by a Python loop over its entries.
_EMAIL = operator.attrgetter("email")
_CREATED = operator.attrgetter("created_at")
_HAS_SESSION = operator.attrgetter("has_session")


def keys_of(emails: Iterable[str]) -> npt.NDArray[np.int64]:
    """The :func:`address_key` of each address, in order."""
    items = emails if isinstance(emails, Sequence) else list(emails)
    return np.fromiter(map(hash, map(str.lower, items)), np.int64, len(items))


def key_set(emails: Iterable[str]) -> npt.NDArray[np.int64]:
    """The distinct keys of ``emails``, sorted (a set, at 8 bytes an address)."""
    keys = keys_of(emails)
    keys.sort()
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys


def iso_epoch(value: str | None) -> float | None:
    """An ISO 8601 time from the API as epoch seconds; None when absent or unreadable.

    One without an offset is UTC, as the API's times are: read as the machine's local
    time it would move by the zone's offset, and it is compared with when requests were
    sent (did that request create this invitation?)."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(slots=True)
class TokenListing:
    """What a token's invitations say, as listed from ``started`` on.

    ``keys`` are sorted and distinct; ``created`` holds the newest creation time of each
    (NaN: none readable) and ``session_ends`` when its open session ends (-inf: none).
    ``invitations`` holds full invitations only for the keys a caller asked for
    (``wanted``): the newest of each, for the records that settle unknown outcomes.
    """

    started: float
    keys: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    created: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    session_ends: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    wanted: frozenset[int] = frozenset()
    invitations: dict[int, tuple[float, Invitation]] = field(default_factory=dict)
    #: Entries read and pages requested.
    read: int = 0
    pages: int = 0
    #: The service's 404 message when the token has no shared dashboard (nothing listed).
    gone: str | None = None

    def newest(self, needles: npt.NDArray[np.int64]) -> tuple[Any, Any]:
        """For each needle: whether it is listed, and its newest creation time (or NaN)."""
        if not len(self.keys) or not len(needles):
            return np.zeros(len(needles), dtype=bool), np.full(len(needles), math.nan)
        at, found = locate(self.keys, needles)
        return found, np.where(found, self.created[at], math.nan)


#: Columns of listed entries: keys, creation times, session ends (None: no open session
#: among them). A page's, as read; a run's, sorted and distinct (each key once, with its
#: newest time and latest session end).
Run = tuple[Any, Any, Any]


class ListingBuilder:
    """Builds a :class:`TokenListing` page by page, as the pages come in.

    A page's entries become small arrays (keys and creation times; session ends only when
    the page lists an open session); every :data:`MERGE_EVERY` pages they become one
    sorted, distinct run (a sort, then one pass over runs of equal keys), and a run is
    merged with the one before it while that one is no larger, as a binary counter
    carries: each entry is sorted again a logarithmic number of times, not once every 64
    pages (which made a million-entry listing cost seconds). What is held stays about 24
    bytes per distinct address listed, however long the listing.
    """

    def __init__(self, started: float, wanted: frozenset[int] = frozenset()) -> None:
        self.listing = TokenListing(started, wanted=wanted)
        self._chunks: list[Run] = []  # a page's arrays each, neither sorted nor distinct
        self._runs: list[Run] = []  # each smaller than the one before it
        self._epochs: dict[str | None, float] = {}  # creation times parsed so far

    def add(self, page: Sequence[Listed]) -> None:
        """Fold one page in (a column at a time: a page is a few C calls, mostly)."""
        listing, count = self.listing, len(page)
        keys = np.fromiter(map(hash, map(str.lower, map(_EMAIL, page))), np.int64, count)
        stamps = list(map(_CREATED, page))
        # The invitations of one request share a creation time, often over several pages:
        # each time is parsed once per listing (the few of a page looked up, not each).
        known = self._epochs
        for stamp in set(stamps).difference(known):
            known[stamp] = _epoch_or_nan(stamp)
        created = np.fromiter(map(known.__getitem__, stamps), float, count)
        if len(known) > MAX_TIMES:
            known.clear()
        ends = None  # most listed invitations have no open session: no array for them
        if any(map(_HAS_SESSION, page)):
            ends = np.full(count, -math.inf)
            for at, item in enumerate(page):
                if item.has_session is True:
                    ends[at] = _session_end(item)
        if listing.wanted:
            self._keep(page, keys.tolist(), created)
        self._chunks.append((keys, created, ends))
        listing.read += count
        if len(self._chunks) >= MERGE_EVERY:
            run, self._chunks = _fold(self._chunks), []
            while self._runs and len(self._runs[-1][0]) <= len(run[0]):
                run = _fold([self._runs.pop(), run])
            self._runs.append(run)

    def _keep(self, page: Sequence[Listed], keys: list[int], created: Any) -> None:
        """The newest invitation of each wanted key (one with no readable time: never)."""
        wanted, kept = self.listing.wanted, self.listing.invitations
        for at, key in enumerate(keys):
            if key in wanted and created[at] >= kept.get(key, (-math.inf,))[0]:
                kept[key] = (float(created[at]), page[at].invitation())

    def done(self) -> TokenListing:
        """The listing, with every page folded in."""
        runs, chunks, listing = self._runs, self._chunks, self.listing
        if not runs and not chunks:
            return listing
        self._runs, self._chunks = [], []
        keys, created, ends = runs[0] if len(runs) == 1 and not chunks else _fold(runs + chunks)
        listing.keys, listing.created = keys, created
        listing.session_ends = np.full(len(keys), -math.inf) if ends is None else ends
        return listing


def _fold(parts: Sequence[Run]) -> Run:
    """``parts`` as one sorted, distinct run: for each key its newest creation time and
    its latest session end."""
    keys = np.concatenate([part[0] for part in parts])
    created = np.concatenate([part[1] for part in parts])
    order = np.argsort(keys)
    keys, created = keys[order], created[order]
    if not len(keys):
        return keys, created, None
    # Sorted: an address's entries are adjacent, the first of each starts a run.
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = None
    if any(part[2] is not None for part in parts):
        absent = (np.full(len(p[0]), -math.inf) if p[2] is None else p[2] for p in parts)
        ends = np.maximum.reduceat(np.concatenate(list(absent))[order], starts)
    # fmax ignores NaN: an unreadable time never hides a readable one.
    return keys[starts], np.fmax.reduceat(created, starts), ends


def _epoch_or_nan(value: str | None) -> float:
    at = iso_epoch(value)
    return math.nan if at is None else at


def _session_end(item: Listed) -> float:
    ends = iso_epoch(item.session_expiry)
    return -math.inf if ends is None else ends
