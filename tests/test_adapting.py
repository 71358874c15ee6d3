"""Adapting to what the service and the disk do: list caps, odd headers, torn lines, EIO."""

from __future__ import annotations

import errno
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import (
    TOKEN_A,
    TOKEN_B,
    by_kind,
    csv_source,
    find_capture,
    read_report,
    rows_csv,
)
from worker.config import Config
from worker.emulator import Emulator
from worker.record.journal import journal_path, read_journal
from worker.record.replay import Replay
from worker.run import run
from worker.run.resume import load_history
from worker.send.refusals import ListCap, named_addresses, named_limit


async def test_a_service_capping_lists_at_20_costs_at_most_30_percent_more_requests(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--batch-size 100 against a service that refuses lists over 20 (naming no address):
    the cap is learned and used for the rest of the run; everyone is invited once."""
    emulator.faults.max_batch = 20
    pairs = [(token, f"p{i}@example.com") for token in (TOKEN_A, TOKEN_B) for i in range(2500)]
    config = make_config(batch_size=100)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    minimum = math.ceil(len(pairs) / 20)
    posts = emulator.stats()["posts"]
    assert posts <= 1.3 * minimum, posts
    learned = find_capture(logs, "batch.cap_learned")
    assert learned
    assert learned[-1]["batch_size"] == 20
    assert by_kind(read_report(config.report_path), "batch")[-1]["status"] == "sent"


async def test_a_list_cap_named_in_the_refusal_costs_at_most_115_requests(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """2,000 addresses, --batch-size 100, four senders, a service taking at most 20 a list
    and saying so in its 400 ("max 20"): at most 115 requests where 100 is the minimum."""
    emulator.faults.max_batch = 20
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(2000)]
    result = await run(make_config(batch_size=100, concurrency=4), csv_source(rows_csv(pairs)))
    assert result.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    assert emulator.stats()["posts"] <= 115, emulator.stats()["posts"]


async def test_a_list_cap_searched_for_by_four_senders_costs_at_most_120_requests(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The same service, its 400 naming no maximum: the four senders search in parallel
    (each below the sizes the others are trying), at most 120 requests (before: 135)."""
    emulator.faults.max_batch = 20
    emulator.faults.name_max_batch = False
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(2000)]
    result = await run(make_config(batch_size=100, concurrency=4), csv_source(rows_csv(pairs)))
    assert result.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    assert emulator.stats()["posts"] <= 120, emulator.stats()["posts"]


def test_concurrent_probes_of_the_cap_go_below_each_other() -> None:
    """While lists of 50 are being tried after a refusal of 100, the next sender tries 25,
    then 12; with no room left below, what is known to pass (or the lowest being tried)."""
    cap = ListCap(100)
    cap.suspect(100)
    assert cap.size() == 50
    with cap.trying(50):
        assert cap.size() == 25
        with cap.trying(25):
            assert cap.size() == 12
            with cap.trying(12):
                assert cap.size() == 12  # 6 would be lists too short to be worth it
                cap.accept(10)
                assert cap.size() == 10  # what is known to pass
    assert cap.size() == 55  # nothing in flight: the midpoint of 10 and 100


def test_a_named_maximum_is_tried_first_and_kept_once_it_holds() -> None:
    """'max 20' in a refusal of 100: lists of 20 go next, and once one is accepted 21 is
    known refused; a named maximum that is itself refused is dropped."""
    assert named_limit("Too many invitations in one request (max 20)", 100) == 20
    assert named_limit("at most 50 invitations per request", 100) == 50
    assert named_limit("the limit is 100", 100) is None  # not below the refused size
    assert named_limit("Invalid email at line 3", 100) is None
    cap = ListCap(100)
    cap.named(20)
    cap.suspect(100)
    assert cap.size() == 20
    cap.accept(20)
    cap.settle(100, all_accepted=True)
    assert (cap.refused, cap.size()) == (21, 20)
    wrong = ListCap(100)
    wrong.named(40)
    wrong.suspect(100)
    assert wrong.size() == 40
    wrong.suspect(40)
    wrong.accept(20)
    wrong.settle(40, all_accepted=True)  # 40 refused for its size: the hint was wrong
    assert wrong.hint is None
    assert wrong.size() == 30


