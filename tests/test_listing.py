"""Listings read to their end, whatever page size the service honors, into compact state."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.conftest import (
    API_KEY,
    APP_KEY,
    TOKEN_A,
    TOKEN_B,
    Proc,
    by_kind,
    csv_source,
    emulator_invited,
    find_capture,
    read_report,
    rows_csv,
)
from worker.clock import FakeClock, SystemClock
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard
from worker.emulator.invitations import Invitations
from worker.outcome import Outcome
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.record.journal import Journal, journal_path
from worker.run import run
from worker.send import client_for, pacer_for, preflight_for, reconcile, reconciler_for
from worker.send.compact import MERGE_EVERY, ListingBuilder, iso_epoch, keys_of
from worker.send.listed import Listed, read_dashboard, read_listing
from worker.send.reconcile import CACHED_LISTINGS
from worker.validate import address_key

PEOPLE = [f"p{i}@example.com" for i in range(260)]


def list_gets(emulator: Emulator) -> list[str]:
    """The paths of the invitation listings the service answered."""
    return [r.path for r in emulator.requests
            if r.method == "GET" and r.path.endswith("/invitation")]  # fmt: skip


def test_a_service_capping_pages_at_50_gets_nobody_invited_twice(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """The daily job against an emulator process that serves at most 50 invitations a page
    (total_count says 260): day 2 sends nothing and every address is skipped."""
    seed = tmp_path / "dashboards.json"
    seed.write_text(json.dumps([{"token": TOKEN_A, "invitees": [{"email": e} for e in PEOPLE]}]))
    url = start_emulator("--dashboards", str(seed), "--max-page-size", "50")
    source = tmp_path / "invites.csv"
    source.write_text(rows_csv([(TOKEN_A, e) for e in PEOPLE]))
    report = tmp_path / "report.jsonl"
    for _day in range(2):
        spawn("run", str(source), "--report", str(report), "--overwrite", "--api-url", url,
              "--log-format", "json").expect(0, timeout=60)  # fmt: skip
    assert emulator_invited(url) == {(TOKEN_A, e): 1 for e in PEOPLE}
    records = read_report(report)
    summary = records[-1]
    assert summary["emails_sent"] == 0
    assert summary["emails_skipped"] == len(PEOPLE)
    assert summary["skipped_by_reason"] == {"already_invited": len(PEOPLE)}
    assert summary["requests_by_kind"]["invite"] == 0
    # 260 at 50 a page: 6 pages, the first asked at 100 and served at 50.
    assert summary["list_pages"] == 6
    skipped = sorted(e for r in by_kind(records, "skipped") for e in r["emails"])
    assert skipped == sorted(PEOPLE)


@pytest.mark.parametrize(("asked", "cap"), [(100, 30), (70, 50), (7, 100), (100, 1)])
async def test_every_entry_is_read_once_when_the_page_size_changes(
    emulator: Emulator, make_config: Callable[..., Config], asked: int, cap: int
) -> None:
    """Asked for pages of one size and served another: every listed invitation is read,
    none twice, and the pages asked for cover the listing without a gap."""
    emulator.max_page_size = cap
    board = emulator.add_dashboard(TOKEN_A)
    board.invitations.extend((f"x{i}@example.com", 1_000.0 + i) for i in range(237))
    config = make_config(list_page_size=asked)
    async with client_for(config) as client:
        clock = SystemClock()
        reconciler = reconciler_for(config, client, pacer_for(config, clock), clock,
                                    random.Random(1))  # fmt: skip
        listing = await reconciler.listing(TOKEN_A, 0.0)
    assert listing.read == 237
    assert len(listing.keys) == 237
    assert sorted(listing.keys.tolist()) == sorted(keys_of(e for e, _ in board.invitations))
    served = min(asked, cap)
    assert listing.pages == len(list_gets(emulator)) == math.ceil(237 / served)
    # Each page asked starts where the entries read so far end.
    assert all(size * number <= 237 for size, number in emulator.pages_asked)


async def test_without_total_count_a_listing_ends_at_an_empty_page(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """No meta.page.total_count and pages capped at 40: the worker reads on until an empty
    page, so the already invited are all skipped."""
    emulator.list_total = False
    emulator.max_page_size = 40
    emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:150])
    pairs = [(TOKEN_A, e) for e in PEOPLE[:150]]
    first = await run(make_config(), csv_source(rows_csv(pairs)))
    assert first.exit_code == 0
    with capture_logs() as logs:
        second = await run(make_config(report_path=tmp_path / "day2.jsonl"),
                           csv_source(rows_csv(pairs)))  # fmt: skip
    assert second.summary.emails_skipped == 150
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for e in PEOPLE[:150]})
    # 40, 40, 40, 30, then the empty page that ends it.
    assert second.summary.list_pages == 5
    [listed] = find_capture(logs, "reconcile.listed")
    assert (listed["invitations"], listed["pages"]) == (150, 5)


async def test_a_listing_answered_404_is_logged_as_no_dashboard_not_as_listed(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A token whose listing is a 404 logs reconcile.not_found, not an empty listing."""
    with capture_logs() as logs:
        result = await run(make_config(), csv_source(rows_csv([("gone-dashboard", PEOPLE[0])])))
    assert result.summary.refused_by_code == {"token_not_found": 1}
    [missing] = find_capture(logs, "reconcile.not_found")
    assert (missing["token"], missing["pages"]) == ("gone-dashboard", 1)
    assert find_capture(logs, "reconcile.listed") == []


