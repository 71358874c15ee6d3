"""A request in flight when its process stops or dies: settled only once it has landed.

The service creates the invitations of a slow request even after the client has gone, so
a listing made before that request could end would miss them and invite everyone again.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import (
    TOKEN_A,
    TOKEN_B,
    Proc,
    by_kind,
    csv_source,
    each_invited_once_nothing_left,
    emulator_invited,
    read_report,
    rows_csv,
    worker_command,
)
from worker.cli.review import UNSETTLED, write_failed
from worker.clock import FakeClock
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.model import parse_body
from worker.errors import Stopped
from worker.outcome import Outcome
from worker.record.journal import Intent, journal_path, read_journal
from worker.run import run
from worker.run.resume import History, settle_unknowns
from worker.run.summary import JobTotals
from worker.send import client_for, pacer_for, reconciler_for
from worker.validate import pair_key

#: The emulator answers every POST this late, creating its invitations then, client or not;
#: the worker's --timeout is just longer, so the request is not one that times out.
SLOW, TIMEOUT = "4", "5"


def wait_for(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def killed_mid_post(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc], name: str
) -> tuple[str, Path, set[tuple[str, str]], tuple[str, ...]]:
    """A run of three people SIGKILLed while its one POST is out (the service creates the
    invitations SLOW s later), before its report's first record: the emulator's URL, the
    report, the pairs, and the run's arguments."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = {("dash-slow", f"{name}{i}@example.com") for i in range(3)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    args = ("run", str(source), "--report", str(report), "--api-url", url, "--timeout", TIMEOUT,
            "--reconcile-delay", "0.5")  # fmt: skip
    first = spawn(*args)
    journal = journal_path(report)
    wait_for(lambda: journal.exists() and b'"i":' in journal.read_bytes(), "the intent")
    time.sleep(0.3)  # the POST is on its way; the service answers it SLOW s later
    first.popen.kill()
    first.expect(-signal.SIGKILL, timeout=15)
    return url, report, pairs, args


