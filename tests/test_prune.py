"""``--prune``: each dashboard the list names ends up holding exactly the list, guarded so a
truncated or mangled list never empties one; ``--access-expires`` bounds what it adds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import json
import random
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from tests.test_listing import served_as
from tests.test_metrics import Agent
from worker.cli.review import print_summary
from worker.clock import SystemClock
from worker.config import Config, PruneMax
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard, Invitee
from worker.emulator.server import DROP
from worker.errors import ListingMoved, StorageError, UsageError
from worker.record.files import AppendFile, holds_only_a_plan, reads_as_report
from worker.record.replay import Replay
from worker.record.report import Report
from worker.run import run
from worker.run.human import print_summary as human_summary
from worker.run.plan import dry_run
from worker.run.prune import ListedInput
from worker.send import client_for, pacer_for
from worker.send.client import InvitationClient
from worker.send.paging import LIST_ATTEMPTS
from worker.send.prune import Pruner
from worker.send.retry import RetryPolicy

PEOPLE = [f"p{i}@example.com" for i in range(88)]
KEPT, GONE = PEOPLE[:80], PEOPLE[80:]
NEW = [f"new{i}@example.com" for i in range(5)]


def api(url: str, path: str) -> Any:
    """GET an API path from the emulator process, as any client with the keys would."""
    request = urllib.request.Request(  # noqa: S310 - loopback only
        f"{url}{path}", headers={"DD-API-KEY": API_KEY, "DD-APPLICATION-KEY": APP_KEY}
    )
    for _ in range(20):
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 429:  # the emulator's rate limit, when a test sets one
                raise
            time.sleep(0.5)
    raise AssertionError(f"{path}: still rate limited")


def state(url: str, token: str) -> dict[str, Any]:
    """A dashboard as the service holds it: invitees, share list, invitations, sessions."""
    board = api(url, f"/api/v1/dashboard/public/{token}")
    invitations: list[dict[str, Any]] = []
    while True:
        page = api(url, f"/api/v1/dashboard/public/{token}/invitation?page_size=100"
                        f"&page_number={len(invitations) // 100}")  # fmt: skip
        invitations += [item["attributes"] for item in page["data"]]
        if len(invitations) >= page["meta"]["page"]["total_count"] or not page["data"]:
            break
    return {
        "invitees": {i["email"]: i["access_expiration"] for i in board["invitees"] or []},
        "share_list": set(board["share_list"] or []),
        "invited": {i["email"] for i in invitations},
        "sessions": {i["email"] for i in invitations if i["has_session"]},
    }


def methods(url: str) -> dict[str, int]:
    """Requests the emulator process served, by HTTP method."""
    stats: dict[str, int] = api(url, "/_emulator/stats")["by_method"]
    return stats


def seed(tmp_path: Path, boards: list[dict[str, Any]]) -> str:
    """A dashboards file for ``invite-worker emulator --dashboards``."""
    path = tmp_path / "dashboards.json"
    path.write_text(json.dumps(boards))
    return str(path)


def eighty_eight(token: str = TOKEN_A) -> dict[str, Any]:
    """A dashboard with 88 people: every one an invitee, invited, ten in a session."""
    return {"token": token, "invitees": [{"email": e} for e in PEOPLE],
            "invited": PEOPLE[10:80] + GONE[2:], "sessions": PEOPLE[:10] + GONE[:2]}  # fmt: skip


def write_list(tmp_path: Path, pairs: list[tuple[str, str]], extra: str = "") -> str:
    path = tmp_path / "list.csv"
    path.write_text(rows_csv(pairs) + extra)
    return str(path)


def wait_for_deletes(url: str, count: int) -> None:
    """Until the emulator process has served ``count`` DELETEs (at most 50 s): revoking
    under way (the records go before the DELETEs, so the report cannot tell)."""
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline and methods(url).get("DELETE", 0) < count:
        time.sleep(0.05)


def run_args(source: str, url: str, report: Path, *extra: str) -> list[str]:
    return ["run", source, "--api-url", url, "--report", str(report), "--log-format", "json",
            "--batch-size", "3", *extra]  # fmt: skip


THE_LIST = [(TOKEN_A, e) for e in KEPT + NEW]


def test_a_list_of_80_of_88_plus_5_new_leaves_exactly_the_85(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """88 people, a list of 80 of them plus 5 new: the dashboard ends with exactly the 85,
    the 8 others' invitations (and sessions) revoked and their entries gone; each removal
    is a revoked record, counted by the summary and `report summarize`."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    report = tmp_path / "report.jsonl"
    spawn(*run_args(write_list(tmp_path, THE_LIST), url, report, "--add-invitees",
                    "--prune")).expect(0, timeout=60)  # fmt: skip
    after = state(url, TOKEN_A)
    assert set(after["invitees"]) == set(KEPT + NEW)
    assert after["invited"] == set(KEPT + NEW)
    assert not after["sessions"] & set(GONE)
    records = read_report(report)
    revoked = by_kind(records, "revoked")
    assert sorted(e for r in revoked for e in r["emails"]) == sorted(GONE)
    assert all(r["token"] == TOKEN_A for r in revoked)
    assert {tuple(r["removed"]) for r in revoked} == {("invitation", "invitee")}
    summary = records[-1]
    assert summary["emails_revoked"] == 8
    assert summary["revoked_by_what"] == {"invitation": 8, "invitee": 8}
    assert summary["requests_by_kind"]["revoke"] == 3  # 8 addresses in lists of up to 3
    assert max(emulator_invited(url).values()) == 1
    summarize = spawn("report", "summarize", str(report), "--json")
    summarize.expect(0, timeout=30)