async def test_list_page_size_is_what_the_worker_asks_for(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--list-page-size N asks for pages of N: 150 invitations at 25 a page are 6 pages."""
    board = emulator.add_dashboard(TOKEN_B, invitees=PEOPLE[:151])
    board.invitations.extend((e, 1_000.0) for e in PEOPLE[:150])
    result = await run(make_config(list_page_size=25),
                       csv_source(rows_csv([(TOKEN_B, e) for e in PEOPLE[:151]])))  # fmt: skip
    assert result.summary.list_pages == 6
    assert emulator.pages_asked == [(25, n) for n in range(6)]
    assert result.summary.emails_sent == 1


def test_a_listing_keeps_the_newest_time_and_session_of_each_address() -> None:
    """Folded page by page: one entry per address (any case), the newest creation time, the
    latest session end, and full invitations only for the addresses asked about."""
    builder = ListingBuilder(0.0, frozenset({address_key("b@x.io")}))
    iso = "2026-01-01T00:00:{:02d}+00:00".format
    builder.add([Listed("a@x.io", iso(1)), Listed("B@x.io", iso(5), "exp-5")])
    builder.add([Listed("b@x.io", iso(3), "exp-3"), Listed("A@X.IO", "not a time"),
                 Listed("a@x.io", iso(2), has_session=True, session_expiry=iso(9))])  # fmt: skip
    listing = builder.done()
    assert len(listing.keys) == 2
    found, created = listing.newest(keys_of(["a@x.io", "b@x.io", "c@x.io"]))
    assert found.tolist() == [True, True, False]
    base = 1767225600.0
    assert created[:2].tolist() == [base + 2, base + 5]
    [a_at] = [i for i, k in enumerate(listing.keys.tolist()) if k == address_key("a@x.io")]
    assert listing.session_ends[a_at] == base + 9
    assert list(listing.invitations) == [address_key("b@x.io")]
    assert listing.invitations[address_key("b@x.io")][1].invitation_expiry == "exp-5"


def test_a_session_listed_after_a_merge_is_kept_with_the_earlier_entries() -> None:
    """Pages without sessions merged first, then a page with one for an address already
    merged: the address keeps its earliest-read newest time and gains the session's end;
    addresses without a session end at -inf."""
    builder = ListingBuilder(0.0)
    iso = "2026-01-01T00:00:{:02d}+00:00".format
    for n in range(MERGE_EVERY):
        builder.add([Listed(f"p{n}@x.io", iso(n % 60)), Listed("a@x.io", iso(30))])
    builder.add([Listed("A@x.io", iso(10), has_session=True, session_expiry=iso(50))])
    listing = builder.done()
    assert len(listing.keys) == MERGE_EVERY + 1
    found, created = listing.newest(keys_of(["a@x.io", "p1@x.io"]))
    assert found.tolist() == [True, True]
    base = 1767225600.0
    assert created.tolist() == [base + 30, base + 1]
    ends = dict(zip(listing.keys.tolist(), listing.session_ends.tolist(), strict=True))
    assert ends[address_key("a@x.io")] == base + 50
    assert ends[address_key("p1@x.io")] == -math.inf


async def test_a_long_lived_worker_holds_the_checks_of_recent_tokens_only(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Queue mode (a check good for a minute): checks past their minute are dropped as new
    tokens come, and at most CACHED_LISTINGS listings are kept, however many tokens pass."""
    clock = FakeClock()
    config = make_config(preflight_ttl=60.0)
    async with client_for(config) as client:
        pacer = pacer_for(config, clock)
        reconciler = reconciler_for(config, client, pacer, clock, random.Random(1))
        preflight = preflight_for(config, client, pacer, reconciler, clock)
        for n in range(CACHED_LISTINGS + 8):
            token = f"tok{n:03d}-aaaa"
            emulator.add_dashboard(token, invitees=["a@example.com"])
            screened = await preflight.screen(token, ["a@example.com"])
            assert screened.send == ["a@example.com"]
        assert preflight.held == CACHED_LISTINGS + 8
        assert reconciler.held == CACHED_LISTINGS
        clock.advance(61)
        await preflight.screen("late-token-aaaa", ["a@example.com"])
        assert preflight.held == 1


async def test_listings_kept_for_reuse_hold_a_bounded_number_of_addresses(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listings are kept for reuse up to CACHED_ENTRIES addresses in all (here 250), not
    32 of whatever size: tokens of 100 invitations each leave two kept, the latest one
    always (even alone past the bound)."""
    monkeypatch.setattr(reconcile, "CACHED_ENTRIES", 250)
    config = make_config()
    async with client_for(config) as client:
        clock = SystemClock()
        reconciler = reconciler_for(config, client, pacer_for(config, clock), clock,
                                    random.Random(1))  # fmt: skip
        boards = {}
        for n in range(5):
            board = boards[n] = emulator.add_dashboard(f"big{n:03d}-aaaa", invitees=None)
            board.invitations.extend((f"u{i}@example.com", 1.0) for i in range(100))
            await reconciler.listing(f"big{n:03d}-aaaa", 0.0)
            assert reconciler.held == min(n + 1, 2)
        board = emulator.add_dashboard("huge-aaaa", invitees=None)
        board.invitations.extend((f"u{i}@example.com", 1.0) for i in range(300))
        assert len((await reconciler.listing("huge-aaaa", 0.0)).keys) == 300
        assert reconciler.held == 1
        # The least recently used token listed again, grown past the bound meanwhile: it
        # becomes the latest (kept), the others go.
        await reconciler.listing("big003-aaaa", 0.0)
        await reconciler.listing("big004-aaaa", 0.0)
        boards[3].invitations.extend((f"v{i}@example.com", 1.0) for i in range(200))
        again = await reconciler.listing("big003-aaaa", clock.time() + 1)
        assert (len(again.keys), reconciler.held) == (300, 1)


def test_a_listing_costs_24_bytes_per_address_listed() -> None:
    """100,000 invitations over 50,000 addresses, folded a page of 100 at a time: three
    arrays of 50,000 (8 bytes each), no per-invitation object kept."""
    builder = ListingBuilder(0.0)
    at = "2026-01-01T00:00:00+00:00"
    for start in range(0, 100_000, 100):
        builder.add([Listed(f"u{i % 50_000}@example.com", at) for i in range(start, start + 100)])
    listing = builder.done()
    assert listing.read == 100_000
    held = listing.keys.nbytes + listing.created.nbytes + listing.session_ends.nbytes
    assert held == 24 * 50_000
    assert listing.invitations == {}


async def test_a_resume_settles_every_intent_of_a_token_from_one_listing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Five intents of one token left open by a crash (three created, two not): one
    listing of its 250 invitations settles all five; only the two never created are sent."""
    config = make_config(concurrency=1)
    journal = Journal(journal_path(config.report_path), durable=False)
    at = emulator._clock() - 10  # long enough ago that no request can be in progress
    board = emulator.add_dashboard(TOKEN_A)
    board.invitations.extend((f"old{i}@example.com", at - 86400) for i in range(245))
    batches = [[f"b{n}x{i}@example.com" for i in range(2)] for n in range(5)]
    for n, emails in enumerate(batches):
        await journal.intent(TOKEN_A, emails, at)
        if n < 3:  # the POST that succeeded, then the crash
            board.invitations.extend((e, at + 0.5) for e in emails)
            for e in emails:
                emulator.invited[(TOKEN_A, e)] += 1
    journal.close()
    config.report_path.write_text("")
    pairs = [(TOKEN_A, e) for emails in batches for e in emails]
    result = await run(make_config(concurrency=1, resume=True, resend=True),
                       csv_source(rows_csv(pairs)))  # fmt: skip
    assert result.exit_code == 0
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for _, e in pairs})
    assert [r.emails for r in emulator.requests if r.method == "POST"] == [4]
    assert result.summary.list_pages == 3  # 251 invitations at 100 a page, listed once