async def test_a_refused_address_is_never_taken_for_a_list_cap(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Unnamed 400s caused by one address: bisection finds it, and later lists keep their
    full length (no cap is learned from a refusal some part of which stayed refused)."""
    emulator.faults.name_refused = False
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(400)]
    pairs[5] = (TOKEN_A, "nobody@outside.example")
    config = make_config(batch_size=100, concurrency=1)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 1
    assert not find_capture(logs, "batch.cap_learned")
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert [r.emails for r in posts[-3:]] == [100, 100, 100]


def test_list_cap_searches_between_accepted_and_refused() -> None:
    """The cap's probe size converges on the service's real cap and never grows past a
    confirmed refusal; accepting a 'refused' size undoes the belief."""
    cap = ListCap(100)
    assert cap.size() == 100
    cap.accept(13)
    cap.refuse(25)
    assert cap.size() == 19
    cap.accept(19)
    cap.refuse(22)
    assert cap.size() == 20
    cap.accept(20)
    cap.refuse(21)
    assert cap.size() == 20
    cap.refuse(10)  # below what was accepted: not a size problem
    assert cap.size() == 20
    cap.accept(50)
    assert cap.size() == 100


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("Email(s) not in the shared dashboard's share list: b@x.io, C@X.IO", ["b@x.io", "c@x.io"]),
        ("Invalid email 'b@x.io'.", ["b@x.io"]),
        ("invitee <b@x.io> refused; see a@x.io.example for help", ["b@x.io"]),
        ("Too many invitations in one request (max 20)", []),
        ("refused: a@x.io, b@x.io, c@x.io, d@x.io", []),  # every address: not trusted
        ("refused: someone@else.io", []),  # not in the batch
    ],
)
def test_named_addresses_picks_only_addresses_of_the_batch(message: str, named: list[str]) -> None:
    """A 400's message names refused addresses; only exact members of the batch count."""
    batch = ["a@x.io", "b@x.io", "c@x.io", "d@x.io"]
    assert [e.lower() for e in named_addresses(message, batch)] == named


async def test_nonsense_headers_are_logged_once_and_the_run_finishes(
    make_config: Callable[..., Config],
) -> None:
    """Every answer carries Limit 0, Period abc, Remaining -3, Reset -5: one
    ratelimit.bad_headers warning with the raw values; the run completes."""
    async with Emulator(
        api_key=make_config().api_key, app_key=make_config().app_key,
        limit=40, period=1.0, ratelimit_headers="nonsense",
    ) as emu:  # fmt: skip
        config = make_config(api_url=emu.url, batch_size=10)
        pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(300)]
        with capture_logs() as logs:
            result = await run(config, csv_source(rows_csv(pairs)))
        assert result.exit_code == 0
        assert emu.invited == Counter(dict.fromkeys(pairs, 1))
    [bad] = find_capture(logs, "ratelimit.bad_headers")
    assert bad["headers"] == {"Limit": "0", "Period": "abc", "Remaining": "-3", "Reset": "-5"}


async def test_eio_on_the_journal_stops_sending_and_no_post_leaves_without_its_intent(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's fdatasync fails with EIO (injected: no real failing disk here): exit 3,
    every POST the service saw has its intent in the journal, and --resume finishes once."""
    real_fdatasync = os.fdatasync
    syncs = 0

    def failing_fdatasync(fd: int) -> None:
        nonlocal syncs
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            syncs += 1
            if syncs > 5:
                raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(200)]
    # A short timeout: --resume waits out the halted run's requests before listing.
    config = make_config(batch_size=10, durable_journal=True, timeout=1.0)
    with capture_logs():
        result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 3
    halted = result.summary.halted
    assert halted is not None
    assert halted.code == "storage_error"
    assert "(EIO)" in halted.message
    posted = sum(r.emails for r in emulator.requests if r.method == "POST")
    assert 0 < posted < len(pairs)
    journaled = {e for intent in read_journal(journal_path(config.report_path)).values()
                 for e in intent.emails}  # fmt: skip
    sent = {e for b in by_kind(read_report(config.report_path), "batch") for e in b["emails"]}
    assert {e for t, e in emulator.invited} <= journaled | sent
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    with capture_logs():
        again = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(pairs)))
    assert again.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))


def test_a_torn_line_in_the_middle_is_skipped_with_one_warning(tmp_path: Path) -> None:
    """Readers of a report and journal skip a half-written line anywhere, warn once with
    its line number, and read everything else."""
    report = tmp_path / "r.jsonl"
    good = '{"kind":"batch","token":"t","emails":["a@x.io"],"status":"sent","error":null}'
    other = '{"kind":"batch","token":"t","emails":["b@x.io"],"status":"failed",' \
        '"error":{"code":"bad_request","message":"no"}}'  # fmt: skip
    report.write_text(
        "\n".join([good, '{"kind":"batch","tok', other, '{"kind": 5}', '"just a string"']) + "\n"
    )
    journal_path(report).write_text('{"i":"x-1","token":"t","emails":["c@x.io"],"at":"soon"}\n')
    with capture_logs() as logs:
        history = load_history(report, journal_path(report))
        replay = Replay.read(report)
    warnings = find_capture(logs, "records.torn_line")
    assert [(w["line"], w["skipped"]) for w in warnings] == [(2, 3), (1, 1), (2, 3)]
    assert history.totals()["emails_sent"] == 1
    assert history.totals()["emails_failed"] == 1
    assert history.unknown == []
    assert replay.summary()["sent"] == 1
    assert replay.summary()["failed"] == 1
