"""Invite only who still needs it: each dashboard read before its first send, people already
invited or in a session skipped, addresses the dashboard does not allow refused unsent."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.conftest import (
    TOKEN_A,
    TOKEN_B,
    TOKEN_C,
    Proc,
    by_kind,
    csv_source,
    emulator_invited,
    find_capture,
    read_report,
    rows_csv,
)
from worker.cli.review import write_failed
from worker.clock import SystemClock
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard, Invitee
from worker.emulator.server import DROP
from worker.errors import SendError
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.record.replay import Replay
from worker.run import run
from worker.run.human import SHOWN_TOKENS, print_plan
from worker.run.progress import Progress
from worker.send import client_for, pacer_for, preflight_for, reconciler_for
from worker.send.keyed import KeyedLocks
from worker.send.paging import LIST_ATTEMPTS

PEOPLE = [f"p{i}@example.com" for i in range(30)]


def posts(emulator: Emulator) -> list[int]:
    """The number of emails in each POST the service received."""
    return [r.emails for r in emulator.requests if r.method == "POST"]


async def test_the_same_list_twice_sends_nothing_the_second_time(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Run 1 invites everyone; run 2 of the same list makes zero POSTs, reads only the
    listing (everyone on it was served: the dashboard is not read) and reports every pair
    skipped (already_invited); new rows added between runs are the only ones sent."""
    emulator.add_dashboard(TOKEN_A, invitees=[*PEOPLE, "new@example.com"])
    pairs = [(TOKEN_A, e) for e in PEOPLE]
    first = await run(make_config(batch_size=10), csv_source(rows_csv(pairs)))
    assert first.exit_code == 0
    assert sum(posts(emulator)) == 30
    before = len(emulator.requests)
    second_config = make_config(batch_size=10, report_path=tmp_path / "second.jsonl")
    with capture_logs() as logs:
        second = await run(second_config, csv_source(rows_csv(pairs)))
    assert second.exit_code == 0
    assert sum(posts(emulator)) == 30  # not one more
    assert [r.method for r in emulator.requests[before:]] == ["GET"]  # the listing only
    skipped = by_kind(read_report(second_config.report_path), "skipped")
    assert sorted(e for s in skipped for e in s["emails"]) == sorted(PEOPLE)
    assert {s["reason"] for s in skipped} == {"already_invited"}
    assert second.summary.emails_skipped == 30
    assert second.summary.skipped_by_reason == {"already_invited": 30}
    assert second.summary.requests_by_kind == {"invite": 0, "list_invitations": 1,
                                                  "dashboard": 0}  # fmt: skip
    assert find_capture(logs, "batch.skipped")
    third_config = make_config(batch_size=10, report_path=tmp_path / "third.jsonl")
    third = await run(third_config, csv_source(rows_csv([*pairs, (TOKEN_A, "new@example.com")])))
    assert third.exit_code == 0
    assert posts(emulator)[-1] == 1
    assert emulator.invited == Counter(
        {(TOKEN_A, e.lower()): 1 for e in [*PEOPLE, "new@example.com"]}
    )