@pytest.mark.parametrize(
    ("body", "emails", "total"),
    [
        (
            b'{"data": [{"attributes": {"email": "a@x.io", "created_at": 5}}], '
            b'"meta": {"page": {"total_count": "7"}}}',
            ["a@x.io"],
            None,
        ),
        (
            b'{"data": [{"attributes": {"email": "a@x.io"}}, {"attributes": {}}, 3], '
            b'"meta": {"page": {"total_count": 2}}}',
            ["a@x.io"],
            2,
        ),
        (b'{"data": [], "meta": {"page": {"total_count": true}}}', [], None),
        (b"null", [], None),
    ],
)
def test_a_listing_page_of_any_shape_is_read_for_what_it_holds(
    body: bytes, emails: list[str], total: int | None
) -> None:
    """A page whose fields have the wrong types is read field by field: what is malformed
    is left out, a total that is not a number is no total, nothing raises."""
    page = read_listing(body)
    assert page is not None
    assert [item.email for item in page[0]] == emails
    assert page[1] == total


def test_a_dashboard_of_any_shape_is_read_for_what_it_holds() -> None:
    """Odd fields of a shared dashboard are unknown; malformed invitees are left out."""
    board = read_dashboard(b'{"share_type": 7, "status": "paused", "share_list": ["s@x.io", 4],'
                           b' "invitees": [{"email": "a@x.io"}, {"nope": 1},'
                           b' {"email": "b@x.io", "access_expiration": 9}]}')  # fmt: skip
    assert (board.share_type, board.status) == (None, "paused")
    assert [(i.email, i.access_expiration) for i in board.invitees or []] == [
        ("a@x.io", None), ("b@x.io", None)
    ]  # fmt: skip
    assert board.share_list == ["s@x.io"]
    assert read_listing(b"<html>502</html>") is None


