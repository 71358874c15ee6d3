"""CSV input: a header naming ``token`` and ``email`` columns, then one pair per line.

Each physical line is parsed on its own. That gives exact line numbers, and a stray quote
costs only its own line instead of swallowing the rest of the file (embedded newlines inside
quoted fields are not supported: no valid token or email contains one).
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Sequence
from itertools import count, repeat
from typing import BinaryIO, cast

from worker.errors import UsageError
from worker.sources.lines import Columns, LineReader, Row, chunked
from worker.validate import Reason

#: Delimiters recognised from the header, in order of preference (spreadsheets in some
#: locales export ``;``; tab-separated exports are common too).
DELIMITERS = (",", ";", "\t")


class CsvSource:
    """A CSV stream; the header is read and checked on construction."""

    def __init__(
        self, stream: BinaryIO, description: str, columns: tuple[str, str] = ("token", "email")
    ) -> None:
        self.description = description
        self._columns = (columns[0].strip().lower(), columns[1].strip().lower())
        self._stream = stream
        self._reader = LineReader(stream)
        # Lines read along with the header, still to be parsed: (first line number, lines).
        self._pending: tuple[int, list[bytes | None]] | None = None
        #: The line the header is on (blank lines before it are skipped).
        self.header_line = 0
        try:
            self._delimiter, self._token_at, self._email_at, self._width = self._read_header()
        except BaseException:
            self._reader.close()
            raise

    def _read_header(self) -> tuple[str, int, int, int]:
        while (lines := self._reader.read()) is not None:
            first = self._reader.number - len(lines) + 1
            for offset, raw in enumerate(lines):
                number = first + offset
                if raw is None:
                    raise UsageError(f"{self.description}: line {number} (the header) is too long")
                if not raw.strip():
                    continue
                header = self._parse_header(number, raw)
                self.header_line = number
                self._pending = self._first_rows(number, number + 1, lines[offset + 1 :])
                return header
        raise UsageError(
            f"{self.description}: the input is empty; expected a header row such as 'token,email'"
        )

    def _first_rows(
        self, header: int, first: int, lines: list[bytes | None]
    ) -> tuple[int, list[bytes | None]]:
        """The lines from the first row on: a header with no row under it is refused."""
        while all(line is not None and not line.strip() for line in lines):
            more = self._reader.read()
            if more is None:
                raise UsageError(
                    f"{self.description}: the input holds a header (line {header}) but no "
                    "row; nothing to send"
                )
            first, lines = self._reader.number - len(more) + 1, more
        return first, lines

    def _parse_header(self, number: int, raw: bytes) -> tuple[str, int, int, int]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(
                f"{self.description}: the header (line {number}) is not UTF-8 text; "
                "save the file as UTF-8 CSV"
            ) from None
        token, email = self._columns
        for delimiter in DELIMITERS:
            cells = _split(text, delimiter)
            names = [c.strip().lower() for c in cells] if cells is not None else []
            if token in names and email in names:
                return delimiter, names.index(token), names.index(email), len(names)
        if text.lstrip().startswith(("{", "[")):
            raise UsageError(
                f"{self.description}: line {number} looks like JSON, not a CSV header; for "
                "JSON Lines pass --format jsonl (or name the file .jsonl)"
            )
        delimiter = max(DELIMITERS, key=text.count)
        names = [c.strip().lower() for c in (_split(text, delimiter) or [text])]
        missing = " and ".join(repr(c) for c in (token, email) if c not in names)
        raise UsageError(
            f"{self.description}: the header (line {number}) has no {missing} column (its "
            f"columns: {', '.join(repr(n) for n in names[:20])[:300]}); add a header row such "
            f"as '{token},{email}', or name your columns with --token-column and "
            "--email-column"
        )

    @property
    def may_wait(self) -> bool:
        """Whether a read can wait on a writer (see :class:`~worker.sources.Source`)."""
        return self._reader.may_wait

    def chunks(self) -> AsyncIterator[Sequence[Row]]:
        return chunked(self._parse_chunk, may_wait=self.may_wait)

    def _parse_chunk(self) -> Sequence[Row] | None:
        if self._pending is not None:
            first, lines = self._pending
            self._pending = None
        else:
            read = self._reader.read()
            if read is None:
                return None
            first, lines = self._reader.number - len(read) + 1, read
        return self._clean_block(first, lines) or self._parse_lines(first, lines)

    def _clean_block(self, first: int, lines: list[bytes | None]) -> Columns | None:
        """The block as columns when every line is plain ``a,b`` text; None otherwise.

        The common case, split in C: no quote, no over-long line, valid UTF-8, and every
        line holding exactly the header's number of delimiters (which also rules out blank
        lines). Anything else goes through :meth:`_parse_lines`, line by line.
        """
        if not lines or None in lines:
            return None
        block = b"\n".join(cast(list[bytes], lines))
        if b'"' in block:
            return None
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            return None
        delimiter, width = self._delimiter, self._width
        texts = text.split("\n")
        if set(map(str.count, texts, repeat(delimiter))) != {width - 1}:
            return None
        cells = text.replace("\n", delimiter).split(delimiter)
        return Columns(first, cells[self._token_at :: width], cells[self._email_at :: width])

    def _parse_lines(self, first: int, lines: list[bytes | None]) -> list[Row]:
        rows: list[Row] = []
        append = rows.append
        delimiter, token_at, email_at, width = (
            self._delimiter,
            self._token_at,
            self._email_at,
            self._width,
        )
        needed = max(token_at, email_at) + 1
        for number, raw, text in zip(count(first), lines, _decode(lines), strict=False):
            if raw is None:
                append((number, None, None, Reason.LINE_TOO_LONG))
            elif not raw.strip():
                continue  # blank (ASCII whitespace only): not a row, as in JSONL
            elif text is None:
                append((number, None, None, Reason.BAD_ENCODING))
            else:
                cells = text.split(delimiter) if '"' not in text else _split(text, delimiter)
                if cells is None:
                    append((number, None, None, Reason.MALFORMED_CSV))
                elif len(cells) < needed:
                    append((number, None, None, Reason.TOO_FEW_FIELDS))
                elif len(cells) > width and any(c.strip() for c in cells[width:]):
                    # Unquoted delimiters shifted the columns: no way to know which is which.
                    append((number, None, None, Reason.TOO_MANY_FIELDS))
                else:
                    append((number, cells[token_at], cells[email_at], None))
        return rows

    def close(self) -> None:
        self._reader.close()


def _decode(lines: list[bytes | None]) -> Sequence[str | None]:
    """Each line as text; None where it is over-long or not UTF-8.

    Decodes the block in one call when it can (the common case) and falls back to line by
    line, so one bad line costs only itself.
    """
    if None not in lines:
        try:
            texts = b"\n".join(cast(list[bytes], lines)).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
        else:
            if len(texts) == len(lines):
                return texts
    return [_decode_line(raw) for raw in lines]


def _decode_line(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _split(text: str, delimiter: str) -> list[str] | None:
    """Split one line into fields; ``None`` when its quoting is broken."""
    if '"' not in text:
        return text.split(delimiter)
    try:
        return next(csv.reader([text], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return None