def test_a_dashboard_the_list_does_not_name_is_untouched(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """A second dashboard, not named by the list, keeps every invitee and invitation; no
    request of the run goes near it but reads of the dashboards the list names."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight(), eighty_eight(TOKEN_B)]))
    before = state(url, TOKEN_B)
    spawn(*run_args(write_list(tmp_path, THE_LIST), url, tmp_path / "r.jsonl",
                    "--add-invitees", "--prune")).expect(0, timeout=60)  # fmt: skip
    assert state(url, TOKEN_B) == before
    assert set(state(url, TOKEN_A)["invitees"]) == set(KEPT + NEW)


def test_a_list_naming_half_a_dashboard_is_refused_unless_prune_max_allows_it(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """Half of a dashboard's people left off the list: the default 10% guard leaves it
    whole, records the refusal and exits 1; --prune-max 100% prunes it."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    source = write_list(tmp_path, [(TOKEN_A, e) for e in PEOPLE[:44]])
    before = state(url, TOKEN_A)
    spawn(*run_args(source, url, tmp_path / "r1.jsonl", "--prune")).expect(1, timeout=60)
    assert state(url, TOKEN_A) == before
    assert methods(url).keys() == {"GET"}
    [refused] = by_kind(read_report(tmp_path / "r1.jsonl"), "prune_refused")
    assert (refused["token"], refused["code"]) == (TOKEN_A, "prune_max")
    assert (refused["people"], refused["remove"]) == (88, 44)
    assert read_report(tmp_path / "r1.jsonl")[-1]["prunes_refused"] == 1
    spawn(*run_args(source, url, tmp_path / "r2.jsonl", "--prune", "--prune-max",
                    "100%")).expect(0, timeout=60)  # fmt: skip
    after = state(url, TOKEN_A)
    assert set(after["invitees"]) == after["invited"] == set(PEOPLE[:44])


def test_one_unreadable_row_prunes_nothing_and_exits_non_zero(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """A list with one row that cannot be read (broken quoting) prunes nothing anywhere:
    no PUT, no DELETE; the refusal names the line; exit 1."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    source = write_list(tmp_path, [(TOKEN_A, e) for e in KEPT], extra='"broken,row\n')
    before = state(url, TOKEN_A)
    spawn(*run_args(source, url, tmp_path / "r.jsonl", "--prune")).expect(1, timeout=60)
    assert state(url, TOKEN_A) == before
    assert "PUT" not in methods(url)
    assert "DELETE" not in methods(url)
    [refused] = by_kind(read_report(tmp_path / "r.jsonl"), "prune_refused")
    assert refused["code"] == "input_unreadable"
    assert "line 82" in refused["message"]


def test_the_dry_run_reads_only_and_names_the_8(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """--dry-run --preflight --prune: GETs only; the plan counts per token whom it would
    invite, skip and remove, and its file names exactly the 8 addresses."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    plan = tmp_path / "plan.jsonl"
    # Exit 1, as the run would: it would refuse the 5 not yet allowed.
    spawn(*run_args(write_list(tmp_path, THE_LIST), url, plan, "--dry-run", "--preflight",
                    "--prune")).expect(1, timeout=60)  # fmt: skip
    assert methods(url).keys() == {"GET"}
    records = read_report(plan)
    planned = by_kind(records, "revoked")
    assert sorted(e for r in planned for e in r["emails"]) == sorted(GONE)
    assert all(r["planned"] is True for r in planned)
    counts = records[-1]["preflight"][TOKEN_A]
    assert counts["would remove"] == 8
    assert counts["would refuse: not_on_share_list"] == 5  # not invitees yet
    assert counts["would skip: already_invited"] + counts["would skip: active_session"] == 80
    assert records[-1]["emails_revoked"] == 0
    assert len(state(url, TOKEN_A)["invitees"]) == 88


def test_the_dry_run_with_add_invitees_plans_what_the_run_then_does(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """--dry-run --preflight --prune --add-invitees: GETs only; the 5 not yet allowed are
    planned as invitees to add and send, not refused; the run then adds and sends them."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    source = write_list(tmp_path, THE_LIST)
    plan = tmp_path / "plan.jsonl"
    options = ("--prune", "--add-invitees", "--access-expires", "7d")
    spawn(*run_args(source, url, plan, "--dry-run", "--preflight",
                    *options)).expect(0, timeout=60)  # fmt: skip
    assert methods(url).keys() == {"GET"}
    assert len(state(url, TOKEN_A)["invitees"]) == 88
    records = read_report(plan)
    counts = records[-1]["preflight"][TOKEN_A]
    assert (counts["would add invitee"], counts["would send"], counts["would remove"]) == (5, 5, 8)
    assert not any(k.startswith("would refuse") for k in counts)
    planned = by_kind(records, "batch")
    assert sorted(e for r in planned for e in r["emails"]) == sorted(NEW)
    assert sorted(e for r in planned for e in r["invitees_to_add"]) == sorted(NEW)
    spawn(*run_args(source, url, tmp_path / "run.jsonl", *options)).expect(0, timeout=60)
    summary = read_report(tmp_path / "run.jsonl")[-1]
    assert (summary["invitees_added"], summary["emails_sent"], summary["emails_revoked"]) == (
        5, 5, 8)  # fmt: skip
    after = state(url, TOKEN_A)
    assert set(after["invitees"]) == set(KEPT + NEW)
    assert after["invited"] >= set(NEW)


def test_a_second_identical_run_changes_nothing(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """The same list again: no POST, no PUT, no DELETE; nothing revoked; exit 0."""
    url = start_emulator("--dashboards", seed(tmp_path, [eighty_eight()]))
    source = write_list(tmp_path, THE_LIST)
    for name in ("r1.jsonl", "r2.jsonl"):
        if name == "r2.jsonl":
            first = methods(url)
        spawn(*run_args(source, url, tmp_path / name, "--add-invitees",
                        "--prune")).expect(0, timeout=60)  # fmt: skip
    second = methods(url)
    assert {m: second[m] - first.get(m, 0) for m in second if m != "GET"} == {
        m: 0 for m in second if m != "GET"
    }
    summary = read_report(tmp_path / "r2.jsonl")[-1]
    assert (summary["emails_revoked"], summary["emails_sent"]) == (0, 0)


def test_access_expires_sets_the_expiration_of_the_invitees_it_adds_and_only_theirs(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """--add-invitees --access-expires 7d: the invitees added expire in 7 days, and their
    batch records say when; existing ones keep theirs (none, or the date they had)."""
    later = "2031-01-02T03:04:05+00:00"
    url = start_emulator("--dashboards", seed(tmp_path, [{"token": TOKEN_A, "invitees": [
        {"email": "old@example.com"},
        {"email": "dated@example.com", "access_expiration": later}]}]))  # fmt: skip
    pairs = [(TOKEN_A, e) for e in ["old@example.com", "dated@example.com", *NEW]]
    started = time.time()
    spawn(*run_args(write_list(tmp_path, pairs), url, tmp_path / "r.jsonl", "--add-invitees",
                    "--access-expires", "7d")).expect(0, timeout=60)  # fmt: skip
    invitees = state(url, TOKEN_A)["invitees"]
    assert invitees["old@example.com"] is None
    assert datetime.fromisoformat(invitees["dated@example.com"]) == datetime.fromisoformat(later)
    for email in NEW:
        expires = datetime.fromisoformat(invitees[email]).timestamp()
        assert started + 7 * 86400 - 2 <= expires <= time.time() + 7 * 86400 + 1
    # The report says whom the run granted access, and until when, as the service holds it.
    added = [b for b in by_kind(read_report(tmp_path / "r.jsonl"), "batch")
             if b.get("invitees_added")]  # fmt: skip
    assert sorted(e for b in added for e in b["invitees_added"]) == sorted(NEW)
    for batch in added:
        for email in batch["invitees_added"]:
            assert datetime.fromisoformat(batch["access_expiration"]) == datetime.fromisoformat(
                invitees[email]
            )


def test_a_run_killed_mid_prune_is_finished_by_running_again(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGKILL while revoking (one address per DELETE, three requests a second), then the
    same command with --resume: the dashboard ends as the list says, nobody is emailed
    twice, and every removed address is recorded as revoked."""
    board = {"token": TOKEN_A, "invitees": [{"email": e} for e in PEOPLE[:24]],
             "share_list": PEOPLE[12:24], "invited": PEOPLE[:24]}  # fmt: skip
    url = start_emulator("--dashboards", seed(tmp_path, [board]), "--limit", "3", "--period",
                         "1")  # fmt: skip
    source = write_list(tmp_path, [(TOKEN_A, e) for e in PEOPLE[:6]])
    report = tmp_path / "r.jsonl"
    args = run_args(source, url, report, "--prune", "--prune-max", "100%", "--batch-size", "1")
    first = spawn(*args)
    wait_for_deletes(url, 3)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=10)
    middle = state(url, TOKEN_A)
    assert set(PEOPLE[6:24]) & middle["invited"], "killed too late to test anything"
    spawn(*args, "--resume").expect(0, timeout=90)
    after = state(url, TOKEN_A)
    assert set(after["invitees"]) == after["invited"] == set(PEOPLE[:6])
    assert not after["share_list"]
    assert max(emulator_invited(url).values()) == 1
    revoked = {e for r in by_kind(read_report(report), "revoked") for e in r["emails"]}
    assert revoked == set(PEOPLE[6:24])


def test_a_served_person_the_list_drops_leaves_the_jobs_served_count(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """Skipped on day 1 as already invited, then dropped by the list and revoked by
    --prune on day 2: the job's totals no longer count them served, as `report
    summarize` does not."""
    people = [f"w{i}@example.com" for i in range(6)]
    boards = [{"token": TOKEN_A, "invitees": [{"email": e} for e in people],
               "invited": people[:1]}]  # fmt: skip
    url = start_emulator("--dashboards", seed(tmp_path, boards))
    report = tmp_path / "w.jsonl"
    every = write_list(tmp_path, [(TOKEN_A, e) for e in people])
    spawn(*run_args(every, url, report, "--prune")).expect(0, timeout=60)
    first = by_kind(read_report(report), "summary")[-1]
    assert (first["emails_sent"], first["emails_skipped"]) == (5, 1)
    (tmp_path / "fewer.csv").write_text(rows_csv([(TOKEN_A, e) for e in people[1:]]))
    spawn(*run_args(str(tmp_path / "fewer.csv"), url, report, "--prune", "--resume",
                    "--prune-max", "100%")).expect(0, timeout=60)  # fmt: skip
    second = by_kind(read_report(report), "summary")[-1]
    assert second["emails_revoked"] == 1
    totals = Replay.read(report).summary()
    assert (totals["sent"], totals["skipped"], totals["revoked"]) == (5, 0, 1)
    assert (second["job"]["emails_sent"], second["job"]["emails_skipped"]) == (5, 0)


@pytest.mark.parametrize("explicit", [False, True], ids=["sandbox_rule", "invitees"])
def test_a_person_pruned_then_listed_again_is_invited_again_on_resume(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc], explicit: bool
) -> None:
    """The daily job (--prune --resume, one report): a person the list drops is revoked, and
    when the list names them again the next day they are invited once more (added back as
    an invitee with --add-invitees), with no listing to settle the request that first sent
    them; nobody else is invited twice, and `report summarize`, like each run's job totals,
    counts them sent once, and not while they are revoked."""
    people = [f"v{i}@example.com" for i in range(20)]
    boards = [{"token": TOKEN_A, "invitees": [{"email": e} for e in people]}] if explicit else []
    url = start_emulator("--dashboards", seed(tmp_path, boards))
    every = write_list(tmp_path, [(TOKEN_A, e) for e in people])
    (tmp_path / "without-v1.csv").write_text(
        rows_csv([(TOKEN_A, e) for e in people if e != people[1]]))  # fmt: skip
    report = tmp_path / "v.jsonl"
    extra = ["--add-invitees"] if explicit else []

    runs: list[Proc] = []

    def day(source: str, *more: str) -> dict[str, Any]:
        runs.append(spawn(*run_args(source, url, report, "--prune", *extra, *more)))
        runs[-1].expect(0, timeout=60)
        summary: dict[str, Any] = by_kind(read_report(report), "summary")[-1]
        return summary

    assert day(every)["emails_sent"] == 20
    second = day(str(tmp_path / "without-v1.csv"), "--resume")
    assert (second["emails_sent"], second["emails_revoked"]) == (0, 1)
    assert people[1] not in state(url, TOKEN_A)["invited"]
    totals = Replay.read(report).summary()
    assert (totals["sent"], totals["revoked"]) == (19, 1)
    assert second["job"]["emails_sent"] == 19
    # Every page --prune read counts (none of the check's: the rows were settled).
    assert second["list_pages"] == second["requests_by_kind"]["list_invitations"] >= 1
    third = day(every, "--resume")
    assert (third["emails_sent"], third["skipped"]) == (1, 19)
    assert third["job"]["emails_sent"] == 20
    assert "resume.reconciling" not in runs[-1].stderr()
    after = state(url, TOKEN_A)
    assert after["invited"] == set(people)
    if explicit:
        assert set(after["invitees"]) == set(people)
    invited = emulator_invited(url)
    assert invited.pop((TOKEN_A, people[1])) == 2  # day 1, and day 3 after the revocation
    assert set(invited.values()) == {1}
    assert api(url, "/_emulator/stats")["duplicates"] == 1
    totals = Replay.read(report).summary()
    assert (totals["sent"], totals["revoked"]) == (20, 1)
    day(every, "--resume")  # a fourth day changes nothing: v1 is settled again
    assert api(url, "/_emulator/stats")["duplicates"] == 1


# -- the guards, the removal's discipline and the listing, against an in-process emulator --


def board_of(emulator: Emulator, token: str, people: list[str]) -> Dashboard:
    """A dashboard whose people are all invitees, each invited once."""
    board = emulator.add_dashboard(token, invitees=people)
    emulator.seed([board])
    for email in people:
        board.invitations.append((email, time.time() - 60))
        emulator.invited[(token, email.lower())] += 1
    return board


def held(board: Dashboard) -> set[str]:
    """Everyone a dashboard holds: invitees, share list, invitations."""
    invitees = set(board.invitees or {})
    return invitees | (board.share_list or set()) | {e.lower() for e, _ in board.invitations}


def cut_short(emulator: Emulator) -> Dashboard:
    """TOKEN_A as a removal killed between its PUT and its DELETE leaves it: p0..p5 all
    invited, p4 and p5 no longer invitees (and nothing recorded of it)."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:6])
    assert board.invitees is not None
    for email in PEOPLE[4:6]:
        del board.invitees[email]
    return board


async def test_add_invitees_adds_back_the_invited_whom_a_cut_short_removal_left_unallowed(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """p4 and p5 back on the list hold an invitation but no entry (a prune stopped after
    its PUT): the send skips them as served, so --prune --add-invitees adds them back to
    the invitees (a skipped record names them in invitees_added), sends nobody, exit 0."""
    board = cut_short(emulator)
    config = make_config(prune=True, add_invitees=True, prune_max=PruneMax(None, 100.0))
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert result.exit_code == 0, result.summary
    assert set(board.invitees or {}) == set(PEOPLE[:6])
    assert "POST" not in {r.method for r in emulator.requests}
    assert all(n == 1 for n in emulator.invited.values())
    restored = [r for r in by_kind(read_report(config.report_path), "skipped")
                if "invitees_added" in r]  # fmt: skip
    assert [(r["emails"], r["invitees_added"]) for r in restored] == [(PEOPLE[4:6], PEOPLE[4:6])]
    assert restored[0]["access_expiration"] is None
    summary = result.summary
    assert summary.prune is not None
    assert (summary.invitees_added, summary.emails_skipped, summary.prune.emails_revoked) == (
        2, 6, 0)  # fmt: skip
    [logged] = find_capture(logs, "prune.restored")
    assert logged["emails"] == 2
    # report summarize counts them added, and the record is no pair's outcome.
    totals = Replay.read(config.report_path).summary()
    assert (totals["invitees_added"], totals["skipped"]) == (2, 6)


@pytest.mark.parametrize("board_is", ["paused", "open"])
async def test_nobody_is_added_back_to_a_dashboard_the_check_refuses_to_send_to(
    emulator: Emulator, make_config: Callable[..., Config], board_is: str
) -> None:
    """A paused dashboard, or one not shared invite-only, is never sent to: the survey adds
    nobody back to it either (no PUT), however its entries stand."""
    board = cut_short(emulator)
    if board_is == "paused":
        board.status = "paused"
    else:
        board.share_type = "open"
    config = make_config(prune=True, add_invitees=True, prune_max=PruneMax(None, 100.0))
    await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert "PUT" not in {r.method for r in emulator.requests}
    assert set(board.invitees or {}) == set(PEOPLE[:4])


async def test_a_dashboard_whose_invitees_cannot_be_added_back_is_left_whole(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Someone edits the dashboard at every read the adding makes: p4 and p5 cannot be
    added back, which is recorded (invitee_update_failed, exit 1), and p6, whom the list
    no longer names, is not removed either: a refused dashboard is left whole."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:7])
    assert board.invitees is not None
    for email in PEOPLE[4:6]:
        del board.invitees[email]

    def someone_else(dashboard: Dashboard) -> None:
        dashboard.title += "!"

    emulator.before_read[TOKEN_A] = [None, *[someone_else] * 6]  # the survey's read, then
    config = make_config(prune=True, add_invitees=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert result.exit_code == 1
    assert "PUT" not in {r.method for r in emulator.requests}
    assert held(board) == set(PEOPLE[:7])
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "invitee_update_failed"
    assert "nobody was removed from it" in refused["message"]


async def test_without_add_invitees_the_invited_but_unallowed_are_only_logged(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The same dashboard pruned without --add-invitees: nothing is written to it (the
    run adds no invitee), and prune.not_allowed says how many and what would help."""
    board = cut_short(emulator)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == set(PEOPLE[:4])
    assert {r.method for r in emulator.requests} == {"GET"}
    [logged] = find_capture(logs, "prune.not_allowed")
    assert logged["emails"] == 2
    assert "--add-invitees" in logged["action"]


async def test_a_plan_counts_whom_add_invitees_would_add_among_the_dashboards_people(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """p0..p11 held, the list naming p0..p9 and ten new people: the run adds the ten, then
    removes p10 and p11 (2 of 22, under --prune-max 10%), so the plan, which reads the
    dashboard before any addition, counts the ten too and plans the same removal."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:12])
    new = [f"w{i}@example.com" for i in range(10)]
    pairs = [(TOKEN_A, e) for e in PEOPLE[:10] + new]
    config = make_config(prune=True, add_invitees=True, prune_max=PruneMax.parse("10%"))
    plan = dataclasses.replace(config, report_path=config.report_path.with_name("plan.jsonl"))
    await dry_run(plan, csv_source(rows_csv(pairs)), preflight=True, out=io.StringIO())
    records = read_report(plan.report_path)
    counts = records[-1]["preflight"][TOKEN_A]
    assert (counts["would add invitee"], counts["would remove"]) == (10, 2)
    assert not any(k.startswith("would refuse") for k in counts)
    result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 0
    assert result.summary.prune is not None
    assert result.summary.prune.emails_revoked == 2
    assert held(board) == set(PEOPLE[:10] + new)


async def test_the_plan_of_a_list_with_an_unreadable_row_says_it_removes_nobody_anywhere(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--dry-run --preflight --prune of a list with a row that cannot be read, over two
    dashboards: the plan says it would remove nobody from any dashboard, not that it
    would leave one whole."""
    board_of(emulator, TOKEN_A, PEOPLE[:3])
    board_of(emulator, TOKEN_B, PEOPLE[:3])
    text = rows_csv([(TOKEN_A, PEOPLE[0]), (TOKEN_B, PEOPLE[0])]) + '"broken,row\n'
    out = io.StringIO()
    await dry_run(make_config(prune=True), csv_source(text), preflight=True, out=out)
    assert "--prune would remove nobody from any dashboard" in out.getvalue()
    assert "would leave whole" not in out.getvalue()


async def test_an_address_rejection_spares_its_token_and_duplicates_are_harmless(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A token with a row rejected for its address (invalid_email) is not pruned, and the
    refusal is recorded; another token of the same list is, duplicate rows and all."""
    a = board_of(emulator, TOKEN_A, PEOPLE[:20])
    b = board_of(emulator, TOKEN_B, PEOPLE[:20])
    pairs = [(TOKEN_A, e) for e in PEOPLE[:19]] + [(TOKEN_B, e) for e in PEOPLE[:19]]
    text = rows_csv([*pairs, (TOKEN_B, PEOPLE[0].upper())]) + f"{TOKEN_A},not-an-address\n"
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(text))
    assert result.exit_code == 1
    assert held(a) == set(PEOPLE[:20])
    assert held(b) == set(PEOPLE[:19])
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert (refused["token"], refused["code"]) == (TOKEN_A, "rejected_rows")
    assert result.summary.prune is not None
    assert result.summary.prune.emails_revoked == 1


async def test_a_token_spelled_two_ways_is_pruned_under_neither_and_says_so(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The list names TOKEN_A in lower case and, for someone else, in upper case: neither
    spelling's dashboard is pruned, one prune_refused record (token_spellings) names both
    spellings, and TOKEN_B's dashboard is pruned as usual; exit 1."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])
    upper = board_of(emulator, TOKEN_A.upper(), PEOPLE[10:12])
    other = board_of(emulator, TOKEN_B, PEOPLE[20:23])
    rows = [(TOKEN_A, PEOPLE[0]), (TOKEN_A.upper(), PEOPLE[10]), (TOKEN_B, PEOPLE[20])]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv(rows)))
    assert result.exit_code == 1
    assert held(board) == set(PEOPLE[:4])
    assert held(upper) == set(PEOPLE[10:12])
    assert held(other) == {PEOPLE[20]}
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "token_spellings"
    assert TOKEN_A in refused["message"]
    assert TOKEN_A.upper() in refused["message"]


async def test_an_empty_list_prunes_nothing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A list with a header and no row (or only a blank line) is refused before anything
    starts: nobody is removed anywhere, no request is made."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:5])
    for text in ("token,email\n", "token,email\n\n"):
        with pytest.raises(UsageError):
            await run(make_config(prune=True, prune_max=PruneMax(None, 100.0), overwrite=True),
                      csv_source(text))  # fmt: skip
    assert held(board) == set(PEOPLE[:5])
    assert emulator.requests == []


async def test_removal_keeps_an_edit_made_between_its_reads(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Someone adds an invitee between the removal's two reads: it reads again, and both
    that addition and the removal hold; the share list keeps what the list names."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])
    board.share_list = {PEOPLE[0], PEOPLE[3]}

    def someone_else(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees["colleague@example.com"] = Invitee("colleague@example.com")

    # Reads: the survey's, then the removal's first and second (everyone listed was
    # invited, so the preflight reads no dashboard).
    emulator.before_read[TOKEN_A] = [None, None, someone_else]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {*PEOPLE[:2], "colleague@example.com"}
    assert board.share_list == {PEOPLE[0]}
    assert {e for e, _ in board.invitations} == set(PEOPLE[:2])
    assert [r.method for r in emulator.requests].count("PUT") == 1
    removed = {e: r["removed"] for r in by_kind(read_report(config.report_path), "revoked")
               for e in r["emails"]}  # fmt: skip
    assert removed == {PEOPLE[2]: ["invitation", "invitee"],
                       PEOPLE[3]: ["invitation", "invitee", "share_list"]}  # fmt: skip


async def test_removal_reads_again_rather_than_repeat_a_refused_write(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The removal's PUT is refused (a 503) while someone adds an invitee: the write is
    not sent again as it was (that would drop the colleague), the dashboard is read
    again and the next write keeps the colleague and removes p2 and p3."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])

    def someone_else_then_refused(dashboard: Dashboard) -> int:
        assert dashboard.invitees is not None
        dashboard.invitees["colleague@example.com"] = Invitee("colleague@example.com")
        return 503

    emulator.before_write[TOKEN_A] = [someone_else_then_refused]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {*PEOPLE[:2], "colleague@example.com"}
    assert [r.method for r in emulator.requests].count("PUT") == 2
    removed = {e: r["removed"] for r in by_kind(read_report(config.report_path), "revoked")
               for e in r["emails"]}  # fmt: skip
    assert removed == {p: ["invitation", "invitee"] for p in PEOPLE[2:4]}


async def test_an_unanswered_removal_that_was_applied_is_recorded_and_not_repeated(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The removal's PUT is applied but its answer never comes: the next reads show p2's
    and p3's entries gone, so no second PUT goes, their entries are recorded taken and
    their invitations revoked."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])
    emulator.before_write[TOKEN_A] = [lambda _: DROP]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])))
    assert result.exit_code == 0
    assert set(board.invitees or {}) == set(PEOPLE[:2])
    assert {e for e, _ in board.invitations} == set(PEOPLE[:2])
    assert [r.method for r in emulator.requests].count("PUT") == 1
    removed = {e: r["removed"] for r in by_kind(read_report(config.report_path), "revoked")
               for e in r["emails"]}  # fmt: skip
    assert removed == {p: ["invitation", "invitee"] for p in PEOPLE[2:4]}


async def test_with_fsync_a_revocation_is_on_disk_before_its_delete_leaves(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fsync: the report's record of a revocation is fdatasync'd before its DELETE
    leaves, so a power loss after the DELETE cannot take the record of whom it revoked."""
    board_of(emulator, TOKEN_A, PEOPLE[:4])
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), durable_journal=True)
    synced: list[tuple[int, set[str]]] = []  # DELETEs made, and who is recorded revoked
    real = AppendFile.sync_off_loop

    async def sync(self: AppendFile) -> None:
        await real(self)
        if self.path == config.report_path:
            revoked = by_kind(read_report(config.report_path), "revoked")
            deletes = [r.method for r in emulator.requests].count("DELETE")
            synced.append((deletes, {e for r in revoked for e in r["emails"]}))

    monkeypatch.setattr(AppendFile, "sync_off_loop", sync)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:2]])))
    assert result.exit_code == 0
    assert [r.method for r in emulator.requests].count("DELETE") == 1
    assert (0, set(PEOPLE[2:4])) in synced