async def test_a_service_ignoring_page_number_fails_the_token_and_sends_nothing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Every page_number answered with the first page (total_count 250): the listing is
    not taken as read — the token's rows fail, unsent, for --resume — and nobody already
    invited is emailed again."""
    emulator.ignore_page_number = True
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:250])
    now = emulator._clock()
    board.invitations.extend((e, now - 3600 + i) for i, e in enumerate(PEOPLE[:250]))
    result = await run(make_config(), csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:250]])))
    assert result.exit_code == 1
    assert not [r for r in emulator.requests if r.method == "POST"]
    assert result.summary.emails_failed == 250
    failed = by_kind(read_report(make_config().report_path), "batch")
    assert {b["error"]["code"] for b in failed} == {"listing_moved"}


async def test_429s_and_retries_of_the_checks_reads_are_in_the_summary(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A day 2 that only reads, against a limit it exceeds: the listings' 429 answers are
    counted in rate_limited, as the POSTs' are, and nobody is invited twice."""
    from worker.emulator.model import RateWindow

    people = [f"r{i}@example.com" for i in range(4)]
    tokens = [f"tok-{i:02d}-zzzzzzzzzzzz" for i in range(6)]
    pairs = [(t, e) for t in tokens for e in people]
    first = await run(make_config(batch_size=10), csv_source(rows_csv(pairs)))
    assert first.exit_code == 0
    emulator.window = RateWindow(3, 0.3, "none", time.time)
    config = make_config(batch_size=10, report_path=tmp_path / "2.jsonl")
    second = await run(config, csv_source(rows_csv(pairs)))
    assert second.exit_code == 0
    assert second.summary.emails_skipped == len(pairs)
    assert second.summary.rate_limited >= 1
    assert second.summary.rate_limited == sum(1 for r in emulator.requests if r.status == 429)
    assert all(n == 1 for n in emulator.invited.values())


