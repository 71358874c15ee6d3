"""CSV and JSONL readers: header handling, line numbers, and rows they cannot parse."""

from __future__ import annotations

import asyncio
import io
import os
import select
import sys
import threading
import time
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import collect, csv_source, jsonl_source
from worker.errors import UsageError
from worker.sources import detect_format, feed, lines, open_source
from worker.sources.lines import MAX_LINE_BYTES, LineReader
from worker.validate.rules import Reason


async def test_csv_header_any_order_case_and_extra_columns() -> None:
    """Columns are found by name, ignoring case, order and extra columns; header is line 1."""
    rows = await collect(csv_source("Name,EMAIL, Token \nAda,ada@example.com,tok1\n"))
    assert rows == [(2, "tok1", "ada@example.com", None)]


async def test_csv_bom_and_crlf() -> None:
    """A UTF-8 byte-order mark and Windows line endings are handled."""
    data = b"\xef\xbb\xbftoken,email\r\ntok,a@example.com\r\ntok,b@example.com\r\n"
    rows = await collect(open_source("-", "csv", stdin=io.BytesIO(data)))
    assert rows == [(2, "tok", "a@example.com", None), (3, "tok", "b@example.com", None)]


async def test_csv_semicolon_and_tab_delimiters_are_detected_from_the_header() -> None:
    """Locale-style ';' and tab-separated exports work."""
    assert await collect(csv_source("token;email\nt;a@example.com\n")) == [
        (2, "t", "a@example.com", None)
    ]
    assert await collect(csv_source("email\ttoken\na@example.com\tt\n")) == [
        (2, "t", "a@example.com", None)
    ]


async def test_csv_quoted_fields() -> None:
    """Quoted fields, including ones with the delimiter inside, are parsed."""
    rows = await collect(csv_source('token,email,name\n"t","a@example.com","Lovelace, Ada"\n'))
    assert rows == [(2, "t", "a@example.com", None)]


async def test_csv_unbalanced_quote_costs_only_its_line() -> None:
    """A stray quote costs its own line; the lines after it are read normally.

    A quote inside an unquoted field is literal CSV, so that address is left to validation.
    """
    text = 'token,email\nt,"a@example.com\nt,b@example.com\nt,c"x"@example.com\nt,d@example.com\n'
    rows = await collect(csv_source(text))
    assert rows == [
        (2, None, None, "malformed_csv"),
        (3, "t", "b@example.com", None),
        (4, "t", 'c"x"@example.com', None),
        (5, "t", "d@example.com", None),
    ]


async def test_csv_field_counts() -> None:
    """Too few fields is rejected; too many is rejected unless the extras are empty."""
    rows = await collect(csv_source("token,email\nonly\nt,a@example.com,extra\nt,b@example.com,\n"))
    assert rows == [
        (2, None, None, "too_few_fields"),
        (3, None, None, "too_many_fields"),
        (4, "t", "b@example.com", None),
    ]


async def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    """Blank lines are not rows, yet line numbers stay those of the file."""
    rows = await collect(csv_source("token,email\n\n  \nt,a@example.com\n"))
    assert rows == [(4, "t", "a@example.com", None)]


async def test_invalid_utf8_rejects_only_that_line() -> None:
    """Latin-1 bytes in one line reject that line with bad_encoding."""
    data = b"token,email\nt,caf\xe9@example.com\nt,ok@example.com\n"
    rows = await collect(open_source("-", "csv", stdin=io.BytesIO(data)))
    assert rows == [(2, None, None, "bad_encoding"), (3, "t", "ok@example.com", None)]


async def test_very_long_line_is_rejected_with_bounded_reads() -> None:
    """A line over the limit is rejected and the next line is still read."""
    data = b"token,email\n" + b"x" * (MAX_LINE_BYTES * 3) + b"\nt,a@example.com\n"
    rows = await collect(open_source("-", "csv", stdin=io.BytesIO(data)))
    assert rows == [(2, None, None, "line_too_long"), (3, "t", "a@example.com", None)]


@pytest.mark.parametrize(
    "header",
    ["", "\n\n", "name,address\n", "tok,mail\n", "token\n"],
)
def test_csv_without_token_and_email_header_is_a_usage_error(header: str) -> None:
    """A missing token/email header stops before anything runs, saying what to add."""
    with pytest.raises(UsageError, match="token"):
        csv_source(header + "t,a@example.com\n")


