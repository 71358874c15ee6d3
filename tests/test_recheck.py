"""``--add-invitees``: at the end of a file run, every dashboard it added invitees to is
looked at again, and whoever invited has lost their entry to another writer meanwhile is
added back — or, when they keep losing it, counted lost and the run exits 1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import TOKEN_A, TOKEN_B, by_kind, csv_source, read_report, rows_csv
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard
from worker.record.replay import Replay
from worker.run import run

NEW = "new@example.com"


def stale_writer(times: int) -> Callable[[Dashboard], None]:
    """Another writer whose PUT, made from a read before NEW was added, lands after NEW
    was invited: NEW's entry is gone, ``times`` times at most (seen at the next read)."""
    left = [times]

    def write(board: Dashboard) -> None:
        invited = any(e == NEW for e, _ in board.invitations)
        if invited and left[0] and board.invitees is not None and NEW in board.invitees:
            del board.invitees[NEW]
            left[0] -= 1

    return write


async def add_new(emulator: Emulator, config: Config, times: int) -> Dashboard:
    """A dashboard allowing a@example.com; a run adding and inviting NEW while another
    writer takes NEW's entry ``times`` times."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.before_read[TOKEN_A] = [stale_writer(times)] * 50
    return board


async def resume_adds_back(
    emulator: Emulator, config: Config, source: str, board: Dashboard
) -> None:
    """The same run with --resume exits 0 with NEW an invitee again, invited once."""
    result = await run(replace(config, resume=True), csv_source(source))
    assert result.exit_code == 0
    assert NEW in (board.invitees or {})
    assert emulator.invited[(TOKEN_A, NEW)] == 1


async def stopped_after_new_lost(emulator: Emulator, config: Config) -> tuple[Dashboard, str]:
    """A run (``config``: one batch at a time) over NEW on TOKEN_A and b@ on TOKEN_B,
    stopped as B's check reads its dashboard, after NEW was added and invited; NEW's entry
    is taken then. The dashboard of TOKEN_A, and the input."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.add_dashboard(TOKEN_B, invitees=["b@example.com"])
    stop = asyncio.Event()

    def taken_then_stopped(_: Dashboard) -> None:  # B's check comes after A's send
        if board.invitees is not None:
            board.invitees.pop(NEW, None)
        stop.set()

    emulator.before_read[TOKEN_B] = [taken_then_stopped]
    source = rows_csv([(TOKEN_A, NEW), (TOKEN_B, "b@example.com")])
    assert (await run(config, csv_source(source), stop=stop)).exit_code == 3
    return board, source


def gets(emulator: Emulator) -> int:
    return sum(1 for r in emulator.requests if r.method == "GET" and "invitation" not in r.path)


async def test_an_entry_another_writer_took_is_added_back_at_the_end(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """NEW's entry, taken after NEW was invited, is back at the run's end: a ``skipped``
    note names NEW in ``invitees_added``, nobody is lost, NEW is invited once."""
    config = make_config(add_invitees=True)
    board = await add_new(emulator, config, times=1)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {"a@example.com", NEW}
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    [note] = by_kind(read_report(config.report_path), "skipped")
    assert (note["emails"], note["invitees_added"]) == ([NEW], [NEW])
    assert result.summary.invitees_lost == 0
    assert [e["look"] for e in logs if e["event"] == "invitees.missing"] == [1]


async def test_an_entry_taken_at_every_look_is_counted_lost_and_the_run_exits_1(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A writer that takes NEW's entry again after each time it is added back: after the
    last look NEW is lost — ``invitees.lost``, the summary's ``invitees_lost``, exit 1 —
    and still invited once."""
    config = make_config(add_invitees=True)
    await add_new(emulator, config, times=100)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])))
    assert result.exit_code == 1
    assert result.summary.invitees_lost == 1
    assert result.summary.record()["invitees_lost"] == 1
    assert Replay.read(config.report_path).summary()["invitees_lost"] == 1
    assert [e["emails"] for e in logs if e["event"] == "invitees.lost"] == [1]
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    assert [r.method for r in emulator.requests].count("PUT") == 3  # the add, two add-backs


async def test_an_entry_still_there_costs_one_read_and_a_plain_run_none(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Nobody took an entry: the look is one read of the dashboard, nothing is added back;
    a run without --add-invitees looks at nothing."""
    emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.add_dashboard("abc-def-ghi2", invitees=["a@example.com"])
    config = make_config(add_invitees=True)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])))
    assert result.exit_code == 0
    assert gets(emulator) == 5  # the check, the add (two reads, one back), the look
    emulator.requests.clear()
    plain = make_config(report_path=config.report_path.with_name("plain.jsonl"))
    result = await run(plain, csv_source(rows_csv([("abc-def-ghi2", "a@example.com")])))
    assert result.exit_code == 0
    assert gets(emulator) == 1  # the check alone
    assert not by_kind(read_report(config.report_path), "skipped")


