"""A dashboard's write (``--add-invitees``, ``--prune``) is made once for the reads it came
from: refused, cut or unanswered, the dashboard is read again, what an unanswered write
did is taken from what it shows, and nothing is lost, counted twice or left unrecorded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import TOKEN_A, by_kind, csv_source, read_report, rows_csv
from tests.test_prune import PEOPLE, board_of
from worker.clock import FakeClock
from worker.config import Config, PruneMax
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard, Invitee
from worker.emulator.responses import error, hang_up
from worker.emulator.server import CUT, DROP, WriteHook
from worker.run import run
from worker.run.counts import FileRead
from worker.run.summary import RunResult

NEW = "new@example.com"


Ran = tuple[RunResult[FileRead], Dashboard]


async def add_new(emulator: Emulator, config: Config, *hooks: WriteHook,
                  stop: asyncio.Event | None = None) -> Ran:  # fmt: skip
    """A dashboard allowing a@example.com; a run that adds and invites NEW, its PUTs
    met by ``hooks`` in turn."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.before_write[TOKEN_A] = list(hooks)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])), stop=stop)
    return result, board


async def prune_two(emulator: Emulator, config: Config, *hooks: WriteHook,
                    stop: asyncio.Event | None = None) -> Ran:  # fmt: skip
    """p0-p3 invited invitees; a --prune run over a list naming p0 and p1, its PUTs met by
    ``hooks`` in turn."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])
    emulator.before_write[TOKEN_A] = list(hooks)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])),
                       stop=stop)  # fmt: skip
    return result, board


def recorded_entries(config: Config) -> dict[str, list[str]]:
    """Per address, what the report says was removed from it."""
    records = by_kind(read_report(config.report_path), "revoked")
    return {e: r["removed"] for r in records for e in r["emails"]}


def puts(emulator: Emulator) -> int:
    return [r.method for r in emulator.requests].count("PUT")


def refused(status: int) -> WriteHook:
    return lambda _: status


def dropped(_: Dashboard) -> str:
    return DROP


def cut(_: Dashboard) -> str:
    return CUT


# Each: the PUTs' answers; the PUTs made; whether a failed try is among them (then one
# attempt, --max-attempts 1, is all a write gets). The last write is the one that shows.
ROUNDS = {
    "dropped after it was applied": ((dropped,), 1, False),
    "refused twice, then applied unanswered": ((refused(503), refused(503), dropped), 3, True),
    "cut before it was applied": ((cut,), 2, True),
    "rate limited": ((refused(429),), 2, False),  # a 429 is no failed try
}


@pytest.mark.parametrize("case", list(ROUNDS))
async def test_an_added_invitee_is_counted_once_whatever_its_writes_met(
    emulator: Emulator, make_config: Callable[..., Config], case: str
) -> None:
    """However the PUTs went — refused, cut, or applied without an answer in any round,
    the last included: NEW is added, counted once, named on its send's record, invited
    once; no body is written twice, and reading again is no retry."""
    hooks, made, _ = ROUNDS[case]
    config = make_config(add_invitees=True)
    result, board = await add_new(emulator, config, *hooks)
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {"a@example.com", NEW}
    assert puts(emulator) == made
    assert result.summary.invitees_added == 1
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    [sent] = by_kind(read_report(config.report_path), "batch")
    assert sent["invitees_added"] == [NEW]
    assert result.summary.retries == 0


@pytest.mark.parametrize("case", list(ROUNDS))
async def test_removed_entries_are_recorded_whatever_the_writes_met(
    emulator: Emulator, make_config: Callable[..., Config], case: str
) -> None:
    """However the PUTs went, p2's and p3's entries are gone and recorded with their
    revoked invitations, and nobody else's entry is touched."""
    hooks, made, _ = ROUNDS[case]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result, board = await prune_two(emulator, config, *hooks)
    assert result.exit_code == 0
    assert set(board.invitees or {}) == set(PEOPLE[:2])
    assert {e for e, _ in board.invitations} == set(PEOPLE[:2])
    assert puts(emulator) == made
    assert recorded_entries(config) == {p: ["invitation", "invitee"] for p in PEOPLE[2:4]}