def served_as(
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Dashboard, int, int], tuple[int, web.StreamResponse | None]],
) -> Emulator:
    """An emulator (to start) whose listing calls ``change(board, page_number,
    times_served)`` first: it may change the board (as other clients do meanwhile), and
    returns the page number to serve instead, or an answer to give in place of the page."""
    original = Invitations._list
    served: Counter[int] = Counter()

    async def listing(
        self: Invitations, request: web.Request, log: Any, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        number = int(request.query["page_number"])
        served[number] += 1
        instead, answer = change(board, number, served[number])
        if answer is not None:
            logged: web.StreamResponse = log(answer)
            return logged
        query = {**request.query, "page_number": str(instead)}
        return await original(self, request.clone(rel_url=request.rel_url.with_query(query)),
                              log, headers, board)  # fmt: skip

    monkeypatch.setattr(Invitations, "_list", listing)  # before the routes are bound
    return Emulator(api_key=API_KEY, app_key=APP_KEY)


async def sends_nobody_again(
    emulator: Emulator, make_config: Callable[..., Config], people: list[str]
) -> list[MutableMapping[str, Any]]:
    """Run ``people`` (all invited already) for TOKEN_A: nobody is sent, everyone skipped,
    each invited once in all. The run's logs."""
    config = make_config(api_url=emulator.url)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in people])))
    assert result.exit_code == 0, result.summary
    assert (result.summary.emails_sent, result.summary.emails_skipped) == (0, len(people))
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for e in people})
    return logs


def invited_already(emulator: Emulator, people: list[str]) -> None:
    board = emulator.add_dashboard(TOKEN_A, invitees=people)
    now = emulator._clock()
    board.invitations.extend((e, now - 3600) for e in people)
    for e in people:
        emulator.invited[(TOKEN_A, e)] += 1


async def test_invitations_revoked_while_a_listing_is_read_make_it_read_again(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten invitations revoked right after the first page is served move ten others back
    onto that page, unseen: total_count went down, so the listing is read again from its
    start, and none of the 190 still invited is emailed again."""
    people = PEOPLE[:200]

    def revoke_after_first_page(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 1 and times == 1:  # someone revoked p0..p9 after page 0 was read
            board.invitations = [(e, t) for e, t in board.invitations if e not in people[:10]]
        return number, None

    async with served_as(monkeypatch, revoke_after_first_page) as emulator:
        invited_already(emulator, people)
        config = make_config(api_url=emulator.url)
        with capture_logs() as logs:
            result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in people[10:]])))
    assert result.exit_code == 0, result.summary
    assert (result.summary.emails_sent, result.summary.emails_skipped) == (0, 190)
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for e in people})
    moved = find_capture(logs, "reconcile.list_moved")[0]
    assert "total_count went down from 200 to 190" in moved["why"]


@pytest.mark.parametrize(
    ("odd", "said"),
    [("empty", "page 1 was empty after 100 of 300"), ("repeat", "page 2 repeated an earlier")],
)
async def test_an_empty_or_repeated_page_before_the_total_makes_the_listing_read_again(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    odd: str,
    said: str,
) -> None:
    """Once, an empty page while total_count says 300 (or page 2 answered with page 0):
    not an end, the listing is read again, and nobody of the 300 invited is sent."""
    people = PEOPLE[:250] + [f"q{i}@example.com" for i in range(50)]

    def once_odd(board: Dashboard, number: int, times: int) -> tuple[int, Any]:
        if odd == "empty" and number == 1 and times == 1:
            total = {"page": {"total_count": len(board.invitations)}}
            return number, web.json_response({"data": [], "meta": total})
        if odd == "repeat" and number == 2 and times == 1:
            return 0, None
        return number, None

    async with served_as(monkeypatch, once_odd) as emulator:
        invited_already(emulator, people)
        logs = await sends_nobody_again(emulator, make_config, people)
    assert said in find_capture(logs, "reconcile.list_moved")[0]["why"]


async def test_a_listing_that_moves_every_time_it_is_read_fails_its_token_unsent(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invitations revoked during every reading: after three readings the token's rows fail
    (listing_moved, saying the list kept changing), and nothing is POSTed."""
    people = PEOPLE[:200]

    def revoke_one_each_time(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 1:
            board.invitations = board.invitations[1:]
        return number, None

    async with served_as(monkeypatch, revoke_one_each_time) as emulator:
        invited_already(emulator, people)
        config = make_config(api_url=emulator.url)
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in people[10:]])))
    assert result.exit_code == 1
    assert result.summary.emails_failed == 190
    assert not [r for r in emulator.requests if r.method == "POST"]
    batches = by_kind(read_report(config.report_path), "batch")
    assert {b["error"]["code"] for b in batches} == {"listing_moved"}
    assert "kept changing while it was read" in batches[0]["error"]["message"]