async def test_open_sessions_are_skipped_even_with_resend_after(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """--resend-after re-invites those whose invitation is older and who have no session;
    --resend sends to everyone."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["old@example.com", "open@example.com",
                                                      "recent@example.com"])  # fmt: skip
    now = emulator._clock()
    board.invitations += [("old@example.com", now - 3 * 86400), ("open@example.com", now - 86400),
                          ("recent@example.com", now - 600)]  # fmt: skip
    board.open_session("open@example.com", now - 86400)
    pairs = [(TOKEN_A, e) for e in ("old@example.com", "open@example.com", "recent@example.com")]
    after = await run(make_config(resend_after=2 * 86400), csv_source(rows_csv(pairs)))
    assert after.summary.skipped_by_reason == {"active_session": 1, "already_invited": 1}
    assert posts(emulator) == [1]
    assert emulator.invited[(TOKEN_A, "old@example.com")] == 1
    everyone = await run(make_config(resend=True, report_path=tmp_path / "all.jsonl"),
                         csv_source(rows_csv(pairs)))  # fmt: skip
    assert everyone.summary.emails_skipped == 0
    assert posts(emulator) == [1, 3]


def test_an_invitee_is_served_as_it_is_now_after_a_field_changes() -> None:
    """The emulator serves an invitee as it is now, after a field of it is set."""
    invitee = Invitee("a@example.com")
    board = Dashboard(TOKEN_A, invitees={"a@example.com": invitee})
    assert board.as_json()["invitees"][0]["access_expiration"] is None
    invitee.access_expiration = 0.0
    assert board.as_json()["invitees"] == [
        {"email": "a@example.com", "access_expiration": "1970-01-01T00:00:00+00:00",
         "last_accessed": None, "created_at": "1970-01-01T00:00:00+00:00"}
    ]  # fmt: skip


async def test_addresses_the_dashboard_does_not_allow_are_refused_without_a_400(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Not an invitee (or one whose access expired) and not on the share list: failed
    not_on_share_list before any POST, so the service answers no 400 at all."""
    board = emulator.add_dashboard(TOKEN_A, share_list=["listed@example.com"],
                                   invitees=["ok@example.com", "expired@example.com"])  # fmt: skip
    assert board.invitees is not None
    board.invitees["expired@example.com"].access_expiration = emulator._clock() - 60
    emails = ["ok@example.com", "listed@example.com", "expired@example.com", "x@example.com"]
    result = await run(make_config(), csv_source(rows_csv([(TOKEN_A, e) for e in emails])))
    assert result.exit_code == 1
    assert [r.status for r in emulator.requests if r.method == "POST"] == [201]
    assert posts(emulator) == [2]
    expired, outside = [b for b in by_kind(read_report(make_config().report_path), "batch")
                        if b["status"] == "failed"]  # fmt: skip
    assert (expired["emails"], outside["emails"]) == (["expired@example.com"], ["x@example.com"])
    assert {expired["error"]["code"], outside["error"]["code"]} == {"not_on_share_list"}
    assert "access has expired" in expired["error"]["message"]  # its own fix: extend it
    assert "add it to the invitees" in outside["error"]["message"]
    assert expired["attempts"] == outside["attempts"] == 0


async def test_add_invitees_refuses_an_expired_entry_before_any_post_plan_and_run_alike(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--add-invitees leaves an existing entry as it is: an invitee whose access expired
    is refused not_on_share_list before any POST (it was POSTed and answered 400, and the
    plan said it would be added), saying to extend it; a new address is added and sent."""
    from worker.run.plan import dry_run

    board = emulator.add_dashboard(TOKEN_A, invitees=["keep@example.com"])
    assert board.invitees is not None
    board.invitees["keep@example.com"].access_expiration = emulator._clock() - 60
    rows = rows_csv([(TOKEN_A, "keep@example.com"), (TOKEN_A, "new@example.com")])
    planned = await dry_run(make_config(add_invitees=True), csv_source(rows), out=io.StringIO(),
                            preflight=True)  # fmt: skip
    assert planned.exit_code == 1  # as the run's
    assert [r.method for r in emulator.requests if r.method != "GET"] == []
    result = await run(make_config(add_invitees=True, overwrite=True), csv_source(rows))
    assert result.exit_code == 1
    assert [r.status for r in emulator.requests if r.method == "POST"] == [201]
    assert emulator.invited == Counter({(TOKEN_A, "new@example.com"): 1})
    [refused] = [b for b in by_kind(read_report(make_config().report_path), "batch")
                 if b["status"] == "failed"]  # fmt: skip
    assert refused["emails"] == ["keep@example.com"]
    assert refused["error"]["code"] == "not_on_share_list"
    assert "extend it on the dashboard" in refused["error"]["message"]
    assert board.invitees["keep@example.com"].access_expiration is not None  # unchanged


async def test_people_already_served_are_skipped_whatever_the_dashboard_says_now(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Invited people are skipped even once the dashboard is paused or no longer allows
    them; the dashboard is read once, for the rest, who are refused as it says."""
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:6], status="paused")
    removed = emulator.add_dashboard(TOKEN_B, invitees=PEOPLE[1:6])
    for dashboard, invited in ((board, PEOPLE[:3]), (removed, PEOPLE[:2])):
        dashboard.invitations.extend((e, time.time() - 60) for e in invited)
        emulator.seed([dashboard])
    pairs = [(TOKEN_A, e) for e in PEOPLE[:6]] + [(TOKEN_B, e) for e in PEOPLE[:6]]
    config = make_config(batch_size=6)
    result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 1
    assert result.summary.skipped_by_reason == {"already_invited": 5}
    assert result.summary.refused_by_code == {"dashboard_paused": 3}
    records = read_report(config.report_path)
    skipped = {(s["token"], e) for s in by_kind(records, "skipped") for e in s["emails"]}
    assert skipped == {*((TOKEN_A, e) for e in PEOPLE[:3]), (TOKEN_B, PEOPLE[0]),
                       (TOKEN_B, PEOPLE[1])}  # fmt: skip
    [refused] = [b for b in by_kind(records, "batch") if b["status"] == "failed"]
    assert (refused["token"], refused["emails"]) == (TOKEN_A, PEOPLE[3:6])
    assert posts(emulator) == [4]  # TOKEN_B's four not yet invited; PEOPLE[0] is skipped
    assert all(emulator.invited[(t, e.lower())] == 1 for t, e in pairs if (t, e) not in
               {(TOKEN_A, p) for p in PEOPLE[3:6]})  # fmt: skip
    dashboard_reads = [r.token for r in emulator.requests
                       if r.method == "GET" and not r.path.endswith("/invitation")]  # fmt: skip
    assert sorted(dashboard_reads) == sorted([TOKEN_A, TOKEN_B])