@pytest.mark.parametrize("case", list(ROUNDS))
async def test_at_one_attempt_a_failed_write_is_not_made_again(
    emulator: Emulator, make_config: Callable[..., Config], case: str
) -> None:
    """--max-attempts 1: a write that failed (a 5xx, a cut) is not made again — the
    add fails its row invitee_update_failed, the removal leaves the dashboard whole —
    while one applied without an answer, or refused by a 429, settles as before."""
    hooks, made, fails = ROUNDS[case]
    config = make_config(add_invitees=True, max_attempts=1)
    result, board = await add_new(emulator, config, *hooks)
    assert result.exit_code == (1 if fails else 0)
    assert puts(emulator) == (1 if fails else made)
    assert (NEW in (board.invitees or {})) is not fails
    assert emulator.invited[(TOKEN_A, NEW)] == (0 if fails else 1)
    if fails:
        [failed] = by_kind(read_report(config.report_path), "batch")
        assert failed["error"]["code"] == "invitee_update_failed"


async def test_failed_writes_back_off_as_retries_do_up_to_max_attempts(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Three PUTs refused with a 503 and --max-attempts 4: each is followed by the
    policy's backoff (doubling, in virtual time) before the dashboard is read again,
    and the fourth write is made and holds."""
    clock = FakeClock()
    config = make_config(add_invitees=True, max_attempts=4, backoff_base=2.0, backoff_max=60.0)
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.before_write[TOKEN_A] = [refused(503)] * 3
    result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])), clock=clock)
    assert result.exit_code == 0
    assert puts(emulator) == 4
    assert NEW in (board.invitees or {})
    backoffs = [s for s in clock.slept if s >= 1.0]
    assert len(backoffs) == 3
    assert 1.0 <= backoffs[0] <= 2.0 <= backoffs[1] <= 4.0 <= backoffs[2] <= 8.0


def edit_every_read(emulator: Emulator) -> None:
    """Someone adds a colleague before every read of the dashboard: no two reads agree."""

    def colleague(board: Dashboard) -> None:
        assert board.invitees is not None
        name = f"colleague{len(board.invitees)}@example.com"
        board.invitees[name] = Invitee(name)

    emulator.before_read[TOKEN_A] = [colleague] * 100


async def test_an_applied_unanswered_write_counts_while_the_dashboard_keeps_changing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The PUT is applied without an answer, and from then on no two reads agree: no
    write can be made safely, but none is needed: NEW shows added, counts, is invited."""
    edit_every_read(emulator)
    config = make_config(add_invitees=True)
    emulator.before_read[TOKEN_A][:3] = [None, None, None]  # the check's and the first round's
    result, board = await add_new(emulator, config, dropped)
    assert result.exit_code == 0
    assert NEW in (board.invitees or {})
    assert result.summary.invitees_added == 1
    assert emulator.invited[(TOKEN_A, NEW)] == 1


async def test_an_applied_unanswered_removal_is_recorded_while_the_dashboard_keeps_changing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The removal's PUT is applied without an answer, and from then on no two reads
    agree: nothing is left to remove, so the entries are recorded and the invitations
    revoked, and the colleagues added meanwhile stay."""
    edit_every_read(emulator)
    emulator.before_read[TOKEN_A][:3] = [None, None, None]  # the survey's and the first round's
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result, board = await prune_two(emulator, config, dropped)
    assert result.exit_code == 0
    assert set(PEOPLE[:2]) < set(board.invitees or {})
    assert not set(PEOPLE[2:4]) & set(board.invitees or {})
    assert recorded_entries(config) == {p: ["invitation", "invitee"] for p in PEOPLE[2:4]}


async def test_a_stop_right_after_an_unanswered_removal_still_records_what_it_took(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop as the removal's PUT is applied without an answer (paced, so every later
    request waits and is stopped): one read says what it took, and p2's and p3's entries
    are recorded; their invitations stay for the next run (exit 3)."""
    stop = asyncio.Event()

    def dropped_and_stopped(_: Dashboard) -> str:
        stop.set()
        return DROP

    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), rate=5.0)
    result, board = await prune_two(emulator, config, dropped_and_stopped, stop=stop)
    assert result.exit_code == 3
    assert set(board.invitees or {}) == set(PEOPLE[:2])
    assert "DELETE" not in {r.method for r in emulator.requests}
    assert recorded_entries(config) == {p: ["invitee"] for p in PEOPLE[2:4]}