async def test_a_queue_worker_checks_a_moving_listing_again_rather_than_dead_lettering(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A listing that moves during its first three readings only: a queue worker leaves
    the token's messages pending (listing_moved), claims them again after --claim-idle
    and sends each once; nothing is dead-lettered."""
    people = PEOPLE[:200]
    fresh = [f"new{i}@example.com" for i in range(5)]

    def revoke_during_three_readings(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 1 and times <= 3:
            board.invitations = board.invitations[1:]
        return number, None

    async with served_as(monkeypatch, revoke_during_three_readings) as emulator:
        board = emulator.add_dashboard(TOKEN_A, invitees=people + fresh)
        board.invitations.extend((e, emulator._clock() - 3600) for e in people)
        emulator.invited.update((TOKEN_A, e) for e in people)
        for email in fresh:
            await redis.xadd(stream_name, {"token": TOKEN_A, "email": email})
        config = make_config(api_url=emulator.url, linger=0.05)
        options = StreamOptions(url=redis_server, stream=stream_name, until_empty=True,
                                claim_idle=0.5)  # fmt: skip
        result = await asyncio.wait_for(run_stream(config, options), 30)
    assert await redis.xlen(f"{stream_name}:dead") == 0
    assert result.summary.emails_sent == 5
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for e in people + fresh})
    failed = by_kind(read_report(config.report_path), "batch")
    assert {b["error"]["code"] for b in failed if b["status"] == "failed"} == {"listing_moved"}


async def test_pages_read_before_a_listing_fails_are_counted(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that fails part-way (its second page refused for good, a 400) still
    counts the page it read in the summary's list_pages: what was read is said."""

    def refuse_page_one(board: Dashboard, number: int, times: int) -> tuple[int, Any]:
        if number == 1:
            return number, web.json_response({"errors": ["bad page"]}, status=400)
        return number, None

    async with served_as(monkeypatch, refuse_page_one) as emulator:
        invited_already(emulator, PEOPLE[:200])
        config = make_config(api_url=emulator.url)
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[200:210]])))
    assert result.summary.emails_sent == 0
    assert result.summary.list_pages == 1