async def test_a_stop_while_the_put_is_answered_still_records_the_entries_it_took(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop as the removal's PUT is applied (paced, so the read-back then waits and is
    stopped): p6's entry is gone, and its revoked record (invitee) is written before the
    run ends; the invitation stays for --resume (exit 3)."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:7])
    stop, update = asyncio.Event(), Dashboard.update

    def applied_then_stopped(self: Dashboard, body: Any, now: float) -> None:
        update(self, body, now)
        stop.set()

    monkeypatch.setattr(Dashboard, "update", applied_then_stopped)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), rate=5.0)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])), stop=stop)
    assert result.exit_code == 3
    assert set(board.invitees or {}) == set(PEOPLE[:6])
    assert "DELETE" not in {r.method for r in emulator.requests}
    revoked = by_kind(read_report(config.report_path), "revoked")
    assert [(r["emails"], r["removed"]) for r in revoked] == [([PEOPLE[6]], ["invitee"])]


async def test_a_kill_while_a_delete_is_out_leaves_a_report_that_invites_a_returning_person(
    emulator: Emulator,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The report as a kill -9 finds it while a DELETE is out (applied, its answer not yet
    come) already says p6 revoked; the next day's --resume --prune --add-invitees, p6
    back on the list, invites p6 again with the entry added back, where a report still
    saying p6 served would have skipped p6, left with neither."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:7])
    revoke, out = InvitationClient.revoke, asyncio.Event()

    async def applied_never_answered(self: InvitationClient, token: str, emails: list[str]) -> Any:
        await revoke(self, token, emails)
        out.set()
        await asyncio.Event().wait()  # the answer never comes: killed meanwhile

    config = make_config(prune=True, add_invitees=True, prune_max=PruneMax(None, 100.0))
    day1 = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:7]])))
    assert day1.summary.emails_skipped == 7  # served, as the report now says
    monkeypatch.setattr(InvitationClient, "revoke", applied_never_answered)
    config = dataclasses.replace(config, resume=True, overwrite=False)
    day2 = asyncio.create_task(
        run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    )
    await asyncio.wait_for(out.wait(), 20)
    killed = tmp_path / "killed.jsonl"  # what a kill -9 leaves at this moment
    shutil.copy(config.report_path, killed)
    day2.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await day2
    monkeypatch.setattr(InvitationClient, "revoke", revoke)
    assert PEOPLE[6] not in (board.invitees or {})
    assert PEOPLE[6] not in {e for e, _ in board.invitations}
    day3 = make_config(prune=True, add_invitees=True, prune_max=PruneMax(None, 100.0),
                       report_path=killed, resume=True)  # fmt: skip
    result = await run(day3, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:7]])))
    assert result.exit_code == 0, result.summary
    assert PEOPLE[6] in (board.invitees or {})
    assert PEOPLE[6] in {e for e, _ in board.invitations}
    assert emulator.invited[(TOKEN_A, PEOPLE[6])] == 2  # revoked, then invited anew