async def test_jsonl_rows_and_reasons() -> None:
    """Objects with string fields are rows; everything else gets a specific reason."""
    data = b"\n".join(
        [
            b'{"token": "t", "email": "a@example.com", "extra": 1}',
            b'["t", "a@example.com"]',
            b"42",
            b"null",
            b'{"token": "t"',
            b'{"token": "t", "email": 7}',
            b'{"email": "b@example.com"}',
            b'{"token": "t"}',
            b"",
            b'{"token": "t", "email": "caf\xe9@example.com"}',
        ]
    )
    rows = await collect(jsonl_source(data))
    assert rows == [
        (1, "t", "a@example.com", None),
        (2, None, None, "not_an_object"),
        (3, None, None, "not_an_object"),
        (4, None, None, "not_an_object"),
        (5, None, None, "invalid_json"),
        (6, None, None, "not_a_string"),
        (7, None, "b@example.com", "missing_token"),
        (8, "t", None, "missing_email"),
        (10, None, None, "bad_encoding"),
    ]


async def test_many_rows_come_in_several_chunks(tmp_path: Path) -> None:
    """A file larger than one chunk is read completely, in order."""
    path = tmp_path / "big.csv"
    path.write_text("token,email\n" + "".join(f"t,u{i}@example.com\n" for i in range(60_000)))
    chunks = []
    source = open_source(str(path))
    async for chunk in source.chunks():
        chunks.append(chunk)
    source.close()
    assert len(chunks) > 1
    assert [r[0] for c in chunks for r in c] == list(range(2, 60_002))


async def test_a_regular_file_is_parsed_on_the_loop_with_turns_between_blocks(
    tmp_path: Path,
) -> None:
    """A regular file's blocks are parsed on the loop (no reader thread, whose every block
    would cost the loop the interpreter lock), and a task waiting meanwhile gets a turn
    between any two blocks; a pipe is still read in a thread."""
    path = tmp_path / "big.csv"
    path.write_text("token,email\n" + "".join(f"t,u{i}@example.com\n" for i in range(60_000)))
    ticks: list[int] = []

    async def other() -> None:
        while True:
            ticks.append(len(chunks))
            await asyncio.sleep(0)

    readers_before = {t for t in threading.enumerate() if t.name == "invite-worker-read"}
    chunks: list[object] = []
    source = open_source(str(path))
    ticking = asyncio.ensure_future(other())
    try:
        async for chunk in source.chunks():
            chunks.append(chunk)
            assert {
                t for t in threading.enumerate() if t.name == "invite-worker-read"
            } <= readers_before
    finally:
        ticking.cancel()
        source.close()
    assert len(chunks) > 2
    assert set(range(1, len(chunks))) <= set(ticks), "a block followed another with no turn"

    read_end, write_end = os.pipe()
    os.write(write_end, b"token,email\nt,a@example.com\n")
    os.close(write_end)
    piped = open_source("-", "csv", stdin=os.fdopen(read_end, "rb"))
    with patch("worker.sources.lines.in_thread", wraps=feed.in_thread) as threaded:
        assert [row[2] for row in await collect(piped)] == ["a@example.com"]
    assert threaded.called


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_an_over_long_line_in_a_regular_file_never_holds_the_loop_for_its_length(
    tmp_path: Path, fmt: str
) -> None:
    """A line of 16 MiB amid the rows is read a block per turn of the loop, not in one
    call: a task waiting meanwhile gets a turn per block; the line is rejected as too long
    and the row after it is read."""
    path = tmp_path / f"long.{fmt}"
    row = "t,b@example.com\n" if fmt == "csv" else '{"token": "t", "email": "b@example.com"}\n'
    with path.open("w") as f:
        f.write(("token,email\n" if fmt == "csv" else "") + row)
        f.write("x" * (16 << 20) + "\n" + row)
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(other())
    try:
        rows = await collect(open_source(str(path)))
    finally:
        ticking.cancel()
    assert [row[3] for row in rows] == [None, Reason.LINE_TOO_LONG, None]
    assert rows[-1][2] == "b@example.com"
    assert turns >= (16 << 20) // (256 << 10) // 2, turns


@pytest.mark.parametrize(("fmt", "bad"), [("csv", '"x\n'), ("jsonl", "{\n")])
async def test_malformed_lines_are_parsed_a_bounded_number_per_turn_of_the_loop(
    tmp_path: Path, fmt: str, bad: str
) -> None:
    """200,000 short malformed lines (a stray quote, a broken object) take the slow path
    line by line: they come at most MAX_LINES to a chunk, with a turn for other tasks
    between chunks, so one 256 KiB block never holds the loop for all its 90,000 lines."""
    path = tmp_path / f"bad.{fmt}"
    first = "token,email\n" if fmt == "csv" else '{"token": "t", "email": "a@example.com"}\n'
    path.write_text(first + bad * 200_000)
    sizes: list[int] = []
    ticks: list[int] = []

    async def other() -> None:
        while True:
            ticks.append(len(sizes))
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(other())
    source = open_source(str(path))
    try:
        async for chunk in source.chunks():
            sizes.append(len(chunk))
    finally:
        ticking.cancel()
        source.close()
    assert sum(sizes) == 200_000 + (fmt == "jsonl")
    assert max(sizes) <= lines.MAX_LINES
    assert set(range(1, len(sizes))) <= set(ticks), "a chunk followed another with no turn"