async def test_the_advised_resume_adds_the_lost_back(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """What the summary advises after a loss, once the other writer stopped (the same
    command with --resume), looks again, adds the lost back and invites nobody again; the
    run after that, ended with nobody lost, looks at nothing more."""
    config = make_config(add_invitees=True)
    board = await add_new(emulator, config, times=3)
    source = rows_csv([(TOKEN_A, NEW)])
    result = await run(config, csv_source(source))
    assert result.summary.invitees_lost == 1
    emulator.before_read[TOKEN_A] = []  # the other writer stopped
    again = replace(config, resume=True)
    result = await run(again, csv_source(source))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {"a@example.com", NEW}
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    assert result.summary.invitees_added == 1
    emulator.requests.clear()
    result = await run(again, csv_source(source))
    assert (result.exit_code, gets(emulator)) == (0, 0)


async def test_a_resume_looks_at_what_a_stopped_run_added(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A run stopped after NEW was added and invited makes no look; NEW's entry is taken
    meanwhile; the --resume run, with nothing left to send, looks at what the stopped run
    added and adds NEW back."""
    config = make_config(add_invitees=True, concurrency=1)
    board, source = await stopped_after_new_lost(emulator, config)
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    assert NEW not in (board.invitees or {})
    await resume_adds_back(emulator, config, source, board)


async def test_a_stop_during_the_look_ends_it_and_the_resume_looks_again(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop as the look begins: no write follows it and nobody is counted lost (exit
    3); the --resume run, once the other writer stopped, adds NEW back."""
    config = make_config(add_invitees=True)
    board = await add_new(emulator, config, times=100)
    stop = asyncio.Event()
    taking = stale_writer(100)

    def taken_then_stopped(board: Dashboard) -> None:
        taking(board)
        if any(e == NEW for e, _ in board.invitations):
            stop.set()

    emulator.before_read[TOKEN_A] = [taken_then_stopped] * 50
    source = rows_csv([(TOKEN_A, NEW)])
    result = await run(config, csv_source(source), stop=stop)
    assert result.exit_code == 3
    assert result.summary.invitees_lost == 0
    assert [r.method for r in emulator.requests].count("PUT") == 1  # the add alone
    emulator.before_read[TOKEN_A] = []
    await resume_adds_back(emulator, config, source, board)


async def test_a_look_that_cannot_read_leaves_it_to_the_resume(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The look's read of the dashboard fails (a 500 every time): its people count as
    unchecked, the run exits 1 rather than 0, and the --resume run looks again and adds
    NEW back; a plain --resume in between (no --add-invitees) does not settle it."""
    config = make_config(add_invitees=True, max_attempts=1)
    board = await add_new(emulator, config, times=1)
    failing = stale_writer(1)

    def fails_after_the_send(board: Dashboard) -> None:
        failing(board)
        if any(e == NEW for e, _ in board.invitations):
            raise web.HTTPInternalServerError

    emulator.before_read[TOKEN_A] = [fails_after_the_send] * 50
    source = rows_csv([(TOKEN_A, NEW)])
    with capture_logs() as logs:
        result = await run(config, csv_source(source))
    assert (result.exit_code, result.summary.invitees_unchecked) == (1, 1)
    assert [e["event"] for e in logs].count("invitees.recheck_failed") == 1
    emulator.before_read[TOKEN_A] = []
    plain = await run(replace(config, resume=True, add_invitees=False), csv_source(source))
    assert (plain.exit_code, plain.summary.invitees_lost) == (0, None)
    result = await run(replace(config, resume=True), csv_source(source))
    assert (result.exit_code, result.summary.invitees_unchecked) == (0, 0)
    assert NEW in (board.invitees or {})
    assert emulator.invited[(TOKEN_A, NEW)] == 1


async def test_the_look_leaves_alone_whom_the_list_no_longer_names(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stopped run added NEW, whose entry is then removed; the next day's list no
    longer names NEW: its --resume run does not add NEW back."""
    config = make_config(add_invitees=True, concurrency=1)
    board, _ = await stopped_after_new_lost(emulator, config)
    day2 = rows_csv([(TOKEN_B, "b@example.com")])
    result = await run(replace(config, resume=True), csv_source(day2))
    assert result.exit_code == 0
    assert NEW not in (board.invitees or {})


def lapsing(emulator: Emulator, *after: Callable[[Dashboard], None] | None) -> Dashboard:
    """TOKEN_A's dashboard, whose NEW entry another writer takes right after the add's
    read-back is answered (so the POST is refused); ``after``: what meets the reads then."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])

    def taken_after_this_answer(board: Dashboard) -> None:
        asyncio.get_running_loop().call_soon(lambda: (board.invitees or {}).pop(NEW, None))

    # The check's read, the add's two reads, its read-back: then the entry goes.
    emulator.before_read[TOKEN_A] = [None, None, None, taken_after_this_answer, *after]
    return board


async def test_an_entry_gone_before_the_send_is_added_and_sent_again(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Another writer takes NEW's entry right after the add's read-back, so the POST is
    refused (a 400, final for --resume): the batch adds NEW again and sends once more —
    one invitation, one sent record naming NEW added, NEW counted added once, exit 0."""
    board = lapsing(emulator)
    config = make_config(add_invitees=True)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, NEW)])))
    assert result.exit_code == 0
    assert [e["emails"] for e in logs if e["event"] == "batch.entries_lapsed"] == [1]
    assert NEW in (board.invitees or {})
    assert emulator.invited[(TOKEN_A, NEW)] == 1
    [sent] = by_kind(read_report(config.report_path), "batch")
    assert (sent["status"], sent["invitees_added"]) == ("sent", [NEW])
    assert result.summary.invitees_added == 1


async def test_a_stop_after_the_lapsed_send_leaves_it_for_the_resume(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop as the batch checks NEW again: no second POST, no record of the refusal
    (exit 3, NEW unsent); the --resume run sends NEW, once."""
    stop = asyncio.Event()
    board = lapsing(emulator, lambda _: stop.set())
    config = make_config(add_invitees=True)
    source = rows_csv([(TOKEN_A, NEW)])
    result = await run(config, csv_source(source), stop=stop)
    assert (result.exit_code, result.summary.unsent) == (3, 1)
    assert [r.method for r in emulator.requests].count("POST") == 1
    assert not by_kind(read_report(config.report_path), "batch")
    await resume_adds_back(emulator, config, source, board)