async def test_a_stop_while_the_removal_reads_makes_no_put(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop while the removal reads the dashboard (no wait to end, so nothing else would
    notice it): no PUT, nothing taken, nothing recorded, exit 3."""
    board_of(emulator, TOKEN_A, PEOPLE[:7])
    stop = asyncio.Event()
    # The survey's read, then the removal's first.
    emulator.before_read[TOKEN_A] = [None, lambda _: stop.set()]
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])), stop=stop)
    assert result.exit_code == 3
    assert {r.method for r in emulator.requests} == {"GET"}
    assert by_kind(read_report(config.report_path), "revoked") == []


async def test_a_read_back_showing_one_entry_back_records_the_other_taken(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """p5 and p6 removed by the PUT, then someone adds p5 back before the read-back: the
    dashboard is refused (prune_update_failed, no DELETE), and p6's entry, gone all the
    same, has its revoked record; the message says so."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:7])

    def p5_back(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees[PEOPLE[5]] = Invitee(PEOPLE[5])

    emulator.before_read[TOKEN_A] = [None, None, None, p5_back]  # survey, two reads, read-back
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:5]])))
    assert result.exit_code == 1
    assert "DELETE" not in {r.method for r in emulator.requests}
    assert set(board.invitees or {}) == set(PEOPLE[:6])
    records = read_report(config.report_path)
    revoked = by_kind(records, "revoked")
    assert [(r["emails"], r["removed"]) for r in revoked] == [([PEOPLE[6]], ["invitee"])]
    [refused] = by_kind(records, "prune_refused")
    assert "1 people's entries are gone all the same (recorded)" in refused["message"]