@pytest.mark.parametrize(
    ("setup", "code"),
    [("paused", "dashboard_paused"), ("open", "not_invite_only"), ("missing", "token_not_found")],
)
async def test_paused_open_and_missing_dashboards_are_refused_unsent(
    emulator: Emulator, make_config: Callable[..., Config], setup: str, code: str
) -> None:
    """A paused dashboard, one shared openly, and a token with no dashboard: every row of
    the token fails with a clear code, and nothing is POSTed for it."""
    token = TOKEN_B if setup != "missing" else "gone-dashboard"
    if setup == "paused":
        emulator.add_dashboard(token, invitees=PEOPLE, status="paused")
    elif setup == "open":
        emulator.add_dashboard(token, invitees=PEOPLE, share_type="open")
    emulator.add_dashboard(TOKEN_C, invitees=PEOPLE)
    pairs = [(token, e) for e in PEOPLE[:12]] + [(TOKEN_C, PEOPLE[0])]
    result = await run(make_config(batch_size=5), csv_source(rows_csv(pairs)))
    assert result.exit_code == 1
    assert [r.token for r in emulator.requests if r.method == "POST"] == [TOKEN_C]
    failed = [b for b in by_kind(read_report(make_config().report_path), "batch")
              if b["status"] == "failed"]  # fmt: skip
    assert sorted(e for b in failed for e in b["emails"]) == sorted(PEOPLE[:12])
    assert {b["error"]["code"] for b in failed} == {code}
    assert result.summary.refused_by_code == {code: 12}
    # One listing for the token, however many batches; its dashboard is read once, when
    # nobody listed was served (none here), and not at all when the listing says 404.
    reads = [r.path.rsplit("/", 1)[-1] for r in emulator.requests if r.token == token]
    assert reads == (["invitation"] if setup == "missing" else ["invitation", token])


async def test_report_summarize_counts_skipped_by_reason(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """report summarize shows skipped emails by reason next to sent and failed."""
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:3])
    board.invitations.append((PEOPLE[0], emulator._clock() - 60))
    config = make_config()
    await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:3]])))
    totals = Replay.read(config.report_path).summary()
    assert (totals["sent"], totals["skipped"]) == (2, 1)
    assert totals["skipped_by_reason"] == {"already_invited": 1}


async def test_queue_mode_skips_and_refuses_by_the_same_rules(
    emulator: Emulator, make_config: Callable[..., Config], redis_server: str, stream_name: str
) -> None:
    """A stream worker reads the dashboard too: the already invited are acknowledged as
    skipped, the not allowed dead-lettered, the rest sent; nothing stays pending."""
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:4])
    board.invitations.append((PEOPLE[0], emulator._clock() - 60))
    client = Redis.from_url(redis_server, decode_responses=True)
    try:
        for email in [*PEOPLE[:4], "stranger@example.com"]:
            await client.xadd(stream_name, {"token": TOKEN_A, "email": email})
        options = StreamOptions(url=redis_server, stream=stream_name,
                                until_empty=True)  # fmt: skip
        result = await run_stream(make_config(), options)
        pending = await client.xpending(stream_name, "invite-worker")
        dead: Any = await client.xrange(f"{stream_name}:dead")
    finally:
        await client.aclose()
    assert result.summary.emails_skipped == 1
    assert posts(emulator) == [3]
    assert pending["pending"] == 0
    assert [fields["error_code"] for _, fields in dead] == ["not_on_share_list"]


