"""JSON Lines input: one object per line with string ``token`` and ``email`` fields (or the
fields ``--token-column`` and ``--email-column`` name)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO

import msgspec

from worker.sources.lines import LineReader, Row, chunked
from worker.validate import Reason


class JsonlSource:
    """A JSONL stream; extra fields in each object are ignored."""

    def __init__(
        self, stream: BinaryIO, description: str, fields: tuple[str, str] = ("token", "email")
    ) -> None:
        self.description = description
        self._fields = fields
        self._stream = stream
        self._reader = LineReader(stream)

    def chunks(self) -> AsyncIterator[Sequence[Row]]:
        return chunked(self._parse_chunk)

    def _parse_chunk(self) -> list[Row] | None:
        lines = self._reader.read()
        if lines is None:
            return None
        rows: list[Row] = []
        append = rows.append
        loads = msgspec.json.decode
        for number, raw in enumerate(lines, self._reader.number - len(lines) + 1):
            if raw is None:
                append((number, None, None, Reason.LINE_TOO_LONG))
            elif raw.strip():
                try:
                    obj = loads(raw)
                except ValueError:  # msgspec.DecodeError, or a UnicodeError in a string
                    append((number, None, None, _why_not_json(raw)))
                else:
                    append(_row_from(number, obj, self._fields))
        return rows

    def close(self) -> None:
        self._stream.close()


def _row_from(number: int, obj: object, fields: tuple[str, str]) -> Row:
    if not isinstance(obj, dict):
        return (number, None, None, Reason.NOT_AN_OBJECT)
    token = obj.get(fields[0])
    email = obj.get(fields[1])
    if token is None:
        return (number, None, email if isinstance(email, str) else None, Reason.MISSING_TOKEN)
    if email is None:
        return (number, token if isinstance(token, str) else None, None, Reason.MISSING_EMAIL)
    if not isinstance(token, str) or not isinstance(email, str):
        return (number, None, None, Reason.NOT_A_STRING)
    return (number, token, email, None)


def _why_not_json(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return Reason.BAD_ENCODING
    return Reason.INVALID_JSON