async def test_a_failed_edit_keeps_its_refusal_when_the_report_refuses_what_it_took(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal of a dashboard whose edit failed is recorded before the entries the
    edit took all the same: when the report then refuses those (a full disk), the run
    still says the dashboard was left whole (prune_refused), and it halts (exit 3)."""
    board_of(emulator, TOKEN_A, PEOPLE[:7])

    def p5_back(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees[PEOPLE[5]] = Invitee(PEOPLE[5])

    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StorageError(config.report_path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(Report, "revoked", disk_full)
    emulator.before_read[TOKEN_A] = [None, None, None, p5_back]  # survey, two reads, read-back
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:5]])))
    assert result.exit_code == 3
    assert result.summary.prune is not None
    assert result.summary.prune.prune_refused_by_code == {"prune_update_failed": 1}
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "prune_update_failed"


async def test_a_stop_lets_another_dashboards_put_in_flight_finish_and_be_recorded(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two dashboards pruned at once; the stop comes while B's PUT, applied, is still
    answering: A's worker ends at its next wait, B's PUT is not cancelled but answered, and
    p6's entry on each dashboard it left has its revoked record (exit 3)."""
    a, b = board_of(emulator, TOKEN_A, PEOPLE[:7]), board_of(emulator, TOKEN_B, PEOPLE[:7])
    put, stop = InvitationClient.put_dashboard, asyncio.Event()

    async def slow_to_answer(self: InvitationClient, token: str, body: Any) -> Any:
        answer = await put(self, token, body)  # applied by the service
        if token == TOKEN_B:
            stop.set()
            await asyncio.sleep(0.5)  # its answer still on the way
        return answer

    monkeypatch.setattr(InvitationClient, "put_dashboard", slow_to_answer)
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), concurrency=2, rate=5.0)
    pairs = [(t, e) for t in (TOKEN_A, TOKEN_B) for e in PEOPLE[:6]]
    result = await run(config, csv_source(rows_csv(pairs)), stop=stop)
    assert result.exit_code == 3
    gone = {
        t for t, board in ((TOKEN_A, a), (TOKEN_B, b)) if PEOPLE[6] not in (board.invitees or {})
    }
    assert TOKEN_B in gone
    revoked = by_kind(read_report(config.report_path), "revoked")
    assert {r["token"] for r in revoked} == gone
    assert all(r["emails"] == [PEOPLE[6]] for r in revoked)


