"""Input sources: where token/email pairs come from.

Every source yields *chunks* of raw rows so the per-row cost stays small. A raw row is a
plain tuple ``(line, token, email, reason)``:

- ``line``: 1-based line number in the input (the CSV header is line 1);
- ``token`` / ``email``: the values as read (untrimmed), ``None`` where absent;
- ``reason``: ``None`` when the reader could parse the row, else the reason code of why it
  could not (``invalid_json``, ``bad_encoding``, ``line_too_long``, ...). Validation of the
  values themselves happens later, in :mod:`worker.validate`.

A chunk is any sequence of such rows; a reader may hand a clean block over as
:class:`~worker.sources.lines.Columns`, which holds the same rows column-wise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from worker.errors import UsageError
from worker.sources.lines import Row

RawRow = Row  # (line, token, email, reason a reader already rejected the line for)
Format = Literal["csv", "jsonl"]


class Source(Protocol):
    """A stream of raw rows, read incrementally."""

    #: Human description for logs, e.g. the path.
    description: str

    @property
    def may_wait(self) -> bool:
        """Whether a read can wait on a writer (a pipe, a FIFO, a terminal): the rows read
        may then be all there is for a while, and partial batches go out after
        ``--linger``."""
        return False

    def chunks(self) -> AsyncIterator[Sequence[RawRow]]:
        """Yield chunks of raw rows until the input ends."""
        ...

    def close(self) -> None:
        """Release the underlying file (idempotent)."""
        ...


def detect_format(source: str, explicit: str | None) -> Format:
    """Pick the input format from ``--format`` or the file extension (stdin defaults to CSV)."""
    if explicit is not None:
        if explicit not in ("csv", "jsonl"):
            raise UsageError(f"--format must be csv or jsonl, got {explicit!r}")
        return "csv" if explicit == "csv" else "jsonl"
    if source == "-":
        return "csv"
    suffix = Path(source).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UsageError(
        f"cannot tell the format of {source!r} from its extension; "
        "name it .csv or .jsonl, or pass --format csv|jsonl"
    )


def open_source(
    source: str,
    fmt: str | None = None,
    stdin: BinaryIO | None = None,
    columns: tuple[str, str] = ("token", "email"),
) -> Source:
    """Open a file (or ``-`` for standard input) as a :class:`Source`.

    For CSV the header is read here, so a missing ``token``/``email`` column is reported as a
    :class:`UsageError` before anything is sent. ``columns`` names the token and email
    columns (CSV, any case) or fields (JSONL).
    """
    from worker.sources.csvfile import CsvSource
    from worker.sources.jsonl import JsonlSource

    if source != "-":  # what the path is, before what its name suggests
        if Path(source).is_dir():
            raise UsageError(f"{source!r} is a folder; give the input file in it (a .csv or "
                             ".jsonl file), or - for standard input")  # fmt: skip
        if not Path(source).exists():
            raise UsageError(f"cannot read {source!r}: no such file")
    kind = detect_format(source, fmt)
    if source == "-":
        import sys

        stream = stdin if stdin is not None else sys.stdin.buffer
        description = "<stdin>"
    else:
        try:
            stream = open(source, "rb")  # noqa: SIM115 - the source owns and closes it
        except OSError as exc:
            raise UsageError(f"cannot read {source!r}: {exc.strerror or exc}") from None
        description = source
    try:
        if kind == "csv":
            return CsvSource(stream, description, columns)
        return JsonlSource(stream, description, columns)
    except BaseException:
        stream.close()
        raise
