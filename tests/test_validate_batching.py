"""Validation rules and per-token batching."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.batching import Batcher
from worker.logs import timestamp
from worker.record.report import iso
from worker.validate import Validator, check_email, check_token


@pytest.mark.parametrize(
    "token",
    ["../etc", "a/b", "a?b", "a#b", "a%2Fb", "a b", "tök", "", "a" * 129, "a\x00b", "a.b"],
)
def test_tokens_that_could_shape_a_url_are_refused(token: str) -> None:
    """Only letters, digits, '-' and '_' may ever reach a URL path."""
    assert not check_token(token)


def test_plain_share_tokens_pass() -> None:
    """Datadog-style tokens are accepted."""
    assert check_token("fasjyydbcgwwc2uc-3dde636009128a6f937e880f67a0ad04")
    assert check_token("abc_DEF-123")


@pytest.mark.parametrize(
    "email",
    ["a@example.com", "first.last+tag@sub.example.co.uk", "o'brien@example.ie", "x@a-b.io"],
)
def test_addresses_that_look_valid(email: str) -> None:
    """Ordinary addresses pass."""
    assert check_email(email)


@pytest.mark.parametrize(
    "email",
    [
        "plain",
        "@example.com",
        "a@",
        "a@b",
        "a b@example.com",
        "a@@example.com",
        "a@example..com",
        ".a@example.com",
        "a@example.com,b@example.com",
        "a@-x.com",
        "<a@example.com>",
        "a@example.c",
        "a@example.123",
        "x" * 250 + "@example.com",
    ],
)
def test_addresses_that_do_not(email: str) -> None:
    """Malformed or oversize addresses are refused."""
    assert not check_email(email)


def test_validator_trims_and_detects_case_insensitive_duplicates() -> None:
    """Values are trimmed; a repeated pair differing only by case is a duplicate."""
    v = Validator()
    assert v.check("  tok ", " A@Example.com ") == ("tok", "A@Example.com", None)
    assert v.check("tok", "a@example.COM")[2] == "duplicate"
    assert v.check("TOK", "a@example.com")[2] == "duplicate"
    assert v.check("other", "a@example.com")[2] is None


def test_validator_reason_order() -> None:
    """Missing values are reported before malformed ones."""
    v = Validator()
    assert v.check(None, "a@example.com")[2] == "missing_token"
    assert v.check("  ", "a@example.com")[2] == "missing_token"
    assert v.check("t", "")[2] == "missing_email"
    assert v.check("t/x", "a@example.com")[2] == "invalid_token"
    assert v.check("t", "nope")[2] == "invalid_email"


def test_batches_fill_per_token_and_never_mix() -> None:
    """A batch is emitted when a token's buffer reaches the batch size."""
    b = Batcher(batch_size=2, max_buffered=100)
    assert b.add("t1", "a") is None
    assert b.add("t2", "b") is None
    full = b.add("t1", "c")
    assert full is not None
    assert (full.token, full.emails) == ("t1", ["a", "c"])
    assert [(x.token, x.emails) for x in b.drain()] == [("t2", ["b"])]
    assert b.buffered == 0


def test_the_fullest_buffer_is_flushed_past_the_bound() -> None:
    """With many tokens, no more than max_buffered rows are ever held."""
    b = Batcher(batch_size=10, max_buffered=10)
    out = []
    for i in range(5):
        out.append(b.add("big", f"b{i}"))
    for i in range(6):
        out.append(b.add(f"t{i}", f"x{i}"))
    early = [x for x in out if x is not None]
    assert len(early) == 1
    assert early[0].token == "big"
    assert len(early[0].emails) == 5
    assert b.buffered <= 10


@given(
    pairs=st.lists(st.tuples(st.sampled_from("abcdefghijkl"), st.integers(0, 10**6)), max_size=600),
    batch_size=st.integers(1, 12),
    extra=st.integers(0, 30),
)
def test_every_pair_leaves_exactly_once_in_bounded_batches(
    pairs: list[tuple[str, int]], batch_size: int, extra: int
) -> None:
    """Property: each pair leaves once, in its token's buffer as it stood: a full one at
    once, a partial one only past the bound and only if no buffer is fuller; the rest
    at the end, the oldest buffer first."""
    bound = batch_size + extra
    b = Batcher(batch_size, bound)
    held: dict[str, list[str]] = {}  # the buffers as they must be
    for token, n in pairs:
        held.setdefault(token, []).append(str(n))
        batch = b.add(token, str(n))
        if batch is not None:
            assert batch.emails == held[batch.token]
            if len(batch.emails) == batch_size:
                assert batch.token == token
            else:
                assert sum(map(len, held.values())) > bound
                assert len(batch.emails) == max(map(len, held.values()))
            del held[batch.token]
        assert b.buffered == sum(map(len, held.values())) <= bound
    assert [(x.token, x.emails) for x in b.drain()] == list(held.items())
    assert b.buffered == 0


def calls_per_eviction(tokens: int) -> int:
    """Function calls (Python and C) made by 200 evictions, with ``tokens`` buffers of 2
    rows held at the bound: each time a third row makes one the fullest, and two rows for
    a new token bring the held rows back to the bound."""
    b = Batcher(batch_size=100, max_buffered=2 * tokens)
    for _ in range(2):
        b.add_many([(f"t{i}", "x@example.com") for i in range(tokens)])

    def evict(i: int) -> list[str]:
        out = b.add_many([(f"t{i}", "x@example.com")])
        out += b.add_many([(f"new{i}", "x@example.com"), (f"new{i}", "y@example.com")])
        return [x.token for x in out]

    assert evict(0) == ["t0"]  # the first eviction may set things up
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        evicted = [evict(i) for i in range(1, 201)]
    finally:
        sys.setprofile(None)
    assert evicted == [[f"t{i}"] for i in range(1, 201)]
    return calls


def test_evicting_past_the_bound_does_not_scan_every_token() -> None:
    """Past the bound, the work per row is the same with 300 tokens as with 20,000: the
    fullest buffer is found without looking at every buffer."""
    few, many = calls_per_eviction(300), calls_per_eviction(20_000)
    assert many <= few + 20, (few, many)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_report_timestamps_match_datetime(ts: float) -> None:
    """Property: the fast ISO formatter agrees with datetime to the millisecond digit."""
    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    assert iso(ts) == expected


def test_log_timestamps_are_utc_iso_with_microseconds() -> None:
    """Each event's timestamp reads back as UTC within a moment of now, in structlog's form."""
    before = datetime.now(UTC)
    stamped = timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamped)
    assert before - timedelta(microseconds=2) <= datetime.fromisoformat(stamped) <= after