async def test_someone_elses_entry_for_the_same_address_is_not_counted_as_added(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A colleague adds NEW (for good) as the run's PUT for it (access for a day) gets a
    503: the entry is the colleague's, so the run counts nobody added and its record
    names nobody; NEW is invited once, and no second PUT is made."""

    def colleague_then_503(dashboard: Dashboard) -> int:
        assert dashboard.invitees is not None
        dashboard.invitees[NEW] = Invitee(NEW)
        return 503

    config = make_config(add_invitees=True, access_expires=86400.0)
    result, board = await add_new(emulator, config, colleague_then_503)
    assert result.exit_code == 0
    assert puts(emulator) == 1
    assert result.summary.invitees_added == 0
    assert board.invitees is not None
    assert board.invitees[NEW].access_expiration is None
    [sent] = by_kind(read_report(config.report_path), "batch")
    assert "invitees_added" not in sent
    assert emulator.invited[(TOKEN_A, NEW)] == 1


async def test_a_revocation_cut_before_it_is_handled_is_sent_again_even_at_one_attempt(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first DELETE's kept-alive connection is closed before the service handles it:
    a DELETE cannot go stale, so it is sent again at once (as HTTP allows), even with
    --max-attempts 1, and p2 and p3 lose their invitations."""
    admit, cuts = emulator._admit, list[web.Request]()

    def cut_first_delete(request: web.Request) -> Any:
        if request.method == "DELETE" and not cuts:
            cuts.append(request)
            return hang_up(request), {}
        return admit(request)

    monkeypatch.setattr(emulator, "_admit", cut_first_delete)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), max_attempts=1)
    result, board = await prune_two(emulator, config)
    assert result.exit_code == 0
    assert cuts
    assert {e for e, _ in board.invitations} == set(PEOPLE[:2])


async def test_a_read_that_fails_after_an_unanswered_removal_is_followed_by_one_more(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal's PUT is applied without an answer and the read after it fails (a 503,
    --max-attempts 1): one more read says what the PUT took, so p2's and p3's entries
    are recorded though the dashboard is refused this time; that read is counted."""
    admit, failed = emulator._admit, list[web.Request]()

    def fail_the_read_after_the_put(request: web.Request) -> Any:
        dashboard = not request.path.endswith("/invitation")
        if request.method == "GET" and dashboard and puts(emulator) and not failed:
            failed.append(request)
            return error(503, "unavailable", {}), {}
        return admit(request)

    monkeypatch.setattr(emulator, "_admit", fail_the_read_after_the_put)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), max_attempts=1)
    result, board = await prune_two(emulator, config, dropped)
    assert result.exit_code == 1
    assert failed
    assert set(board.invitees or {}) == set(PEOPLE[:2])
    assert recorded_entries(config) == {p: ["invitee"] for p in PEOPLE[2:4]}
    made = sum(1 for r in emulator.requests if not r.path.endswith("/invitation"))
    assert result.summary.requests_by_kind["dashboard"] == made


async def test_entries_taken_by_two_writes_are_all_recorded(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """p2 is an invitee and on the share list; the first PUT takes both without an
    answer, someone puts p2 back on the share list, and the second PUT takes that: p2's
    record names all three things it lost, once each."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])
    board.share_list = {PEOPLE[2]}
    put_back = list[str]()

    def back_on_the_share_list(dashboard: Dashboard) -> None:
        if puts(emulator) == 1 and not put_back:
            assert dashboard.share_list is not None
            dashboard.share_list.add(PEOPLE[2])
            put_back.append(PEOPLE[2])

    emulator.before_read[TOKEN_A] = [back_on_the_share_list] * 20
    emulator.before_write[TOKEN_A] = [dropped]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])))
    assert result.exit_code == 0
    assert put_back
    assert puts(emulator) == 2
    assert recorded_entries(config)[PEOPLE[2]] == ["invitation", "invitee", "share_list"]
    assert result.summary.prune is not None
    assert result.summary.prune.revoked_by_what == {"invitation": 2, "invitee": 2,
                                                    "share_list": 1}  # fmt: skip


async def test_a_read_that_is_no_dashboard_object_is_never_taken_for_an_empty_one(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a PUT cut before it was applied, the next read answers 200 with an HTML page
    (a proxy's): it is refused, not read as a dashboard holding nobody, so nobody is
    recorded removed or has an invitation revoked while their entries are still there."""
    admit, pages = emulator._admit, list[web.Request]()

    def a_page_after_the_put(request: web.Request) -> Any:
        dashboard = not request.path.endswith("/invitation")
        if request.method == "GET" and dashboard and puts(emulator) and not pages:
            pages.append(request)
            return web.Response(status=200, text="<html>ok</html>", content_type="text/html"), {}
        return admit(request)

    monkeypatch.setattr(emulator, "_admit", a_page_after_the_put)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result, board = await prune_two(emulator, config, cut)
    assert result.exit_code == 1
    assert pages
    assert set(PEOPLE[:4]) <= set(board.invitees or {})
    assert {e for e, _ in board.invitations} == set(PEOPLE[:4])
    assert recorded_entries(config) == {}
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "unexpected_response"
