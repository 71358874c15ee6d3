"""JSON Lines input: one object per line with string ``token`` and ``email`` fields (or the
fields ``--token-column`` and ``--email-column`` name)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO

import msgspec

from worker.errors import UsageError
from worker.record.records import REPORT_LINE, SummaryRecord
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
        # Lines read with the first object, still to be parsed: (first line number, lines).
        self._pending: tuple[int, list[bytes | None]] | None = None
        self._check_first()

    def _check_first(self) -> None:
        """The first object must hold the token and email fields: a file whose fields have
        other names is refused whole (as a CSV header is), not row by row."""
        while (lines := self._reader.read()) is not None:
            first = self._reader.number - len(lines) + 1
            for offset, raw in enumerate(lines):
                if raw is not None and not raw.strip():
                    continue
                self._pending = (first, lines)
                self._check_object(first + offset, raw)
                return
        raise UsageError(
            f"{self.description}: the input is empty; expected one JSON object per line, "
            'such as {"token": "...", "email": "..."}'
        )

    def _check_object(self, number: int, raw: bytes | None) -> None:
        try:
            obj = msgspec.json.decode(raw) if raw is not None else None
        except ValueError:
            obj = None
        token, email = self._fields
        if isinstance(obj, dict) and raw is not None and _a_report_record(raw):
            raise UsageError(
                f"{self.description}: line {number} is a record of an invite-worker report "
                f"(kind {obj['kind']!r}), not an input row: run the list the report came "
                "from (with --resume and that report, to finish its run); to send again "
                f"whom it failed: invite-worker report failed {_path(self.description)} "
                "--output retry.csv, then run retry.csv"
            )
        if not isinstance(obj, dict):
            shown = (raw or b"")[:80].decode("utf-8", "replace")
            raise UsageError(
                f"{self.description}: line {number} is not a JSON object ({shown!r}); JSON "
                "Lines input holds one object per line. If the input is CSV, pass --format csv"
            )
        missing = [name for name in (token, email) if name not in obj]
        if missing:
            found = ", ".join(repr(str(k)) for k in list(obj)[:20]) or "none"
            raise UsageError(
                f"{self.description}: the first object (line {number}) has no "
                f"{' and no '.join(repr(m) for m in missing)} field (its fields: {found}); "
                "name the fields with --token-column and --email-column"
            )

    @property
    def may_wait(self) -> bool:
        """Whether a read can wait on a writer (see :class:`~worker.sources.Source`)."""
        return self._reader.may_wait

    def chunks(self) -> AsyncIterator[Sequence[Row]]:
        return chunked(self._parse_chunk, may_wait=self.may_wait)

    def _parse_chunk(self) -> list[Row] | None:
        if self._pending is not None:
            _, lines = self._pending
            self._pending = None
        else:
            read = self._reader.read()
            if read is None:
                return None
            lines = read
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
        self._reader.close()


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


def _a_report_record(raw: bytes) -> bool:
    """Whether ``raw`` is a record an invite-worker report holds, by its whole shape (a
    ``kind`` field alone is an input's own business): a summary, which has no required
    field, only without an ``email``."""
    try:
        record = REPORT_LINE.decode(raw)
    except ValueError:  # msgspec's DecodeError and ValidationError
        return False
    return not isinstance(record, SummaryRecord) or b'"email"' not in raw


def _path(description: str) -> str:
    """The input's path as a command takes it (standard input has none to give)."""
    return "REPORT" if description.startswith("<") else description
