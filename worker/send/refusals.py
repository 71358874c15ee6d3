"""Reading a 400: which addresses the service refused, and how long a list it accepts.

The service's 400 message is not documented. When it names addresses of the batch, only
those are refused; when it names none, either an address it did not name is refused or
the list is longer than it takes. Bisection tells the two apart: if every part of a
refused list is then accepted, the refusal was about its size, and :class:`ListCap`
remembers that for the rest of the run. A message that names a maximum ("max 20") is
taken as a hint: lists of that size are tried first, and once one is accepted the cap is
known without a search.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator

import structlog

log = structlog.get_logger("worker.sender")

#: Anything address-shaped inside free text; delimiters common in messages are excluded.
_ADDRESS = re.compile(r"[^\s,;:<>()\[\]{}\"'`|]+@[^\s,;:<>()\[\]{}\"'`|]+")
#: A maximum named in free text: "max 20", "maximum of 20", "at most 20", "limit is 20".
_MAXIMUM = re.compile(r"\b(?:max(?:imum)?|at most|up to|limit(?:ed)?)\b\D{0,24}?(\d{1,6})\b", re.I)


def named_limit(message: str, size: int) -> int | None:
    """The longest list a refusal of a list of ``size`` says the service takes, if it says
    one: a number after "max", "at most", "up to" or "limit", between 1 and ``size - 1``."""
    match = _MAXIMUM.search(message)
    if match is None:
        return None
    limit = int(match.group(1))
    return limit if 1 <= limit < size else None


def named_addresses(message: str, emails: list[str]) -> list[str]:
    """The addresses of ``emails`` that ``message`` names, in batch order.

    Matching is exact (ignoring case and trailing punctuation), so a parse can only ever
    pick addresses that are in the batch. A message naming *every* address of a batch of
    several is not trusted (a service echoing the request would look the same): it returns
    nothing, and the batch is bisected instead.
    """
    if "@" not in message:
        return []
    mentioned = {m.group().strip(".").lower() for m in _ADDRESS.finditer(message)}
    named = [e for e in emails if e.lower() in mentioned]
    if len(emails) > 1 and len(named) == len(emails):
        return []
    return named


class ListCap:
    """The longest list the service accepts, learned from refusals about size alone.

    ``size()`` is what to send now: the configured ``--batch-size`` until a list is refused
    with no address named, then a binary search between the longest list accepted and the
    shortest refused, which settles on the service's cap within a few requests. Senders
    searching at once each try a size below those being tried (:meth:`trying`), so the
    search goes on in parallel rather than every sender failing at one size.

    A refusal counts as *confirmed* (about size) once every part of the refused list has
    been accepted; until then it is a *suspect*, which already steers the search so that
    concurrent senders do not each rediscover the cap, and which is dropped if some
    address of the list turns out to be the refused one.
    """

    def __init__(self, configured: int) -> None:
        self.configured = configured
        #: Longest list the service answered 2xx to.
        self.accepted = 0
        #: Shortest list refused for its size alone (None: no such refusal yet).
        self.refused: int | None = None
        self._suspects: Counter[int] = Counter()
        #: The maximum a refusal's message named (see :func:`named_limit`), until a list of
        #: that size is accepted (then it is the cap) or refused for its size (then wrong).
        self.hint: int | None = None
        self._trying: Counter[int] = Counter()

    def size(self) -> int:
        """How many emails the next request should carry at most."""
        bounds = [n for n in self._suspects if n > self.accepted]
        if self.refused is not None:
            bounds.append(self.refused)
        hint = self.hint
        if hint is not None and hint > self.accepted and all(hint < b for b in bounds):
            return hint
        if not bounds:
            return self.configured
        upper = min(bounds)
        if self.accepted >= upper - 1:
            return max(1, upper - 1)
        # Sizes already being tried by other senders: probe below the lowest, so that
        # concurrent senders search in parallel instead of all failing at one size; where
        # there is no room for that (or only for lists too short to be worth a request),
        # send what is known to pass.
        flying = [n for n in self._trying if self.accepted < n < upper]
        if flying:
            below = (self.accepted + min(flying)) // 2
            if below > self.accepted and below >= upper // 8:
                return below
            return self.accepted or min(flying)
        return max(1, (self.accepted + upper) // 2)

    @contextlib.contextmanager
    def trying(self, size: int) -> Iterator[None]:
        """A list of ``size`` is being sent (see :meth:`size`)."""
        self._trying[size] += 1
        try:
            yield
        finally:
            self._trying[size] -= 1
            if self._trying[size] <= 0:
                del self._trying[size]

    def accept(self, size: int) -> None:
        """The service took a list of ``size``."""
        if size > self.accepted:
            self.accepted = size
            if self.refused is not None and size >= self.refused:
                self.refused = None  # it took what it "refused": that was not about size
        if self.hint is not None and size >= self.hint:
            hint, self.hint = self.hint, None
            if size == hint:  # the named maximum holds: one more is what it refuses
                self.refuse(hint + 1)

    def named(self, limit: int | None) -> None:
        """A refusal's message named ``limit`` as the maximum (None: it named none)."""
        if (
            limit is not None
            and limit > self.accepted
            and (self.refused is None or limit < self.refused)
        ):
            self.hint = limit

    def suspect(self, size: int) -> None:
        """A list of ``size`` was refused with no address named; its parts go out next."""
        self._suspects[size] += 1

    def settle(self, size: int, *, all_accepted: bool) -> None:
        """The parts of a suspect list of ``size`` are done; were they all accepted?"""
        self._suspects[size] -= 1
        if self._suspects[size] <= 0:
            del self._suspects[size]
        if all_accepted:
            self.refuse(size)

    def refuse(self, size: int) -> None:
        """A list of ``size`` was refused, and every part of it was then accepted."""
        if self.hint is not None and size <= self.hint:
            self.hint = None  # the named maximum was refused: the message was wrong
        if size <= self.accepted or (self.refused is not None and size >= self.refused):
            return
        self.refused = size
        log.info(
            "batch.cap_learned",
            refused=size,
            accepted=self.accepted,
            batch_size=self.size(),
            configured=self.configured,
        )
