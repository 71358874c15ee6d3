"""The compact duplicate index, and the chunk-wise fast paths against row-by-row oracles."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import worker.sources.lines
import worker.validate.dedupe
from tests.conftest import TOKEN_A, TOKEN_B, by_kind, csv_source, read_report
from worker.config import Config
from worker.emulator import Emulator
from worker.run import run
from worker.sources import open_source
from worker.sources.csvfile import CsvSource
from worker.sources.lines import Columns, Row
from worker.validate import MAX_EMAIL_LENGTH, TOKEN_RE, Rejection, Validator
from worker.validate.dedupe import PairIndex, locate, member

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@pytest.fixture
def small_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge into the sorted array after a handful of keys, so tests cross many merges."""
    monkeypatch.setattr(worker.validate.dedupe, "MIN_RECENT", 4)


@pytest.mark.usefixtures("small_index")
# No deadline: the first example imports numpy, which is slow on a loaded machine.
@settings(deadline=None)
@given(st.lists(st.lists(st.integers(min_value=-50, max_value=50) | INT64, max_size=30)))
def test_index_answers_like_a_set(chunks: list[list[int]]) -> None:
    """add_many reports exactly the keys a plain set has already seen, across merges."""
    index, reference = PairIndex(), set()
    for keys in chunks:
        expected = []
        for position, key in enumerate(keys):
            if key in reference:
                expected.append(position)
            reference.add(key)
        assert index.add_many(keys) == expected
        assert len(index) == len(reference)
    assert all(key in index for key in reference)
    assert 2**62 + 1 not in index or 2**62 + 1 in reference


@settings(deadline=None)
@given(st.lists(st.integers(min_value=-50, max_value=50) | INT64, max_size=60),
       st.lists(st.integers(min_value=-50, max_value=50) | INT64, max_size=60))  # fmt: skip
def test_member_and_locate_answer_like_a_set(keys: list[int], needles: list[int]) -> None:
    """member says, needle by needle in the needles' own order, what a set says; locate
    gives the position of each needle found."""
    import numpy as np

    haystack = np.unique(np.array(keys, dtype=np.int64))
    asked = np.array(needles, dtype=np.int64)
    found = member(haystack, asked)
    assert found.tolist() == [n in set(keys) for n in needles]
    if len(haystack):
        at, there = locate(haystack, asked)
        assert there.tolist() == found.tolist()
        assert all(haystack[a] == n for a, n, t in zip(at, needles, there, strict=True) if t)


@pytest.mark.usefixtures("small_index")
def test_index_keeps_most_keys_in_the_sorted_array() -> None:
    """After many chunks the recent set holds at most a fraction of the keys."""
    index = PairIndex()
    for start in range(0, 20_000, 500):
        assert index.add_many(list(range(start * 7919, (start + 500) * 7919, 7919))) == []
    assert len(index) == 20_000
    assert len(index._recent) <= 20_000 * worker.validate.dedupe.MERGE_FRACTION
    assert index.add_many([0, 7919 * 19_999, -1]) == [0, 1]


def oracle(rows: list[Row]) -> tuple[list[tuple[str, str]], list[Rejection]]:
    """Row-by-row reference: trim, the reasons in order of precedence, exact duplicates."""
    from worker.validate import check_email

    valid: list[tuple[str, str]] = []
    rejected: list[Rejection] = []
    seen: set[tuple[str, str]] = set()
    for line, token, email, reason in rows:
        if reason is not None:
            rejected.append((line, reason, token, email))
            continue
        token, email = (token or "").strip(), (email or "").strip()
        if not token:
            reason = "missing_token"
        elif not email:
            reason = "missing_email"
        elif not TOKEN_RE.fullmatch(token):
            reason = "invalid_token"
        elif not check_email(email) or len(email) > MAX_EMAIL_LENGTH:
            reason = "invalid_email"
        elif (token.lower(), email.lower()) in seen:
            reason = "duplicate"
        else:
            seen.add((token.lower(), email.lower()))
            valid.append((token, email))
            continue
        rejected.append((line, reason, token, email))
    return valid, rejected


