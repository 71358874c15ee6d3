"""Reading a 400: which addresses the service refused, and how long a list it accepts.

The service's 400 message is not documented. When it names addresses of the batch, only
those are refused; when it names none, either an address it did not name is refused or
the list is longer than it takes. Bisection tells the two apart: if every part of a
refused list is then accepted, the refusal was about its size, and :class:`ListCap`
remembers that for the rest of the run.
"""

from __future__ import annotations

import re

import structlog

log = structlog.get_logger("worker.sender")

#: Anything address-shaped inside free text; delimiters common in messages are excluded.
_ADDRESS = re.compile(r"[^\s,;:<>()\[\]{}\"'`|]+@[^\s,;:<>()\[\]{}\"'`|]+")


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

    ``size()`` is what to send now: the configured ``--batch-size`` until a size refusal is
    confirmed, then a binary search between the longest list accepted and the shortest
    refused, which settles on the service's cap within a few requests.
    """

    def __init__(self, configured: int) -> None:
        self.configured = configured
        #: Longest list the service answered 2xx to.
        self.accepted = 0
        #: Shortest list refused for its size alone (None: no such refusal yet).
        self.refused: int | None = None

    def size(self) -> int:
        """How many emails the next request should carry at most."""
        if self.refused is None:
            return self.configured
        if self.accepted >= self.refused - 1:
            return max(1, self.refused - 1)
        return max(1, (self.accepted + self.refused) // 2)

    def accept(self, size: int) -> None:
        """The service took a list of ``size``."""
        if size > self.accepted:
            self.accepted = size
            if self.refused is not None and size >= self.refused:
                self.refused = None  # it took what it "refused": that was not about size

    def refuse(self, size: int) -> None:
        """A list of ``size`` was refused, and every part of it was then accepted."""
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