async def test_a_read_back_showing_one_of_two_entries_back_records_the_other(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """p6 is an invitee and on the share list; the PUT takes both, and someone puts p6 back
    on the share list before the read-back: the invitee entry, gone all the same, has its
    record, and the refusal says one person's entries are gone."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:7])
    board.share_list = {PEOPLE[6]}

    def share_back(dashboard: Dashboard) -> None:
        dashboard.share_list = {PEOPLE[6]}

    emulator.before_read[TOKEN_A] = [None, None, None, share_back]  # survey, two reads, read-back
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:6]])))
    assert result.exit_code == 1
    assert PEOPLE[6] not in (board.invitees or {})
    records = read_report(config.report_path)
    revoked = by_kind(records, "revoked")
    assert [(r["emails"], r["removed"]) for r in revoked] == [([PEOPLE[6]], ["invitee"])]
    [refused] = by_kind(records, "prune_refused")
    assert "1 people's entries are gone all the same (recorded)" in refused["message"]


async def test_a_removal_the_read_back_does_not_show_leaves_the_invitations_and_exits_1(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The read-back shows a removed invitee back (someone re-added it at once): the
    dashboard's refusal is recorded (prune_update_failed), no DELETE, exit 1."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:4])

    def re_added(dashboard: Dashboard) -> None:
        assert dashboard.invitees is not None
        dashboard.invitees[PEOPLE[3]] = Invitee(PEOPLE[3])

    emulator.before_read[TOKEN_A] = [None, None, None, re_added]  # no preflight read: all invited
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:3]])))
    assert result.exit_code == 1
    assert "DELETE" not in {r.method for r in emulator.requests}
    assert len(board.invitations) == 4
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "prune_update_failed"


async def test_a_listing_shorter_than_asked_is_read_on_to_its_total_count(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Pages of 150 asked, 100 honored: the survey goes on at 100 until total_count, so
    the 250th invitation's holder is found too."""
    board = emulator.add_dashboard(TOKEN_A, invitees=[])
    people = [f"q{i}@example.com" for i in range(250)]
    board.invitations = [(e, time.time()) for e in people]
    config = make_config()
    async with client_for(config) as client:
        pruner = Pruner(client, pacer_for(config, SystemClock()), RetryPolicy(2, 0.01, 0.02),
                        SystemClock(), random.Random(0), batch_size=10, page_size=150)  # fmt: skip
        survey = await pruner.survey(TOKEN_A, lambda emails: [e != people[-1] for e in emails])
    assert survey is not None
    assert survey.people == 250
    assert list(survey.remove) == [people[-1]]
    assert pruner.requests["list_invitations"] == 3


@pytest.mark.parametrize("with_total", [True, False])
async def test_pages_cut_shorter_each_time_never_end_a_survey_early(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, with_total: bool
) -> None:
    """A service serving 60, then 45, then 12 a page (page_number times the size asked): a
    page holding only entries already read is a smaller size, not the end, so the survey
    finds the 300th invitation's holder too, with or without total_count."""

    from worker.emulator.invitations import Invitations

    caps = iter([60, 45])

    async def listing(
        self: Invitations, request: web.Request, log: Any, headers: dict[str, str],
        board: Dashboard,
    ) -> web.StreamResponse:  # fmt: skip
        asked, number = int(request.query["page_size"]), int(request.query["page_number"])
        page = board.invitations[number * asked : number * asked + min(asked, next(caps, 12))]
        body: dict[str, Any] = {"data": [board.invitation(e, t, 0.0) for e, t in page]}
        if with_total:
            body["meta"] = {"page": {"total_count": len(board.invitations)}}
        answer: web.StreamResponse = log(web.json_response(body, headers=headers))
        return answer

    monkeypatch.setattr(Invitations, "_list", listing)  # before the emulator binds it
    people = [f"q{i}@example.com" for i in range(300)]
    async with Emulator(api_key=API_KEY, app_key=APP_KEY) as emulator:
        board = emulator.add_dashboard(TOKEN_A, invitees=[])
        board.invitations = [(e, time.time()) for e in people]
        config = make_config(api_url=emulator.url)
        async with client_for(config) as client:
            pruner = Pruner(client, pacer_for(config, SystemClock()), RetryPolicy(2, 0.01, 0.02),
                            SystemClock(), random.Random(0), batch_size=10,
                            page_size=100)  # fmt: skip
            survey = await pruner.survey(TOKEN_A, lambda es: [e != people[-1] for e in es])
    assert survey is not None
    assert survey.people == 300
    assert list(survey.remove) == [people[-1]]


#: The invitations of the dashboard surveyed while its listing moves.
SURVEYED = [f"q{i}@example.com" for i in range(200)]


@contextlib.asynccontextmanager
async def surveying(
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., Config],
    change: Callable[[Dashboard, int, int], tuple[int, web.StreamResponse | None]],
) -> AsyncIterator[tuple[Pruner, Emulator]]:
    """A pruner (pages of 100, retrying at once) of TOKEN_A, whose dashboard has no
    invitees and invites SURVEYED, on an emulator whose listing runs ``change`` first
    (see ``served_as``)."""
    async with served_as(monkeypatch, change) as emulator:
        board = emulator.add_dashboard(TOKEN_A, invitees=[])
        board.invitations = [(e, time.time()) for e in SURVEYED]
        config = make_config(api_url=emulator.url)
        async with client_for(config) as client:
            yield Pruner(client, pacer_for(config, SystemClock()), RetryPolicy(2, 0.01, 0.02),
                         SystemClock(), random.Random(0), batch_size=10,
                         page_size=100), emulator  # fmt: skip


async def test_invitations_revoked_while_a_survey_reads_make_it_survey_again(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten invitations revoked by someone else right after page 0 is served move ten others
    back onto that page: total_count went down, so the dashboard is surveyed again, and
    those ten, whom the list does not name, are found for removal."""
    unnamed = set(SURVEYED[100:110])

    def revoke_after_first_page(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 1 and times == 1:
            board.invitations = [(e, t) for e, t in board.invitations if e not in SURVEYED[:10]]
        return number, None

    async with surveying(monkeypatch, make_config, revoke_after_first_page) as (pruner, _):
        with capture_logs() as logs:
            survey = await pruner.survey(TOKEN_A, lambda es: [e not in unnamed for e in es])
    assert survey is not None
    assert set(survey.remove) == unnamed
    assert survey.people == 190
    assert pruner.requests["dashboard"] == 2
    assert pruner.pages == pruner.requests["list_invitations"] == 4
    [moved] = find_capture(logs, "prune.list_moved")
    assert "total_count went down from 200 to 190" in moved["why"]


async def test_a_404_after_the_first_page_makes_the_survey_read_again(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page 1 answers 404 once while the dashboard stays: not "no dashboard" (which would
    remove nobody, silently) but a listing that moved, so the dashboard is surveyed again
    and the unnamed holder of the 150th invitation is found (prune.listed logged)."""

    def gone_once(board: Dashboard, number: int, times: int) -> tuple[int, Any]:
        if number == 1 and times == 1:
            return number, web.json_response({"errors": ["Not Found"]}, status=404)
        return number, None

    async with surveying(monkeypatch, make_config, gone_once) as (pruner, _):
        with capture_logs() as logs:
            survey = await pruner.survey(TOKEN_A, lambda es: [e != SURVEYED[150] for e in es])
    assert survey is not None
    assert list(survey.remove) == [SURVEYED[150]]
    [moved] = find_capture(logs, "prune.list_moved")
    assert "page 1 answered 404 after 100 were listed" in moved["why"]
    [listed] = find_capture(logs, "prune.listed")
    assert (listed["invitations"], listed["pages"]) == (200, 2)


async def test_a_stop_during_a_survey_removes_nothing(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the survey reads the listing: its answer still comes, but no PUT
    follows it, so no entry is taken away without its record (exit 3; --resume prunes)."""
    stop = asyncio.Event()

    def stop_at_the_survey(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if times == 2:  # the send's check read the listing first
            stop.set()
        return number, None

    async with served_as(monkeypatch, stop_at_the_survey) as emulator:
        board = board_of(emulator, TOKEN_A, PEOPLE[:7])
        config = make_config(api_url=emulator.url, prune=True, prune_max=PruneMax(None, 100.0))
        pairs = [(TOKEN_A, e) for e in PEOPLE[:6]]
        result = await run(config, csv_source(rows_csv(pairs)), stop=stop)
    assert result.exit_code == 3
    assert {r.method for r in emulator.requests} == {"GET"}
    assert held(board) == set(PEOPLE[:7])


async def test_a_listing_that_moves_at_every_survey_removes_nobody(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invitation revoked during every reading: after three surveys the dashboard is
    refused as listing_moved (saying the list kept changing), with nothing to remove."""

    def revoke_one_each_time(board: Dashboard, number: int, times: int) -> tuple[int, None]:
        if number == 1:
            board.invitations = board.invitations[1:]
        return number, None

    async with surveying(monkeypatch, make_config, revoke_one_each_time) as (pruner, emulator):
        with pytest.raises(ListingMoved, match="kept changing while it was read"):
            await pruner.survey(TOKEN_A, lambda es: [False] * len(es))
    assert pruner.requests["dashboard"] == LIST_ATTEMPTS
    assert pruner.pages == 2 * LIST_ATTEMPTS
    assert not [r for r in emulator.requests if r.method in ("PUT", "DELETE")]


async def test_the_emulator_revokes_object_and_list_forms_and_ends_sessions(
    emulator: Emulator,
) -> None:
    """DELETE .../invitation: 204 with an empty text/html body, for one object or a list;
    the invitations leave the listing and their sessions end."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:3])
    board.open_session(PEOPLE[0], time.time())
    url = f"{emulator.url}/api/v1/dashboard/public/{TOKEN_A}/invitation"
    keys = {"DD-API-KEY": API_KEY, "DD-APPLICATION-KEY": APP_KEY}
    item = {"type": "public_dashboard_invitation", "attributes": {"email": PEOPLE[0]}}
    items = [{"type": "public_dashboard_invitation", "attributes": {"email": e}}
             for e in PEOPLE[1:3]]  # fmt: skip
    async with aiohttp.ClientSession(headers=keys) as session:
        for body in ({"data": item}, {"data": items}):
            async with session.delete(url, json=body) as resp:
                assert resp.status == 204
                assert resp.content_type == "text/html"
                assert await resp.read() == b""
    assert board.invitations == []
    assert board.sessions == {}
    assert [(r.emails, r.list_form) for r in emulator.requests if r.method == "DELETE"] == [
        (1, False), (2, True)
    ]  # fmt: skip


def test_prune_options_misused_are_usage_errors(tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    """--prune with a stream, --prune-max without --prune, a bad --prune-max,
    --access-expires without --add-invitees, without a unit, with one it does not know
    or past 100 years, and a dry
    run of --prune without --preflight: exit 2, with the fix, before any request."""
    source = write_list(tmp_path, [(TOKEN_A, PEOPLE[0])])
    api_url = ("--api-url", "http://127.0.0.1:9")
    for args, says in (
        (("redis://127.0.0.1:9/0", "--stream", "s", "--prune"), "a stream has no end"),
        ((source, "--prune-max", "20%"), "add --prune"),
        ((source, "--prune", "--prune-max", "half"), "e.g. 10%, 100% or 25"),
        ((source, "--access-expires", "7d"), "add --add-invitees"),
        ((source, "--add-invitees", "--access-expires", "7"), "give --access-expires a unit"),
        ((source, "--add-invitees", "--access-expires", "1y"), "'y' is not a unit; use s, m"),
        ((source, "--add-invitees", "--access-expires", "99999999d"), "at most 36500d"),
        ((source, "--dry-run", "--prune"), "needs --preflight"),
    ):
        proc = spawn("run", *args, *api_url, "--report", str(tmp_path / "r.jsonl"))
        proc.expect(2, timeout=30)
        assert says in proc.stderr(), args


def test_a_prune_plan_is_replaced_by_the_next_dry_run(tmp_path: Path) -> None:
    """A dry run's plan may open with what --prune would do (a planned revoked record, a
    refusal): the next dry run replaces it; a report opening with a real revocation is
    a run's, and is kept."""
    plan = tmp_path / "plan.jsonl"
    revoked = {"kind": "revoked", "token": TOKEN_A, "emails": ["a@x.io"], "removed": ["invitee"]}
    refused = {"kind": "prune_refused", "token": TOKEN_B, "code": "prune_max", "message": "m"}
    for first, replaced in (({**revoked, "planned": True}, True), (refused, True),
                            (revoked, False)):  # fmt: skip
        plan.write_text(json.dumps(first) + "\n" + json.dumps({"kind": "summary",
                        "dry_run": True}) + "\n")  # fmt: skip
        assert reads_as_report(plan)
        assert holds_only_a_plan(plan) is replaced, first


def test_report_summarize_counts_a_removal_once_however_many_runs_recorded_it(
    tmp_path: Path,
) -> None:
    """One removal recorded by two runs (the entries by a run stopped after its PUT, the
    invitation by the next; a DELETE recorded as it left, then again by the run that
    made it) counts each person once, by what went too; a person sent again and then
    removed again counts twice."""
    report = tmp_path / "r.jsonl"
    a, b, c = "a@x.io", "B@x.io", "c@x.io"
    both = ["invitation", "invitee"]
    report.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "batch", "token": TOKEN_A, "emails": [a, b], "status": "sent"},
        {"kind": "revoked", "token": TOKEN_A, "emails": [a], "removed": ["invitee"]},
        {"kind": "revoked", "token": TOKEN_A, "emails": [b, c], "removed": both},
        {"kind": "summary", "requests": 2},
        {"kind": "revoked", "token": TOKEN_A, "emails": [a], "removed": ["invitation"]},
        {"kind": "revoked", "token": TOKEN_A, "emails": [b.lower(), c], "removed": ["invitation"]},
        {"kind": "summary", "requests": 2},
        {"kind": "batch", "token": TOKEN_A, "emails": [a], "status": "sent"},
        {"kind": "revoked", "token": TOKEN_A, "emails": [a], "removed": both},
        {"kind": "summary", "requests": 2},
    ]) + "\n")  # fmt: skip
    totals = Replay.read(report).summary()
    assert totals["revoked"] == 4  # a twice (sent again between), b and c once
    assert totals["revoked_by_what"] == {"invitation": 4, "invitee": 4}
    assert totals["sent"] == 0