@pytest.mark.parametrize("with_total", [False, True])
async def test_pages_cut_shorter_each_time_never_end_a_listing_early(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, with_total: bool
) -> None:
    """A service that serves 60, then 45, then 12 a page (page_number times the size
    asked): a page holding only entries already read is a smaller size, not the end, so
    nobody of the 300 invited is emailed again, with or without total_count."""
    people = PEOPLE[:250] + [f"q{i}@example.com" for i in range(50)]
    caps = iter([60, 45])

    async def listing(
        self: Invitations, request: web.Request, log: Any, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        asked, number = int(request.query["page_size"]), int(request.query["page_number"])
        start = number * asked
        page = board.invitations[start : start + min(asked, next(caps, 12))]
        body: dict[str, Any] = {"data": [board.invitation(e, t, 0.0) for e, t in page]}
        if with_total:
            body["meta"] = {"page": {"total_count": len(board.invitations)}}
        answer: web.StreamResponse = log(web.json_response(body, headers=headers))
        return answer

    monkeypatch.setattr(Invitations, "_list", listing)
    async with Emulator(api_key=API_KEY, app_key=APP_KEY) as emulator:
        invited_already(emulator, people)
        logs = await sends_nobody_again(emulator, make_config, people)
    [listed] = find_capture(logs, "reconcile.listed")
    assert (listed["invitations"], listed["page_size"]) == (300, 12)
    assert find_capture(logs, "reconcile.list_moved") == []


def test_a_time_without_an_offset_is_read_as_utc_in_any_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listed time with no UTC offset is UTC, as the API's are, whatever the machine's
    zone: it is compared with when requests were sent."""
    monkeypatch.setenv("TZ", "XXX-9")  # nine hours ahead of UTC, no zone files needed
    time.tzset()
    try:
        assert iso_epoch("2024-01-01T00:00:00") == 1704067200.0
        assert iso_epoch("2024-01-01T09:00:00+09:00") == 1704067200.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_listing_folds_to_what_each_address_last_said(seed: int) -> None:
    """Pages past many merges (sizes 0-7, repeats, any case, unreadable times, sessions):
    each address keeps its newest readable time and its latest session end, as a plain
    reading of every entry says."""
    rng = random.Random(seed)
    base = 1767225600
    builder = ListingBuilder(0.0)
    newest: dict[int, float] = {}
    ends: dict[int, float] = {}
    for _ in range(MERGE_EVERY * 9 + 5):
        page = []
        for _ in range(rng.randrange(8)):
            email = f"u{rng.randrange(400)}@x.io"
            email = email.upper() if rng.random() < 0.2 else email
            at = rng.randrange(60)
            stamp = "no time" if rng.random() < 0.1 else f"2026-01-01T00:00:{at:02d}+00:00"
            session = rng.random() < 0.05
            page.append(Listed(email, stamp, has_session=session,
                               session_expiry=f"2026-01-01T00:01:{at:02d}+00:00"))  # fmt: skip
            key = address_key(email)
            when = math.nan if stamp == "no time" else float(base + at)
            newest[key] = max(newest.get(key, math.nan), when, key=lambda t: -math.inf if
                              math.isnan(t) else t)  # fmt: skip
            ends[key] = max(ends.get(key, -math.inf), base + 60 + at if session else -math.inf)
        builder.add(page)
    listing = builder.done()
    assert sorted(listing.keys.tolist()) == listing.keys.tolist() == sorted(newest)
    got = dict(zip(listing.keys.tolist(), listing.created.tolist(), strict=True))
    unread = -1.0  # NaN never equals itself
    assert {k: unread if math.isnan(t) else t for k, t in got.items()} == {
        k: unread if math.isnan(t) else t for k, t in newest.items()
    }
    assert dict(zip(listing.keys.tolist(), listing.session_ends.tolist(), strict=True)) == ends


async def five_batches_at_once(config: Config, tmp_path: Path) -> list[list[Outcome]]:
    """Five one-address batches of TOKEN_A sent at once by one sender: their outcomes."""
    from worker.batching import Batch
    from worker.send.sender import Sender

    clock = SystemClock()
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), Journal(tmp_path / "j",
                        durable=False), config, clock)  # fmt: skip
        batches = [Batch(TOKEN_A, [f"new{i}@example.com"]) for i in range(5)]
        return await asyncio.wait_for(asyncio.gather(*map(sender.send, batches)), 30)


async def test_batches_waiting_on_a_moving_listing_share_its_failure_in_queue_mode(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Queue mode (a check ttl): five batches of one token arrive together while its
    listing moves on every reading. The first reads it three times and fails
    (listing_moved, the messages kept pending); the four that waited for that reading
    share its failure instead of reading three times each (15 readings before). Nothing
    is POSTed."""
    readings = Counter[str]()

    def revoke_one_each_time(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 0:
            readings["started"] += 1
        if number == 1:
            board.invitations = board.invitations[1:]
        return number, None

    async with served_as(monkeypatch, revoke_one_each_time) as emulator:
        invited_already(emulator, PEOPLE[:200])
        config = make_config(api_url=emulator.url, preflight_ttl=60.0)
        outcomes = await five_batches_at_once(config, tmp_path)
    codes = [o.error.code if o.error else None for out in outcomes for o in out]
    assert codes == ["listing_moved"] * 5
    assert readings["started"] == 3
    assert not [r for r in emulator.requests if r.method == "POST"]


async def test_batches_waiting_on_a_failed_reading_read_again_when_it_would_dead_letter(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Queue mode: a reading that failed for a reason that would dead-letter its messages
    (503s past every retry) is not shared: the batches that waited for it read again,
    and are sent."""

    def unavailable_twice(board: Dashboard, number: int, times: int) -> tuple[int, Any]:
        if number == 0 and times <= 2:
            return number, web.json_response({"errors": ["unavailable"]}, status=503)
        return number, None

    async with served_as(monkeypatch, unavailable_twice) as emulator:
        config = make_config(api_url=emulator.url, preflight_ttl=60.0, max_attempts=2)
        outcomes = await five_batches_at_once(config, tmp_path)
    statuses = [str(o.status) for out in outcomes for o in out]
    assert statuses.count("failed") == 1
    assert statuses.count("sent") == 4