def test_format_detection() -> None:
    """The format comes from --format, else the extension; unknown extensions are errors."""
    assert detect_format("x.CSV", None) == "csv"
    assert detect_format("x.jsonl", None) == "jsonl"
    assert detect_format("-", None) == "csv"
    assert detect_format("x.txt", "jsonl") == "jsonl"
    with pytest.raises(UsageError, match="--format"):
        detect_format("x.txt", None)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    """A path that cannot be read is reported plainly."""
    with pytest.raises(UsageError, match="cannot read"):
        open_source(str(tmp_path / "nope.csv"))


def reference_lines(data: bytes, limit: int) -> list[bytes | None]:
    """What LineReader must return, computed the obvious way."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    out: list[bytes | None] = []
    for part in parts:
        line = part[:-1] if part.endswith(b"\r") else part
        out.append(None if len(part) > limit else line)
    return out


@example(data=b"\xef\xbb\xbfa\r\nb", block=1, limit=1)  # a BOM split over reads
@example(data=b"\xef\xbb\xbf", block=1, limit=1)
@given(
    data=st.lists(
        st.one_of(st.binary(max_size=12), st.sampled_from([b"\n", b"\r\n", b"\r", b"x" * 20])),
        max_size=40,
    ).map(b"".join),
    block=st.integers(1, 9),
    limit=st.integers(1, 15),
)
@settings(max_examples=300)
def test_line_reader_matches_a_naive_split(data: bytes, block: int, limit: int) -> None:
    """Property: any bytes, any block size: the same lines as a plain split, over-long -> None."""
    with (
        patch("worker.sources.lines.BLOCK_BYTES", block),
        patch("worker.sources.lines.MAX_LINE_BYTES", limit),
    ):
        reader = LineReader(io.BytesIO(data))
        got: list[bytes | None] = []
        while (lines := reader.read()) is not None:
            got.extend(lines)
    assert got == reference_lines(data, limit)
    assert reader.number == len(got)


async def test_closing_a_source_while_its_pipe_is_silent_returns_at_once() -> None:
    """A read waiting on a pipe's silent writer holds nothing close() needs: close returns
    at once from another thread, the pipe's reading end is closed (the writer sees EPIPE)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"token,email\nt,a@example.com\n")
        source = open_source("-", "csv", stdin=os.fdopen(read_end, "rb"))
        chunks = source.chunks()
        assert list(await anext(chunks)) == [(2, "t", "a@example.com", None)]
        waiting = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        closer = threading.Thread(target=source.close)
        closer.start()
        closer.join(timeout=5)
        assert not closer.is_alive(), "close() waited for the writer"
        waiting.cancel()
        # The reading end goes as the woken read returns: the writing end then says so.
        watch = select.poll()
        watch.register(write_end, select.POLLERR)
        for _ in range(50):
            if watch.poll(100):
                break
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"t,b@example.com\n")
    finally:
        os.close(write_end)


async def test_a_pipe_left_non_blocking_is_read_to_its_end() -> None:
    """A pipe handed over non-blocking (as some parents leave stdin): a pause of the writer
    is waited for, not taken for the end of the input."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def write() -> None:
        os.write(write_end, b"token,email\nt,a@example.com\n")
        time.sleep(0.3)
        os.write(write_end, b"t,b@example.com\n")
        os.close(write_end)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        rows = await collect(open_source("-", "csv", stdin=os.fdopen(read_end, "rb")))
    finally:
        writer.join()
    assert [row[2] for row in rows] == ["a@example.com", "b@example.com"]


def test_close_racing_a_read_never_blocks_and_closes_the_pipe_once() -> None:
    """Property under a thread switch every microsecond: whenever close() comes, during a
    read that waits or one that has data, it returns at once, the read ends with its lines
    or InputClosed, and the pipe's reading end is closed (the writer sees EPIPE)."""
    from worker.sources.feed import InputClosed

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(100):
            read_end, write_end = os.pipe()
            reader = LineReader(os.fdopen(read_end, "rb"))
            got: list[object] = []

            def read(reader: LineReader = reader, got: list[object] = got) -> None:
                try:
                    got.append(reader.read())
                except InputClosed as exc:
                    got.append(exc)

            thread = threading.Thread(target=read)
            thread.start()
            if round_ % 2:
                os.write(write_end, b"x\n")
            closer = threading.Thread(target=reader.close)
            closer.start()
            closer.join(timeout=5)
            thread.join(timeout=5)
            assert not closer.is_alive()
            assert not thread.is_alive()
            assert got[0] == [b"x"] or isinstance(got[0], InputClosed)
            with pytest.raises(BrokenPipeError):
                os.write(write_end, b"y\n")
            os.close(write_end)
    finally:
        sys.setswitchinterval(interval)