def test_a_request_cut_by_sigterm_is_settled_on_resume_only_once_it_has_landed(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGTERM during a slow POST: exit 3 with it counted as an unknown outcome, not unsent;
    --resume waits until it can no longer be in progress, finds it created: invited once."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = {("dash-slow", f"t{i}@example.com") for i in range(3)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))

    def run(*extra: str) -> Proc:
        return spawn("run", str(source), "--report", str(report), "--api-url", url,
                     "--timeout", TIMEOUT, "--reconcile-delay", "0.5", "--grace", "0.5",
                     *extra)  # fmt: skip

    first = run()
    journal = journal_path(report)
    wait_for(lambda: journal.exists() and b'"i":' in journal.read_bytes(), "the intent")
    time.sleep(0.3)  # the POST is on its way; the service answers it SLOW s later
    first.popen.send_signal(signal.SIGTERM)
    first.expect(3, timeout=15)
    assert emulator_invited(url) == {}  # not yet: the service is still on it
    started = time.monotonic()
    run("--resume").expect(0, timeout=60)
    assert time.monotonic() - started < 30
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
    records = read_report(report)
    sent = [b for b in by_kind(records, "batch") if b["status"] == "sent"]
    assert [(b["reconciled"], len(b["emails"])) for b in sent] == [(True, 3)]
    stopped, resumed = by_kind(records, "summary")
    assert stopped["interrupted"] is True
    # The request went out: its outcome is unknown, its emails are not "unsent".
    assert (stopped["unknown_outcomes"], stopped["unsent"]) == (1, 0)
    assert (resumed["job"]["emails_sent"], resumed["job"]["unknown"]) == (3, 0)


def test_a_resumed_run_stopped_mid_request_counts_that_request_unknown_in_its_job_totals(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """A --resume that settles the last stop's request, then is itself stopped during a
    slow POST of the day's new rows: its job totals count those emails unknown (not a job
    with nothing open); the next --resume settles them, exit 0, everyone invited once."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    first = [("dash-slow", f"t{i}@example.com") for i in range(3)]
    later = [("dash-later", f"u{i}@example.com") for i in range(4)]
    journal = journal_path(report)

    def run(pairs: list[tuple[str, str]], *extra: str) -> Proc:
        source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in pairs))
        return spawn("run", str(source), "--report", str(report), "--api-url", url,
                     "--timeout", TIMEOUT, "--reconcile-delay", "0.5", "--grace", "0.5",
                     *extra)  # fmt: skip

    def stop_mid_post(proc: Proc, intents: int) -> None:
        wait_for(lambda: journal.exists() and journal.read_bytes().count(b'"i":') >= intents,
                 "the intent")  # fmt: skip
        time.sleep(0.3)  # the POST is on its way; the service answers it SLOW s later
        proc.popen.send_signal(signal.SIGTERM)
        proc.expect(3, timeout=15)

    stop_mid_post(run(first), 1)
    # The same report the next day, with new rows: the first request is settled, the new
    # one is cut by a stop in turn.
    resumed = run(first + later, "--resume")
    wait_for(lambda: len(emulator_invited(url)) == 3, "the first request to land")
    stop_mid_post(resumed, 2)
    run(first + later, "--resume").expect(0, timeout=60)
    assert emulator_invited(url) == dict.fromkeys(first + later, 1)
    summaries = by_kind(read_report(report), "summary")
    assert [s["exit_code"] for s in summaries] == [3, 3, 0]
    cut, done = summaries[1], summaries[2]
    assert (cut["unknown_outcomes"], cut["unsent"]) == (1, 0)
    assert (cut["job"]["emails_sent"], cut["job"]["unknown"]) == (3, 4)
    assert (done["job"]["emails_sent"], done["job"]["unknown"]) == (7, 0)


def test_a_killed_queue_workers_slow_request_is_settled_only_once_it_has_landed(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """SIGKILL a queue worker during a slow POST; another claims its messages at once but
    lists them only once that POST can no longer be in progress: each invited once, and
    its summary counts them ``reconciled_sent``."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-q,k1@example.com\ndash-q,k2@example.com\n")
    spawn("enqueue", str(source), redis_server, "--stream", stream_name).expect(0, timeout=60)

    def worker(name: str, *extra: str) -> Proc:
        return spawn("run", redis_server, "--stream", stream_name, "--consumer", name,
                     "--until-empty", "--linger", "0.1", "--api-url", url, "--timeout",
                     TIMEOUT, "--reconcile-delay", "0.5",
                     "--report", str(tmp_path / f"{name}.jsonl"), *extra)  # fmt: skip

    def intents() -> int:
        key = f"{stream_name}:invite-worker:intents"
        out = subprocess.run(["redis-cli", "-u", redis_server, "HLEN", key],
                             capture_output=True, check=True)  # fmt: skip
        return int(out.stdout.strip() or 0)

    first = worker("first")
    wait_for(lambda: intents() == 2, "the intents")
    time.sleep(0.3)  # the POST is on its way
    first.popen.send_signal(signal.SIGKILL)
    first.expect(-signal.SIGKILL, timeout=10)
    assert emulator_invited(url) == {}
    started = time.monotonic()
    worker("second", "--claim-idle", "0.5").expect(0, timeout=60)
    assert time.monotonic() - started < 30
    each_invited_once_nothing_left(url, {("dash-q", "k1@example.com"),
                                         ("dash-q", "k2@example.com")},
                                   redis_server, stream_name)  # fmt: skip
    records = read_report(tmp_path / "second.jsonl")
    [sent] = [b for b in by_kind(records, "batch") if b["status"] == "sent"]
    assert sent["reconciled"] is True
    [summary] = by_kind(records, "summary")  # counted as a file's --resume counts them
    assert (summary["reconciled_sent"], summary["emails_sent"]) == (2, 2)


class StopOnLongWait(FakeClock):
    """Virtual time in which a wait of ``long`` seconds or more is ended by a stop."""

    def __init__(self, stop: asyncio.Event, long: float) -> None:
        super().__init__(time.time())
        self.stop, self.long, self.started = stop, long, self.now

    async def sleep(self, seconds: float) -> None:
        if seconds >= self.long:
            self.stop.set()
        await super().sleep(seconds)


async def settle(
    config: Config, history: History, clock: FakeClock, stop: asyncio.Event
) -> list[tuple[float, Outcome]]:
    """settle_unknowns over the emulator: each outcome with the virtual time it came at."""
    async with client_for(config) as client:
        reconciler = reconciler_for(config, client, pacer_for(config, clock), clock,
                                    random.Random(1), stop=stop)  # fmt: skip
        settled = settle_unknowns(history, reconciler, clock, request_timeout=config.timeout,
                                  delay=config.reconcile_delay)  # fmt: skip
        return [(clock.time(), outcome) async for outcome in settled]


async def test_resume_lists_an_intent_only_once_its_request_can_no_longer_be_in_progress(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--resume lists an open intent at its send time + the timeout it recorded (the run's
    --timeout for a journal that recorded none) + the reconcile delay, not before."""
    config = make_config(timeout=5.0, reconcile_delay=2.0)
    clock = FakeClock(time.time())
    at = clock.now - 1
    for token, email in ((TOKEN_A, "a@example.com"), (TOKEN_B, "b@example.com")):
        emulator.add_dashboard(token).invitations.append((email, at + 0.5))
        emulator.invited[(token, email)] += 1
    recorded = Intent("r-1", TOKEN_A, ["a@example.com"], at, 60.0)
    older = Intent("r-2", TOKEN_B, ["b@example.com"], at)  # written before "t" existed
    history = History(unknown=[recorded, older])
    settled = await asyncio.wait_for(settle(config, history, clock, asyncio.Event()), 10)
    assert [(round(when - at, 3), o.token, o.reconciled) for when, o in settled] == [
        (7.0, TOKEN_B, True), (62.0, TOKEN_A, True)
    ]  # fmt: skip
    assert [r.method for r in emulator.requests] == ["GET", "GET"]
    assert history.blocked == set()


async def test_a_stop_while_resume_lists_for_a_request_leaves_it_and_the_rest_open(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop that comes while --resume's listing waits for the rate limit (its wait for
    the request to land over): its pairs and those of the intents after it are held as
    unknown, in the job's totals and not sent, left for the next --resume; an earlier
    failure of one of them no longer counts as failed."""
    config = make_config(timeout=1.0, reconcile_delay=0.0, rate=0.01)  # a GET per 100 s
    clock = FakeClock(time.time())
    stop = asyncio.Event()
    stop.set()  # the listing waits for its slot: a stop ends that wait
    intents = [Intent("r-1", TOKEN_A, ["a@example.com"], clock.now - 60, 1.0),
               Intent("r-2", TOKEN_B, ["b@example.com", "c@example.com"], clock.now - 50,
                      1.0)]  # fmt: skip
    history = History(unknown=intents, failed={pair_key(TOKEN_B, "b@example.com"): "timeout"})
    with pytest.raises(Stopped):
        await asyncio.wait_for(settle(config, history, clock, stop), 10)
    assert emulator.requests == []
    assert history.blocked == {pair_key(TOKEN_A, "a@example.com"),
                               pair_key(TOKEN_B, "b@example.com"),
                               pair_key(TOKEN_B, "c@example.com")}  # fmt: skip
    totals = history.totals()
    assert (totals["unknown"], totals["emails_failed"]) == (3, 0)


async def test_a_stop_while_resume_waits_for_a_request_leaves_it_open(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop during --resume's wait for an earlier request ends the wait at once: nothing
    listed, no outcome, its pairs not sent in this run (left for the next --resume)."""
    config = make_config(timeout=30.0, reconcile_delay=5.0)
    stop = asyncio.Event()
    clock = StopOnLongWait(stop, long=10.0)
    intent = Intent("r-1", TOKEN_A, ["a@example.com"], clock.now - 1, 30.0)
    history = History(unknown=[intent])
    settled = await asyncio.wait_for(settle(config, history, clock, stop), 10)
    assert settled == []
    assert emulator.requests == []
    assert clock.now - clock.started < 10
    assert history.blocked == {pair_key(TOKEN_A, "a@example.com")}


async def test_an_unknown_outcome_no_listing_could_settle_counts_unknown_in_the_job(
    make_config: Callable[..., Config],
    answering: Callable[[Callable[[web.Request], Awaitable[web.Response]]], Awaitable[str]],
) -> None:
    """A resumed run's POST is answered 502 (it may have created the invitation) and the
    listing that would tell cannot be read: the email is recorded failed
    (``outcome_unknown``) with its intent open, and the job's totals count it unknown, not
    failed; the run is incomplete (exit 1)."""
    broken = False
    posts: list[list[str]] = []

    async def answer(request: web.Request) -> web.Response:
        if request.method == "POST":
            posts.append(parse_body(await request.read())[0] or [])
            if broken:
                return web.json_response({"errors": ["Bad Gateway"]}, status=502)
            data = [{"type": "public_dashboard_invitation", "attributes": {"email": e}}
                    for e in posts[-1]]  # fmt: skip
            return web.json_response({"data": data}, status=201)
        if request.path.endswith("/invitation"):  # a listing: the check's, then settling's
            if broken and posts:
                return web.json_response({"errors": ["Internal Server Error"]}, status=500)
            return web.json_response({"data": [], "meta": {"page": {"total_count": 0}}})
        return web.json_response({"share_type": "invite", "status": "active",
                                  "invitees": None, "share_list": None})  # fmt: skip

    url = await answering(answer)
    first, later = (TOKEN_A, "a@example.com"), (TOKEN_B, "b@example.com")
    done = await run(make_config(api_url=url), csv_source(rows_csv([first])))
    assert done.exit_code == 0
    broken, posts = True, []
    resumed = await run(make_config(api_url=url, resume=True), csv_source(rows_csv([first, later])))
    assert posts == [["b@example.com"]]  # one POST: the unknown outcome is not sent again
    assert resumed.exit_code == 1
    assert resumed.summary.job == JobTotals(emails_sent=1, emails_failed=0, emails_skipped=0,
                                            rejected=0, unknown=1)  # fmt: skip
    [failed] = [o for o in by_kind(read_report(make_config().report_path), "batch")
                if o["status"] == "failed"]  # fmt: skip
    assert (failed["emails"], failed["error"]["code"]) == (["b@example.com"], "outcome_unknown")
    open_ = read_journal(journal_path(make_config().report_path)).values()
    assert [i.emails for i in open_] == [["b@example.com"]]
    # ``report failed`` leaves it out, saying why: a run of its CSV on a new report would
    # not see the open request, and could invite b again.
    out, left_out = io.StringIO(), Counter[str]()
    assert write_failed(make_config().report_path, out, left_out=left_out) == 0
    assert out.getvalue() == "token,email,error_code,error_message\n"
    assert left_out == Counter({UNSETTLED: 1})


@pytest.mark.parametrize("again", [("--overwrite",), ("--dry-run", "--overwrite")],
                         ids=["overwrite", "plan-over-it"])  # fmt: skip
def test_a_link_to_a_killed_runs_report_finds_its_open_sends(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    again: tuple[str, ...],
) -> None:
    """The report of a run killed during a slow POST, given again by a symbolic link to
    it: the link's report has the file's journal (as it has its lock), so replacing it is
    refused as for the file itself, and --resume through the link settles the send: each
    person invited once."""
    url, report, pairs, args = killed_mid_post(tmp_path, start_emulator, spawn, "l")
    link = tmp_path / "link.jsonl"
    link.symlink_to(report.name)
    through_link = tuple(str(link) if a == str(report) else a for a in args)
    refused = spawn(*through_link, *again)
    refused.expect(2, timeout=30)
    assert "holds 3 email(s) whose request was out" in refused.stderr()
    assert report.read_bytes() == b""
    spawn(*through_link, "--resume").expect(0, timeout=60)
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
    assert journal_path(link) == journal_path(report)


def test_summarize_counts_the_emails_of_a_killed_runs_request_unknown_until_resumed(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGKILL during a slow POST: report summarize counts its emails unknown (not sent,
    not failed) and says --resume settles them; after --resume, none is unknown and each
    is sent once."""
    url, report, pairs, args = killed_mid_post(tmp_path, start_emulator, spawn, "k")

    def summarize(*extra: str) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(worker_command("report", "summarize", str(report), *extra),
                              capture_output=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        return done

    totals = json.loads(summarize("--json").stdout)
    assert (totals["unknown"], totals["sent"], totals["failed"]) == (3, 0, 0)
    assert totals["complete"] is False
    human = summarize().stdout.decode()
    assert "emails unknown     3" in human
    assert "`run --resume` with this report" in human
    spawn(*args, "--resume").expect(0, timeout=60)
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
    totals = json.loads(summarize("--json").stdout)
    assert (totals["unknown"], totals["sent"], totals["complete"]) == (0, 3, True)
    assert "unknown" not in summarize().stdout.decode()


@pytest.mark.parametrize(
    "again", [(), ("--overwrite",), ("--dry-run", "--overwrite")],
    ids=["same-command", "overwrite", "plan-over-it"],
)  # fmt: skip
def test_a_run_over_a_killed_runs_open_sends_is_refused_until_resumed(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    again: tuple[str, ...],
) -> None:
    """SIGKILL during a slow POST, before the report's first record: the same command run
    again (or with --overwrite, or a dry run's plan written over it) is exit 2 before any
    request, naming --resume, and leaves the report and the journal; --resume then settles
    the send, and each person is invited once."""
    url, report, pairs, args = killed_mid_post(tmp_path, start_emulator, spawn, "o")
    assert report.read_bytes() == b""
    journal = journal_path(report)
    kept = journal.read_bytes()
    refused = spawn(*args, *again)
    refused.expect(2, timeout=30)
    assert "holds 3 email(s) whose request was out" in refused.stderr()
    assert "Pass --resume" in refused.stderr()
    assert journal.read_bytes() == kept
    assert report.read_bytes() == b""
    spawn(*args, "--resume").expect(0, timeout=60)
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
    # Once settled, the journal is empty: a new run over the report is refused only as
    # any earlier run's report is (it holds a run), and --overwrite starts afresh.
    spawn(*args, "--overwrite").expect(0, timeout=60)
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
