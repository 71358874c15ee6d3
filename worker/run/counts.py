"""What a run reads, counted as it reads (a file's rows, a stream consumer's messages),
and each mode's own share of the summary once it is over."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from worker.run.rows import InputRows


@dataclass(slots=True)
class FileCounts:
    """What reading a file found (updated as it is read)."""

    rows: int = 0
    valid: int = 0
    #: Of ``valid``, rows whose outcome the run recorded as it began (``--resume``
    #: settling an earlier run's open intent): neither read for sending nor unsent.
    settled_first: int = 0
    skipped: int = 0
    tokens: int = 0
    #: Rows of this input rejected, recorded now or (``--resume``) by an earlier run.
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    read_all: bool = False  # every row is read: the total is known from here on
    #: The input file's rows, counted apart (None: standard input, a pipe).
    input: InputRows | None = None

    def unread(self) -> int | None:
        """Rows of the input never read (a stop came first); None when it cannot be told."""
        if self.read_all:
            return 0
        if self.input is None:
            return None
        total = self.input.total if self.input.total is not None else self.input.count()
        return max(0, total - self.rows)


@dataclass(slots=True)
class QueueCounts:
    """What a stream consumer read, claimed and dead-lettered."""

    rows: int = 0
    valid: int = 0
    claimed: int = 0
    dead_lettered: int = 0


@dataclass(frozen=True, slots=True)
class FileRead:
    """A file run's own share of the summary."""

    skipped: int  # pairs an earlier run settled (``--resume``)
    tokens: int

    def counts(self) -> dict[str, Any]:
        """The record's keys after ``valid``."""
        return {"skipped": self.skipped, "tokens": self.tokens}

    def names(self) -> dict[str, Any]:
        """The record's last keys: none for a file."""
        return {}


@dataclass(frozen=True, slots=True)
class QueueRead:
    """A stream worker's own share of the summary: its counts, and who it was."""

    claimed: int
    dead_lettered: int
    group: str
    consumer: str

    def counts(self) -> dict[str, Any]:
        """The record's keys after ``valid``."""
        return {"claimed": self.claimed, "dead_lettered": self.dead_lettered}

    def names(self) -> dict[str, Any]:
        """The record's last keys: the group and the consumer."""
        return {"group": self.group, "consumer": self.consumer}