CELLS = st.sampled_from(
    ["t1", "T1", " t1", "t2 ", "", "bad/token", "a@b.co", "A@B.CO", "x.y@ex.io", " a@b.co",
     "no-at", "a@b.co\nc@d.io", "q@", "@q.io", "x" * 250 + "@b.co", None]
)  # fmt: skip
# Mostly clean rows, so that many chunks are entirely clean and take the fast path.
TOKENS = st.sampled_from(["t1", "T1", "t2"]) | CELLS
EMAILS = st.sampled_from(["a@b.co", "A@B.CO", "x.y@ex.io", "a@b.co\nc@d.io"]) | CELLS
READER = st.sampled_from([None] * 9 + ["bad_encoding"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.tuples(TOKENS, EMAILS, READER), max_size=8), max_size=6))
def test_chunk_wise_validation_matches_row_by_row(chunks: list[list[tuple]]) -> None:  # type: ignore[type-arg]
    """Whatever a chunk holds, check_rows gives the oracle's valid pairs and rejections."""
    validator, line, all_rows = Validator(), 1, []
    got_valid, got_rejected = [], []
    for cells in chunks:
        rows: list[Row] = []
        for token, email, reason in cells:
            line += 1
            rows.append((line, token, email, reason))
        all_rows += rows
        chunk: Sequence[Row] = rows
        if rows and all(r[1] is not None and r[2] is not None and r[3] is None for r in rows):
            # the same rows as a reader's clean block
            chunk = Columns(rows[0][0], [r[1] for r in rows], [r[2] for r in rows])  # type: ignore[misc]
            if [r[0] for r in rows] != list(range(rows[0][0], rows[0][0] + len(rows))):
                chunk = rows
        valid, rejected, skipped = validator.check_rows(chunk)
        assert skipped == 0
        got_valid += valid
        got_rejected += rejected
    want_valid, want_rejected = oracle(all_rows)
    assert got_valid == want_valid
    assert got_rejected == want_rejected


CSV_LINES = st.lists(
    st.text(alphabet='tu,;@. "\r\t\xe9x', max_size=12) | st.sampled_from(["", "t,a@b.co"]),
    min_size=1, max_size=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(header=st.sampled_from(["token,email", "email,token,name", "token;email"]),
       lines=CSV_LINES)  # fmt: skip
def test_csv_clean_blocks_match_the_line_parser(header: str, lines: list[str]) -> None:
    """A block taken column-wise yields exactly the rows the line-by-line parser would."""
    # A last row: a header alone is refused as an empty input.
    body = (header + "\n" + "\n".join(lines) + "\nt,a@example.com\n").encode()
    source = open_source("-", "csv", stdin=io.BytesIO(body))
    assert isinstance(source, CsvSource)
    raw = [line.encode() for line in lines]
    raw = [r[:-1] if r.endswith(b"\r") else r for r in raw]
    fast = source._clean_block(2, list(raw))
    if fast is not None:
        assert list(fast) == source._parse_lines(2, list(raw))


def test_columns_behave_as_a_sequence_of_rows() -> None:
    """Columns index, slice and iterate like the list of row tuples they stand for."""
    columns = Columns(5, ["a", "b", "c"], ["x@y.io", "y@y.io", "z@y.io"])
    rows = list(columns)
    assert rows == [(5, "a", "x@y.io", None), (6, "b", "y@y.io", None), (7, "c", "z@y.io", None)]
    assert columns[-1] == rows[-1]
    assert columns[1:] == rows[1:]
    assert len(columns) == 3
    with pytest.raises(IndexError):
        columns[3]


@pytest.mark.usefixtures("small_index")
async def test_a_run_rejects_repeats_long_after_the_index_has_merged(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats 1,500 rows apart, across many chunks and merges: rejected, each pair sent once."""
    monkeypatch.setattr(worker.sources.lines, "BLOCK_BYTES", 2048)  # ~60 rows per chunk
    pairs = [(TOKEN_A if i % 2 else TOKEN_B, f"user{i}@example.com") for i in range(1_500)]
    lines = ["token,email", *(f"{t},{e}" for t, e in pairs)]
    lines.append(f"{TOKEN_A},not-an-address")  # line 1502: a bad row between the two halves
    lines += [f"{t},{e.upper()}" for t, e in pairs]  # lines 1503..3002: every pair again
    config = make_config(batch_size=100)
    result = await run(config, csv_source("\n".join(lines) + "\n"))

    assert result.exit_code == 1
    records = read_report(config.report_path)
    rejected = [(r["line"], r["reason"]) for r in by_kind(records, "rejected")]
    assert rejected == [(1502, "invalid_email"), *((n, "duplicate") for n in range(1503, 3003))]
    sent = Counter((b["token"], e) for b in by_kind(records, "batch") for e in b["emails"])
    assert sent == Counter(pairs)
    assert sent == emulator.invited