def test_the_cron_job_run_twice_emails_nobody_twice(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """The scheduled job as docs/operating.md shows it (--overwrite, the same list each day),
    against a seeded emulator process: the second day sends nothing, exit 0."""
    seed = tmp_path / "dashboards.json"
    seed.write_text(json.dumps([{"token": TOKEN_A, "invitees": [{"email": e} for e in PEOPLE]}]))
    url = start_emulator("--dashboards", str(seed), "--session-rate", "0.3")
    source = tmp_path / "invites.csv"
    source.write_text(rows_csv([(TOKEN_A, e) for e in PEOPLE]))
    for _day in range(2):
        spawn("run", str(source), "--report", str(tmp_path / "report.jsonl"), "--overwrite",
              "--api-url", url).expect(0, timeout=60)  # fmt: skip
    assert emulator_invited(url) == {(TOKEN_A, e): 1 for e in PEOPLE}
    summary = read_report(tmp_path / "report.jsonl")[-1]
    assert summary["emails_sent"] == 0
    assert summary["emails_skipped"] == 30
    assert set(summary["skipped_by_reason"]) <= {"already_invited", "active_session"}


async def test_add_invitees_adds_only_what_is_missing_and_keeps_everything_else(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--add-invitees: the missing addresses are added (read, merge, write, read back),
    existing invitees (their expiry, their creation time) and the share list are
    untouched, then everyone is invited; the batch records name those added, and until
    when."""
    board = emulator.add_dashboard(TOKEN_A, share_list=["s@example.com"],
                                   invitees=["a@example.com", "b@example.com"])  # fmt: skip
    assert board.invitees is not None
    later = float(int(emulator._clock()) + 86400)  # whole seconds survive ISO 8601
    board.invitees["b@example.com"].access_expiration = later
    board.invitees["a@example.com"].created_at = 1_700_000_000.0  # long before this run
    emails = ["a@example.com", "new1@example.com", "New2@example.com"]
    result = await run(make_config(add_invitees=True),
                       csv_source(rows_csv([(TOKEN_A, e) for e in emails])))  # fmt: skip
    assert result.exit_code == 0
    assert result.summary.invitees_added == 2
    assert set(board.invitees) == {"a@example.com", "b@example.com", "new1@example.com",
                                   "new2@example.com"}  # fmt: skip
    assert board.invitees["b@example.com"].access_expiration == later
    assert board.invitees["a@example.com"].created_at == 1_700_000_000.0
    assert board.share_list == {"s@example.com"}
    assert emulator.invited == Counter({(TOKEN_A, e.lower()): 1 for e in emails})
    assert [r.method for r in emulator.requests].count("PUT") == 1
    # The report names whom the run granted access, on the records of their sends.
    sent = by_kind(read_report(make_config().report_path), "batch")
    granted = [e for b in sent for e in b.get("invitees_added", [])]
    assert sorted(granted) == ["New2@example.com", "new1@example.com"]
    # For good (no --access-expires): said as null; a batch that added nobody says nothing.
    assert [b["access_expiration"] for b in sent if "invitees_added" in b] == [None]
    assert all("access_expiration" not in b for b in sent if "invitees_added" not in b)
    assert Replay.read(make_config().report_path).summary()["invitees_added"] == 2


async def test_add_invitees_keeps_an_edit_made_between_its_read_and_its_write(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Someone adds an invitee between the worker's reads: the worker reads again before it
    writes, so that person's change survives alongside the worker's."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])

    def someone_else(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees["colleague@example.com"] = Invitee("colleague@example.com")

    # Reads: the preflight's, then the update's first and second (edited before it).
    emulator.before_read[TOKEN_A] = [None, None, someone_else]
    result = await run(make_config(add_invitees=True),
                       csv_source(rows_csv([(TOKEN_A, "new@example.com")])))  # fmt: skip
    assert result.exit_code == 0
    assert board.invitees is not None
    assert set(board.invitees) == {"a@example.com", "colleague@example.com", "new@example.com"}
    assert emulator.invited == Counter({(TOKEN_A, "new@example.com"): 1})


@pytest.mark.parametrize("status", [503, 429])
async def test_add_invitees_reads_again_rather_than_repeat_a_refused_write(
    emulator: Emulator, make_config: Callable[..., Config], status: int
) -> None:
    """The PUT is refused (a 503, or a 429 and its wait) while someone adds an invitee:
    the write is not sent again as it was (that would drop the colleague), the
    dashboard is read again and the next write keeps both."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])

    def someone_else_then_refused(dashboard: Dashboard) -> int:
        assert dashboard.invitees is not None
        dashboard.invitees["colleague@example.com"] = Invitee("colleague@example.com")
        return status

    emulator.before_write[TOKEN_A] = [someone_else_then_refused]
    result = await run(make_config(add_invitees=True),
                       csv_source(rows_csv([(TOKEN_A, "new@example.com")])))  # fmt: skip
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {"a@example.com", "colleague@example.com",
                                         "new@example.com"}  # fmt: skip
    assert [r.method for r in emulator.requests].count("PUT") == 2
    # The write not made again is not counted as a request.
    made = sum(1 for r in emulator.requests if not r.path.endswith("/invitation"))
    assert result.summary.requests_by_kind["dashboard"] == made
    assert result.summary.invitees_added == 1
    assert emulator.invited == Counter({(TOKEN_A, "new@example.com"): 1})


async def test_add_invitees_takes_an_unanswered_write_that_was_applied_as_done(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The PUT is applied but its answer never comes (the connection drops): the next
    reads show the address added, so no second PUT goes (it would overwrite whatever
    changed meanwhile), the address counts as added and is invited once."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])
    emulator.before_write[TOKEN_A] = [lambda _: DROP]
    result = await run(make_config(add_invitees=True),
                       csv_source(rows_csv([(TOKEN_A, "new@example.com")])))  # fmt: skip
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {"a@example.com", "new@example.com"}
    assert [r.method for r in emulator.requests].count("PUT") == 1
    assert result.summary.invitees_added == 1
    assert emulator.invited == Counter({(TOKEN_A, "new@example.com"): 1})
    [sent] = by_kind(read_report(make_config().report_path), "batch")
    assert sent["invitees_added"] == ["new@example.com"]


async def test_add_invitees_fails_its_rows_loudly_when_the_change_does_not_hold(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The read-back does not show the address written (someone removed it at once): those
    rows fail invitee_update_failed, nothing is sent to them, the others are invited."""
    board = emulator.add_dashboard(TOKEN_A, invitees=["a@example.com"])

    def removed(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees.pop("new@example.com", None)

    emulator.before_read[TOKEN_A] = [None, None, None, removed]
    pairs = [(TOKEN_A, "a@example.com"), (TOKEN_A, "new@example.com")]
    with capture_logs() as logs:
        result = await run(make_config(add_invitees=True), csv_source(rows_csv(pairs)))
    assert result.exit_code == 1
    assert board.invitees is not None
    assert find_capture(logs, "invitees.update_failed")
    [failed] = [b for b in by_kind(read_report(make_config().report_path), "batch")
                if b["status"] == "failed"]  # fmt: skip
    assert (failed["emails"], failed["error"]["code"]) == (["new@example.com"],
                                                          "invitee_update_failed")  # fmt: skip
    assert emulator.invited == Counter({(TOKEN_A, "a@example.com"): 1})


def test_dry_run_preflight_only_reads_and_says_what_would_happen(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """--dry-run --preflight: GETs only (no POST, PUT or DELETE); the plan says per token
    how many would be sent, skipped by reason and refused by code, and exits 1 for the
    refusals, as the run would."""
    seed = tmp_path / "dashboards.json"
    seed.write_text(json.dumps([
        {"token": TOKEN_A, "invitees": [{"email": e} for e in PEOPLE[:5]],
         "invited": PEOPLE[:1], "sessions": PEOPLE[1:2]},
        {"token": TOKEN_B, "status": "paused", "invitees": [{"email": PEOPLE[0]}]},
    ]))  # fmt: skip
    url = start_emulator("--dashboards", str(seed))
    source = tmp_path / "in.csv"
    source.write_text(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]] + [(TOKEN_B, PEOPLE[0])]))
    plan = spawn("run", str(source), "--dry-run", "--preflight", "--api-url", url,
                 "--report", str(tmp_path / "plan.jsonl"), "--log-format", "json")  # fmt: skip
    plan.expect(1, timeout=60)  # as the run would: it would record the refused as failed
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=10) as resp:  # noqa: S310
        stats = json.loads(resp.read())
    assert stats["posts"] == 0
    assert set(stats["by_status"]) == {"200"}
    summary = read_report(tmp_path / "plan.jsonl")[-1]
    assert summary["preflight"] == {
        TOKEN_A: {"would refuse: not_on_share_list": 1, "would send": 3,
                  "would skip: active_session": 1, "would skip: already_invited": 1},
        TOKEN_B: {"would refuse: dashboard_paused": 1, "would send": 0},
    }  # fmt: skip
    assert summary["requests"] == 1


def test_a_printed_plan_shows_the_first_tokens_and_sums_the_rest() -> None:
    """--dry-run --preflight over many tokens prints SHOWN_TOKENS of them one per line and
    one line for the rest (how many, and the counts of all); the report keeps each."""
    per_token = {f"tok{n:03d}": {"would send": n, "would skip: already_invited": 1}
                 for n in range(SHOWN_TOKENS + 5)}  # fmt: skip
    plan = {"source": "in.csv", "report": "plan.jsonl", "rows": 1, "valid": 1, "rejected": 0,
            "rejected_by_reason": {}, "tokens": len(per_token), "requests": 1,
            "batch_size": 100, "estimated_seconds": None, "rate": None, "assume_limit": None,
            "preflight": per_token}  # fmt: skip
    out = io.StringIO()
    print_plan(plan, out)
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("  tok0") for line in lines) == SHOWN_TOKENS
    total = sum(range(SHOWN_TOKENS + 5))
    assert lines[-1] == (
        f"  … 5 more tokens (each in the summary record of plan.jsonl); all "
        f"{SHOWN_TOKENS + 5}: would send {total:,}, would skip: already_invited "
        f"{SHOWN_TOKENS + 5}"
    )


def test_preflight_without_dry_run_is_a_usage_error(
    spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    """--preflight plans; on its own it is refused (exit 2) before anything is read."""
    source = tmp_path / "in.csv"
    source.write_text(rows_csv([(TOKEN_A, PEOPLE[0])]))
    run_ = spawn("run", str(source), "--preflight", "--api-url", "http://127.0.0.1:9")
    run_.expect(2, timeout=30)
    assert "--preflight goes with --dry-run" in run_.stderr()


def test_report_failed_leaves_out_refusals_unless_asked(tmp_path: Path) -> None:
    """A re-run cannot fix a refusal (not on the share list): report failed lists only what
    failed for a passing cause, unless --include-refused."""
    report = tmp_path / "r.jsonl"
    report.write_text(
        '{"kind":"batch","token":"t","emails":["a@x.io"],"status":"failed",'
        '"error":{"code":"not_on_share_list","message":"no"}}\n'
        '{"kind":"batch","token":"t","emails":["b@x.io"],"status":"failed",'
        '"error":{"code":"server_error","message":"503"}}\n'
    )
    header = "token,email,error_code,error_message"
    a, b = "t,a@x.io,not_on_share_list,no", "t,b@x.io,server_error,503"
    for include, expected in ((False, [b]), (True, [a, b])):
        out = io.StringIO()
        write_failed(report, out, include_refused=include)
        assert out.getvalue().splitlines() == [header, *expected]


def test_progress_counts_skipped_and_refused() -> None:
    """The progress events (and the bar) count skipped and refused emails as done."""
    snap = {"rows": 10, "valid": 10, "read_all": 1, "sent": 5, "failed": 3, "skipped": 2,
            "refused": 2, "requests": 1, "limited": 0, "waits": 0}  # fmt: skip
    with capture_logs() as logs:
        Progress(lambda: snap, "events", 1.0).update()
    [event] = find_capture(logs, "progress")
    assert (event["skipped"], event["refused"], event["eta_seconds"]) == (2, 2, 0.0)


async def test_a_resumed_run_does_not_count_skipped_people_as_failed(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Skipped pairs are done, not failed: a run stopped early and resumed still ends with
    exit 0 and job totals without failures."""
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE)
    board.invitations += [(e, emulator._clock() - 60) for e in PEOPLE[:10]]
    pairs = [(TOKEN_A, e) for e in PEOPLE]
    first = await run(make_config(batch_size=10), csv_source(rows_csv(pairs[:20])))
    assert first.summary.emails_skipped == 10
    again = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(pairs)))
    assert again.exit_code == 0, again.summary
    assert again.summary.job is not None
    assert again.summary.job.emails_failed == 0
    assert emulator.invited == Counter({(TOKEN_A, e): 1 for e in PEOPLE[10:]})


@pytest.mark.parametrize(
    ("script", "exit_code"),
    [(["drop", "drop", "502"], 1), (["drop"] * 20, 1), (["drop", "drop", "drop", "404"], 3)],
    ids=["reverse-proxy-502", "never-answered", "404-after-a-drop"],
)
async def test_the_url_check_is_retried_and_only_a_404_halts(
    emulator: Emulator, make_config: Callable[..., Config], script: list[str], exit_code: int
) -> None:
    """GET /api/v1/validate after a token's 404 is retried as every read is (and counted
    as ``validate``): a dropped connection there never fails the batch; only a clear 404
    halts the run (exit 3), any other answer, or none after every try, leaves the token
    refused and the run going."""
    emulator.add_dashboard(TOKEN_C, invitees=PEOPLE)
    emulator.validate_script = list(script)
    pairs = [("gone-dashboard", e) for e in PEOPLE[:3]] + [(TOKEN_C, PEOPLE[0])]
    result = await run(make_config(batch_size=5, concurrency=1), csv_source(rows_csv(pairs)))
    assert result.exit_code == exit_code
    checks = [r for r in emulator.requests if r.path == "/api/v1/validate"]
    # Counted as their own kind, not as dashboard reads: one per try (a try that met a
    # kept connection closed under it goes again on a new one, within the same try).
    assert 0 < result.summary.requests_by_kind["validate"] <= len(checks)
    dashboards = [r for r in emulator.requests if r.path.startswith("/api/v1/dashboard/")
                  and not r.path.endswith("/invitation")]  # fmt: skip
    assert result.summary.requests_by_kind["dashboard"] == len(dashboards)
    failed = [b for b in by_kind(read_report(make_config().report_path), "batch")
              if b["status"] == "failed"]  # fmt: skip
    if exit_code == 3:
        halted = result.summary.halted
        assert halted is not None
        assert halted.code == "wrong_url"
        assert failed == []  # nothing recorded as failed for good
        return
    # Tried again after each drop (aiohttp itself may retry a GET once on a reused
    # connection, hence no exact count): the 502 reached, or every try made.
    assert len(checks) >= min(len(script), make_config().max_attempts)
    assert {b["error"]["code"] for b in failed} == {"token_not_found"}
    assert sorted(e for b in failed for e in b["emails"]) == sorted(PEOPLE[:3])
    assert dict(emulator.invited) == {(TOKEN_C, PEOPLE[0]): 1}


@pytest.mark.timeout(30)
async def test_a_stop_ends_the_url_checks_retries_at_once(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop during the URL check's backoff ends it at once: the token's rows are left
    unsent for --resume, never recorded as failed."""
    emulator.validate_script = ["drop"] * 100
    pairs = [("gone-dashboard", e) for e in PEOPLE[:3]]
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    config = make_config(backoff_base=60.0, backoff_max=60.0)
    started = time.monotonic()
    result = await run(config, csv_source(rows_csv(pairs)), stop=stop)
    assert time.monotonic() - started < 15
    assert result.summary.interrupted is True
    assert result.summary.unsent == 3
    assert by_kind(read_report(config.report_path), "batch") == []


async def test_a_token_gone_on_day_two_is_refused_without_doubting_the_url(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A listing that answered 200 proves the API is there: a later token's 404 refuses
    it without asking /api/v1/validate, even behind a gateway that 404s that path."""
    gone = "gone-dashboard"
    emulator.add_dashboard(TOKEN_A, invitees=PEOPLE)
    emulator.add_dashboard(gone, invitees=PEOPLE)
    pairs = [(TOKEN_A, e) for e in PEOPLE[:3]] + [(gone, e) for e in PEOPLE[:3]]
    await run(make_config(batch_size=10), csv_source(rows_csv(pairs)))
    del emulator.dashboards[gone]
    emulator.validate_script = ["404"] * 10
    before = len(emulator.requests)
    config = make_config(batch_size=10, report_path=tmp_path / "2.jsonl", concurrency=1)
    result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 1
    assert result.summary.halted is None
    assert result.summary.refused_by_code == {"token_not_found": 3}
    assert result.summary.skipped_by_reason == {"already_invited": 3}
    assert not any(r.path.endswith("/validate") for r in emulator.requests[before:])


def _refuse(_: Dashboard) -> None:
    from aiohttp import web

    raise web.HTTPForbidden(text='{"errors": ["Forbidden"]}', content_type="application/json")


async def test_a_refused_dashboard_read_leaves_the_listings_on(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """One token's dashboard read answers 403: the check goes on without allow-lists, but
    every token is still listed, so nobody already invited is invited again."""
    emulator.add_dashboard(TOKEN_A, invitees=PEOPLE)
    emulator.add_dashboard(TOKEN_B, invitees=PEOPLE)
    pairs = [(TOKEN_A, e) for e in PEOPLE[:3]] + [(TOKEN_B, e) for e in PEOPLE[:3]]
    await run(make_config(batch_size=10), csv_source(rows_csv(pairs)))
    emulator.before_read[TOKEN_A] = [_refuse] * 10
    grown = [(TOKEN_A, e) for e in PEOPLE[:4]] + [(TOKEN_B, e) for e in PEOPLE[:3]]
    config = make_config(batch_size=10, report_path=tmp_path / "2.jsonl", concurrency=1)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(grown)))
    assert result.exit_code == 0
    assert result.summary.skipped_by_reason == {"already_invited": 6}
    assert result.summary.emails_sent == 1
    assert emulator.invited == Counter({(t, e.lower()): 1 for t, e in grown})
    assert find_capture(logs, "preflight.unavailable")


async def test_a_tokens_lock_serializes_everyone_and_goes_when_nobody_needs_it() -> None:
    """Holders of one token's lock never overlap, newcomers arriving as it is released
    included (the moment ``locked()`` is already False), and the lock is dropped once its
    last holder or waiter leaves: a long-lived worker keeps no lock per token ever met."""
    locks = KeyedLocks()
    inside: Counter[str] = Counter()
    most = 0

    async def user(token: str, delay: int) -> None:
        nonlocal most
        for _ in range(delay):
            await asyncio.sleep(0)
        async with locks.hold(token):
            inside[token] += 1
            most = max(most, inside[token])
            await asyncio.sleep(0)
            inside[token] -= 1

    await asyncio.gather(*(user(t, d) for t in ("a", "b") for d in range(30)))
    assert most == 1
    assert len(locks) == 0


def _broken(_: Dashboard) -> None:
    raise RuntimeError("the dashboard read fails")  # the emulator answers 500


async def test_a_dashboard_that_cannot_be_read_fails_only_those_not_yet_served(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Every dashboard read fails (500s): in a batch of served and new people, the served
    are skipped all the same and only the new ones fail, to be sent by --resume."""
    board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE[:6])
    board.invitations.extend((e, time.time() - 60) for e in PEOPLE[:3])
    emulator.seed([board])
    emulator.before_read[TOKEN_A] = [_broken] * 50
    config = make_config(batch_size=6, max_attempts=2)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert result.exit_code == 1
    assert result.summary.skipped_by_reason == {"already_invited": 3}
    [failed] = [b for b in by_kind(read_report(config.report_path), "batch")
                if b["status"] == "failed"]  # fmt: skip
    assert failed["emails"] == PEOPLE[3:6]
    assert failed["error"]["code"] == "server_error"
    assert posts(emulator) == []


async def test_a_refused_listing_stops_the_run_before_any_post(
    make_config: Callable[..., Config], answering: Callable[..., Awaitable[str]]
) -> None:
    """Keys the listing refuses (403) while POSTs would pass: nobody already invited could
    be told apart, so the run stops as for refused keys (exit 3), with no POST at all."""
    from aiohttp import web

    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.method)
        if request.method == "POST":
            return web.json_response({"data": []}, status=201)
        return web.json_response({"errors": ["Forbidden"]}, status=403)

    config = make_config(api_url=await answering(answer))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:5]])))
    assert result.exit_code == 3
    assert result.summary.aborted is True
    assert "POST" not in seen


async def test_a_dry_run_whose_keys_are_refused_says_so_and_exits_3(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--dry-run --preflight with keys the service refuses: the plan says the run would
    stop at its first check and exits 3, as the run would, instead of planning sends."""
    from worker.run.plan import dry_run

    emulator.add_dashboard(TOKEN_A, invitees=PEOPLE)
    emulator.app_key = "no-longer-valid-key"
    out = io.StringIO()
    planned = await dry_run(make_config(), csv_source(rows_csv([(TOKEN_A, PEOPLE[0])])),
                            out=out, preflight=True)  # fmt: skip
    assert planned.exit_code == 3
    assert planned.plan["keys_refused"] is True
    assert "refused the keys" in out.getvalue()
    assert "keys refused" not in json.dumps(planned.plan["preflight"])
    assert [r.method for r in emulator.requests] == ["GET"]


async def test_a_check_that_fails_is_not_made_again_for_every_batch_of_the_token(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A token whose listing cannot be read (page_number ignored): its ten batches all
    fail from the one attempt, each at once, rather than listing the token ten times."""
    board = emulator.add_dashboard(TOKEN_A, invitees=None)
    board.invitations.extend((f"other{i}@example.com", 1.0) for i in range(150))
    emulator.ignore_page_number = True
    people = [f"n{i}@example.com" for i in range(50)]
    config = make_config(batch_size=5)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in people])))
    assert result.exit_code == 1
    assert result.summary.emails_failed == 50
    failed = [e for e in logs if e["event"] == "batch.failed"]
    assert len(failed) == 10
    assert {e["code"] for e in failed} == {"listing_moved"}
    assert posts(emulator) == []
    # One listing, read again from its start as any listing that moved is: two pages each.
    listed = [r for r in emulator.requests if r.path.endswith("/invitation")]
    assert len(listed) == 2 * LIST_ATTEMPTS


def _flaky_service(
    fail_listings: int, delay: float = 0.0
) -> tuple[Callable[[Any], Awaitable[Any]], list[str]]:
    """A service whose first ``fail_listings`` listings answer 500 (after ``delay``),
    then lists nobody; dashboards allow everyone; POSTs are created. Its request log."""
    from aiohttp import web

    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        kind = "list" if request.path.endswith("/invitation") else "dashboard"
        kind = "post" if request.method == "POST" else kind
        seen.append(kind)
        if kind == "list" and seen.count("list") <= fail_listings:
            await asyncio.sleep(delay)
            return web.json_response({"errors": ["Internal Server Error"]}, status=500)
        if kind == "list":
            return web.json_response({"data": [], "meta": {"page": {"total_count": 0}}})
        if kind == "dashboard":
            return web.json_response({"share_type": "invite", "status": "active"})
        return web.json_response({"data": []}, status=201)

    return answer, seen


async def _screen_twice(preflight: Any, forget_after: float | None = None) -> list[str]:
    """Screen one batch (its check fails), maybe forgetting the token meanwhile, then
    another: what the second was told (raised error code or 'send')."""
    first = asyncio.ensure_future(preflight.screen(TOKEN_A, [PEOPLE[0]]))
    if forget_after is not None:
        await asyncio.sleep(forget_after)
        preflight.forget(TOKEN_A)
    with pytest.raises(SendError):
        await first
    try:
        second = await preflight.screen(TOKEN_A, [PEOPLE[1]])
    except SendError as exc:
        return [exc.code]
    return ["send"] if second.send == [PEOPLE[1]] else ["?"]


@pytest.mark.parametrize(
    ("ttl", "forget", "second", "listings"),
    [(None, False, "server_error", 1), (60.0, False, "send", 2), (None, True, "send", 2)],
)
async def test_a_failed_check_is_kept_only_where_keeping_it_cannot_lose_a_message(
    make_config: Callable[..., Config], answering: Callable[..., Awaitable[str]],
    ttl: float | None, forget: bool, second: str, listings: int,
) -> None:  # fmt: skip
    """A listing fails (500): a file run keeps the failure, so the token's next batch
    fails at once; a queue worker (a ttl) does not keep one that may pass (it would
    dead-letter every message of the token); nor is one kept that was forgotten (a
    requeued message's recheck) while it was being made."""
    answer, seen = _flaky_service(1, delay=0.3 if forget else 0.0)
    config = make_config(api_url=await answering(answer), max_attempts=1, preflight_ttl=ttl)
    clock = SystemClock()
    async with client_for(config) as client:
        pacer = pacer_for(config, clock)
        reconciler = reconciler_for(config, client, pacer, clock, random.Random(1))
        preflight = preflight_for(config, client, pacer, reconciler, clock)
        told = await _screen_twice(preflight, forget_after=0.1 if forget else None)
    assert told == [second]
    assert seen.count("list") == listings


async def test_rows_a_check_failed_with_a_400_are_sent_by_resume(
    emulator: Emulator, make_config: Callable[..., Config],
    answering: Callable[..., Awaitable[str]],
) -> None:  # fmt: skip
    """A listing answered 400 (final for a POST): the rows fail check_failed, not
    bad_request, and --resume against a service that lists sends them, once each."""
    from aiohttp import web

    async def bad_listing(request: web.Request) -> web.Response:
        return web.json_response({"errors": ["page_size is invalid"]}, status=400)

    pairs = [(TOKEN_A, e) for e in PEOPLE[:3]]
    config = make_config(api_url=await answering(bad_listing))
    first = await run(config, csv_source(rows_csv(pairs)))
    assert first.exit_code == 1
    [failed] = by_kind(read_report(config.report_path), "batch")
    assert failed["error"]["code"] == "check_failed"
    again = await run(make_config(resume=True), csv_source(rows_csv(pairs)))
    assert again.exit_code == 0
    assert emulator.invited == Counter({(t, e.lower()): 1 for t, e in pairs})