def test_report_summarize_counts_revoked_emails_and_refused_prunes(tmp_path: Path) -> None:
    """`report summarize` adds up revoked records (planned ones apart) and refusals."""
    report = tmp_path / "r.jsonl"
    report.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "revoked", "token": TOKEN_A, "emails": ["a@x.io", "b@x.io"],
         "removed": ["invitation", "invitee"]},
        {"kind": "revoked", "token": TOKEN_A, "emails": ["c@x.io"], "removed": ["invitee"]},
        {"kind": "revoked", "token": TOKEN_B, "emails": ["d@x.io"], "removed": ["invitee"],
         "planned": True},
        {"kind": "prune_refused", "token": TOKEN_B, "code": "prune_max", "message": "m",
         "people": 10, "remove": 5},
        {"kind": "summary", "requests": 4},
    ]) + "\n")  # fmt: skip
    totals = Replay.read(report).summary()
    assert totals["revoked"] == 3
    assert totals["revoked_by_what"] == {"invitation": 2, "invitee": 3}
    assert totals["prune_refused_by_code"] == {"prune_max": 1}
    out = io.StringIO()
    print_summary(report, totals, out)
    assert "emails revoked" in out.getvalue()
    assert "prune_max" in out.getvalue()


async def test_metrics_and_the_table_count_revoked_emails_and_refused_prunes(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """emails.revoked (tagged with what was removed) and prunes.refused (by code) reach
    DogStatsD; the end-of-run table shows both."""
    for name in ("DD_TAGS", "DD_ENV", "DD_SERVICE", "DD_VERSION"):
        monkeypatch.delenv(name, raising=False)
    board_of(emulator, TOKEN_A, PEOPLE[:10])
    board_of(emulator, TOKEN_B, PEOPLE[:10])
    pairs = [(TOKEN_A, e) for e in PEOPLE[:9]] + [(TOKEN_B, e) for e in PEOPLE[:5]]
    agent = Agent()
    try:
        config = make_config(prune=True, statsd=agent.target)
        result = await run(config, csv_source(rows_csv(pairs)))
        agent.metrics(wait=2.0)
        assert agent.total("emails.revoked", "removed:invitation", "removed:invitee") == 1
        assert agent.total("prunes.refused", "code:prune_max") == 1
    finally:
        agent.sock.close()
    assert result.exit_code == 1
    out = io.StringIO()
    human_summary(result.summary, str(config.report_path), ["invite-worker"], out)
    assert "revoked (pruned)" in out.getvalue()
    assert "prune refused: prune_max" in out.getvalue()


async def test_revocations_refused_for_their_size_are_split_until_they_pass(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A service that takes at most 2 addresses per list: a DELETE of 5 refused with a 400
    is halved until every part passes; all 5 are revoked and recorded once each, and the
    summary counts the two halvings in splits."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:6])
    emulator.faults.max_batch = 2
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), batch_size=5)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, PEOPLE[0])])))
    assert result.exit_code == 0
    assert held(board) == {PEOPLE[0]}
    assert sorted(e for r in by_kind(read_report(config.report_path), "revoked")
                  for e in r["emails"]) == sorted(PEOPLE[1:6])  # fmt: skip
    ok = [r.emails for r in emulator.requests if r.method == "DELETE" and r.status == 204]
    assert sum(ok) == 5
    assert max(ok) <= 2
    assert result.summary.splits == 2


def test_sigterm_mid_prune_stops_at_once_and_resume_finishes(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGTERM while revoking: the run stops before its next DELETE (exit 3, nothing
    lost), and records the entries its PUT took from the people it did not revoke yet;
    --resume finishes the prune, and nobody is emailed twice."""
    board = {"token": TOKEN_A, "invitees": [{"email": e} for e in PEOPLE[:16]],
             "invited": PEOPLE[:16]}  # fmt: skip
    url = start_emulator("--dashboards", seed(tmp_path, [board]), "--limit", "3", "--period",
                         "1")  # fmt: skip
    source = write_list(tmp_path, [(TOKEN_A, e) for e in PEOPLE[:4]])
    report = tmp_path / "r.jsonl"
    args = run_args(source, url, report, "--prune", "--prune-max", "100%", "--batch-size", "1")
    first = spawn(*args)
    wait_for_deletes(url, 1)
    first.popen.send_signal(signal.SIGTERM)
    first.expect(3, timeout=20)
    assert read_report(report)[-1]["interrupted"] is True
    assert len(state(url, TOKEN_A)["invited"]) > 4, "stopped too late to test anything"
    entries = {e for r in by_kind(read_report(report), "revoked") if "invitee" in r["removed"]
               for e in r["emails"]}  # fmt: skip
    assert entries == set(PEOPLE[4:16])  # every entry the PUT took has its record
    spawn(*args, "--resume").expect(0, timeout=90)
    after = state(url, TOKEN_A)
    assert set(after["invitees"]) == after["invited"] == set(PEOPLE[:4])
    assert max(emulator_invited(url).values()) == 1
    # Two runs' records of one removal each: the job's totals count each person once.
    totals = Replay.read(report).summary()
    assert totals["revoked"] == 12
    assert totals["revoked_by_what"] == {"invitation": 12, "invitee": 12}


@pytest.mark.parametrize(
    ("reason", "token", "outcome"),
    [
        ("invalid_email", TOKEN_A, "blocked"),
        ("missing_email", TOKEN_A, "blocked"),
        ("missing_email", "not a token", "unreadable"),
        ("invalid_email", None, "unreadable"),
        ("duplicate", TOKEN_A, "harmless"),
        ("missing_token", None, "unreadable"),
        ("invalid_token", "bad/token", "unreadable"),
        ("malformed_csv", None, "unreadable"),
        ("too_many_fields", TOKEN_A, "unreadable"),
        ("bad_encoding", None, "unreadable"),
        ("line_too_long", None, "unreadable"),
        ("not_an_object", None, "unreadable"),
    ],
)
def test_each_rejection_reason_is_attributed_or_stops_the_prune(
    reason: str, token: str | None, outcome: str
) -> None:
    """A row rejected for its address spares only its token; a duplicate is harmless;
    every other rejection (unreadable, unattributable) stops the prune everywhere."""
    listed = ListedInput()
    listed.chunk([(1, TOKEN_B, PEOPLE[0], None)], [(2, reason, token, "x")])
    got = ("unreadable" if listed.unreadable == (2, reason)
           else "blocked" if TOKEN_A.lower() in listed.blocked else "harmless")  # fmt: skip
    assert got == outcome
    assert TOKEN_B.lower() in listed.tokens


async def test_keys_refused_while_pruning_abort_the_run(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The keys stop being accepted once the survey has read the dashboard: the listing's
    403 ends the prune with nothing removed, recorded, and the run exits 3 (aborted)."""
    board = board_of(emulator, TOKEN_A, PEOPLE[:10])

    def keys_revoked(_: Dashboard) -> None:
        emulator.app_key = "no-longer-valid-key"

    emulator.before_read[TOKEN_A] = [keys_revoked]  # the survey's (all invited: no preflight read)
    config = make_config(prune=True)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in PEOPLE[:9]])))
    assert result.exit_code == 3
    assert result.summary.aborted is True
    assert held(board) == set(PEOPLE[:10])
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "forbidden"


UNIVERSE = [f"u{i}@example.com" for i in range(12)]
dashboards_and_lists = st.fixed_dictionaries({
    "invitees": st.sets(st.integers(0, 11)),
    "share_list": st.sets(st.integers(0, 11), max_size=4),
    "invited": st.sets(st.integers(0, 11)),
    "listed": st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=14),
    "batch_size": st.integers(1, 4),
    "max_batch": st.sampled_from([None, 1, 2]),
    "prune_max": st.sampled_from(["100%", "100%", "10%", "50%", "2", "0"]),
})  # fmt: skip


async def _prune_once(case: dict[str, Any], directory: Path) -> tuple[Dashboard, Emulator]:
    """One run of a random list, with --prune 100%, against a fresh emulator."""
    async with Emulator(api_key=API_KEY, app_key=APP_KEY, sandbox_rules=False) as emulator:
        board = emulator.add_dashboard(
            TOKEN_A, [UNIVERSE[i] for i in case["share_list"]],
            invitees=[UNIVERSE[i] for i in case["invitees"]],
        )  # fmt: skip
        board.invitations = [(UNIVERSE[i], time.time() - 60) for i in sorted(case["invited"])]
        emulator.faults.max_batch = case["max_batch"]
        pairs = [(TOKEN_A, UNIVERSE[i].upper() if upper else UNIVERSE[i])
                 for i, upper in case["listed"]]  # fmt: skip
        config = Config(api_url=emulator.url, api_key=API_KEY, app_key=APP_KEY,
                        report_path=directory / "r.jsonl", batch_size=case["batch_size"],
                        backoff_base=0.001, backoff_max=0.002, ratelimit_jitter=0.001,
                        reconcile_delay=0.0, durable_journal=False, prune=True,
                        prune_max=PruneMax.parse(case["prune_max"]))  # fmt: skip
        if not pairs:  # an empty list is refused before anything starts (exit 2)
            (directory / "plan.jsonl").write_text("")
            return board, emulator
        plan = dataclasses.replace(config, report_path=directory / "plan.jsonl")
        await asyncio.wait_for(dry_run(plan, csv_source(rows_csv(pairs)), preflight=True,
                                       out=io.StringIO()), 30)  # fmt: skip
        assert {r.method for r in emulator.requests} <= {"GET"}
        await asyncio.wait_for(run(config, csv_source(rows_csv(pairs))), 30)
    return board, emulator


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dashboards_and_lists)
def test_a_pruned_dashboard_holds_exactly_what_it_held_of_the_list(case: dict[str, Any]) -> None:
    """Whatever the dashboard, the list (cases, duplicates, people with only an entry or
    only an invitation), --prune-max and a service taking short lists: afterwards it
    holds exactly the people it held whom the list names, each with every entry they had
    (or, over the cap, all it held), and nobody was invited twice."""
    directory = tempfile.mkdtemp()
    try:
        board, emulator = asyncio.run(_prune_once(case, Path(directory)))
        planned = {e.lower() for r in by_kind(read_report(Path(directory) / "plan.jsonl"),
                                              "revoked") for e in r["emails"]}  # fmt: skip
    finally:
        shutil.rmtree(directory)
    # An empty list names no dashboard: nothing is touched.
    listed = {UNIVERSE[i] for i, _ in case["listed"]} if case["listed"] else set(UNIVERSE)
    before = {UNIVERSE[i] for i in case["invitees"] | case["share_list"] | case["invited"]}
    if not PruneMax.parse(case["prune_max"]).allows(len(before - listed), len(before)):
        listed = set(UNIVERSE)  # over the cap: left whole
    assert planned == before - listed  # the dry run named exactly them
    assert held(board) == before & listed
    assert set(board.invitees or {}) == {UNIVERSE[i] for i in case["invitees"]} & listed
    assert (board.share_list or set()) == {UNIVERSE[i] for i in case["share_list"]} & listed
    assert max(emulator.invited.values(), default=0) <= 1


async def test_people_with_only_an_entry_go_with_one_put_and_no_delete(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Invitees and share-list entries never invited: one PUT removes them, no DELETE is
    made, and each is recorded with what went."""
    board = emulator.add_dashboard(TOKEN_A, [PEOPLE[3]], invitees=PEOPLE[:3])
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await asyncio.wait_for(run(config, csv_source(rows_csv([(TOKEN_A, PEOPLE[0])]))), 20)
    assert result.exit_code == 0
    assert set(board.invitees or {}) == {PEOPLE[0]}
    assert board.share_list == set()
    methods = [r.method for r in emulator.requests]
    assert (methods.count("PUT"), methods.count("DELETE")) == (1, 0)
    removed = {e: r["removed"] for r in by_kind(read_report(config.report_path), "revoked")
               for e in r["emails"]}  # fmt: skip
    assert removed == {PEOPLE[1]: ["invitee"], PEOPLE[2]: ["invitee"], PEOPLE[3]: ["share_list"]}


async def test_a_listing_that_cannot_be_read_to_its_end_prunes_nobody(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A service answering every page_number with the first page: the survey cannot see
    who holds the later invitations, so the dashboard is left whole and the refusal
    recorded as the dashboard check records it (listing_moved, exit 1)."""
    board = emulator.add_dashboard(TOKEN_A, invitees=[])
    people = [f"q{i}@example.com" for i in range(250)]
    board.invitations = [(e, time.time()) for e in people]
    emulator.ignore_page_number = True
    config = make_config(prune=True, prune_max=PruneMax(None, 100.0), resend=True)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, people[0])])))
    assert result.exit_code == 1
    assert len(board.invitations) == 250
    assert "DELETE" not in {r.method for r in emulator.requests}
    [refused] = by_kind(read_report(config.report_path), "prune_refused")
    assert refused["code"] == "listing_moved"
