"""What a report says after resumed runs and what ``report`` commands may write: a pair's
last record counts, skipped pairs are settled, and ``report failed`` never writes over
the run's own files (the CLI in a real process, real files)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import (
    API_KEY,
    APP_KEY,
    TOKEN_A,
    by_kind,
    emulator_invited,
    on_a_terminal,
    read_report,
    worker_command,
    worker_env,
)
from worker.outcome import Status
from worker.run.resume import History

KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def invite_worker(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``invite-worker ARGS`` with the test keys, output captured."""
    return subprocess.run(worker_command(*args), env=worker_env(**KEYS), cwd=cwd,
                          capture_output=True, timeout=90, check=False, text=True)  # fmt: skip


def summarize(report: Path) -> dict[str, object]:
    done = invite_worker("report", "summarize", str(report), "--json")
    assert done.returncode == 0, done.stderr
    totals: dict[str, object] = json.loads(done.stdout)
    return totals


def test_a_pair_skipped_by_two_runs_counts_once(tmp_path: Path) -> None:
    """``report summarize`` counts a pair skipped by a run and again by its resume once,
    by its last record; a skipped pair later sent counts as sent only."""
    report = tmp_path / "r.jsonl"
    skip = {"kind": "skipped", "token": "tok-a", "reason": "already_invited"}
    lines = [
        {**skip, "emails": ["a@example.com", "b@example.com"]},
        {"kind": "summary"},
        {**skip, "emails": ["A@example.com"]},  # the same pair, told apart by case only
        {**skip, "emails": ["c@example.com"], "reason": "active_session"},
        {"kind": "batch", "token": "tok-a", "emails": ["b@example.com"], "status": "sent"},
        {"kind": "summary"},
    ]
    report.write_text("".join(json.dumps(line) + "\n" for line in lines))
    totals = summarize(report)
    assert (totals["sent"], totals["skipped"]) == (1, 2)
    assert totals["skipped_by_reason"] == {"already_invited": 1, "active_session": 1}


@pytest.mark.timeout(120)
def test_a_resume_does_not_check_or_record_settled_skips_again(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """A resumed run leaves the pairs its report settled as skipped alone: no new skipped
    record, no listing for them; the report, and the job's totals, count each pair once."""
    url = start_emulator()
    first, second = tmp_path / "old.csv", tmp_path / "all.csv"
    tokens = [f"tok{i}" for i in range(5)]
    first.write_text("token,email\n" + "".join(f"{t},old@example.com\n" for t in tokens))
    second.write_text("token,email\n" + "".join(
        f"{t},old@example.com\n" + "".join(f"{t},new{n}@example.com\n" for n in range(3))
        for t in tokens))  # fmt: skip
    common = ("--api-url", url, "--batch-size", "10")
    done = invite_worker("run", str(first), "--report", str(tmp_path / "a.jsonl"), *common)
    assert done.returncode == 0, done.stderr
    report = tmp_path / "b.jsonl"
    assert invite_worker("run", str(second), "--report", str(report), *common).returncode == 0
    before = len(read_report(report))
    done = invite_worker("run", str(second), "--report", str(report), "--resume", *common)
    assert done.returncode == 0, done.stderr
    added = read_report(report)[before:]
    assert (by_kind(added, "skipped"), by_kind(added, "batch")) == ([], [])
    assert (added[-1]["requests"], added[-1]["skipped"]) == (0, 20)  # all settled, read
    totals = summarize(report)
    assert (totals["sent"], totals["skipped"]) == (15, 5)
    job = added[-1]["job"]  # the job's totals say the same, the skipped included
    assert (job["emails_sent"], job["emails_skipped"]) == (15, 5)


@pytest.mark.parametrize("what", ["input", "input beside the report", "journal", "lock"])
def test_report_failed_never_writes_over_the_runs_own_files(tmp_path: Path, what: str) -> None:
    """``report failed --output X --overwrite`` is exit 2 in one line, X unchanged, when X
    is the input a run of the report read (as the run named it: relative to where it ran,
    or beside the report), the report's journal or its lock."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    source = here / "in.csv"
    source.write_text("token,email\ntok-a,a@example.com\n")
    report = there / "r.jsonl"
    done = invite_worker("run", "in.csv", "--sandbox", "--report", str(report), cwd=here)
    assert done.returncode == 0, done.stderr
    if what == "input beside the report":
        source = there / "in.csv"
        source.write_text((here / "in.csv").read_text())
        cwd = tmp_path  # neither where the run ran nor beside the report
    else:
        cwd = here
    output = {"journal": Path(f"{report}.journal"), "lock": Path(f"{report}.lock")}.get(
        what, source
    )
    if not output.exists():
        output.write_text("kept\n")
    before = output.read_bytes()
    done = invite_worker("report", "failed", str(report), "--output", str(output),
                         "--overwrite", cwd=cwd)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert output.read_bytes() == before


@pytest.mark.parametrize("action", ["summarize", "failed"])
def test_report_errors_off_a_terminal_are_json_lines(tmp_path: Path, action: str) -> None:
    """Off a terminal every stderr line of ``report summarize|failed`` is one JSON object
    with ``event`` and ``level``, as for ``run``: an error (exit 2) and a note alike."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    done = invite_worker("report", action, str(notes))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert json.loads(line)["event"] == "cli.usage_error", line
    if action == "failed":
        report = tmp_path / "r.jsonl"
        report.write_text(json.dumps({"kind": "summary"}) + "\n")
        done = invite_worker("report", action, str(report), "--output", str(tmp_path / "f.csv"))
        assert done.returncode == 0, done.stderr
        [line] = done.stderr.splitlines()
        assert json.loads(line)["level"] == "info", line


def sent_then_crashed(url: str, tmp_path: Path, emails: list[str], open_: int) -> tuple[Path, Path]:
    """``emails`` of one token sent by a run whose process then died before recording the
    outcome: its report holds no batch, its journal the intent of the first ``open_``.
    The input and the report."""
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    source.write_text("token,email\n" + "".join(f"tok-a,{e}\n" for e in emails))
    before = time.time() - 60  # long enough ago that no request sent then is in flight
    done = invite_worker("run", str(source), "--api-url", url, "--report", str(report))
    assert done.returncode == 0, done.stderr
    report.write_text("".join(json.dumps(r) + "\n" for r in read_report(report)
                              if r["kind"] != "batch"))  # fmt: skip
    intent = {"i": "x-1", "token": "tok-a", "emails": emails[:open_], "at": before}
    Path(f"{report}.journal").write_text(json.dumps(intent) + "\n")
    return source, report


@pytest.mark.timeout(120)
def test_a_resume_that_settles_a_batch_by_listing_counts_it_reconciled(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """A resume that finds an open intent's invitations created (by listing) records them
    sent and says so in its summary's ``reconciled_sent``; nobody is invited twice."""
    url = start_emulator()
    source, report = sent_then_crashed(url, tmp_path, [f"u{n}@example.com" for n in range(3)], 3)
    done = invite_worker("run", str(source), "--api-url", url, "--report", str(report),
                         "--resume")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = read_report(report)[-1]
    assert (summary["reconciled_sent"], summary["emails_sent"]) == (3, 3)
    assert set(emulator_invited(url).values()) == {1}


@pytest.mark.timeout(120)
def test_rows_a_resume_settles_as_it_begins_are_its_own_not_settled_before(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Rows whose open intent a resume settles by listing as it begins count as valid rows
    of that run (its records hold them), not as rows an earlier run settled: rows = valid
    + skipped + rejected, and no more are sent than are valid."""
    url = start_emulator()
    emails = [f"u{n}@example.com" for n in range(3)]
    source, report = sent_then_crashed(url, tmp_path, emails, 2)
    more = [f"v{n}@example.com" for n in range(2)]
    with source.open("a") as f:  # the day's list: one row repeated, two new ones
        f.write("".join(f"tok-a,{e}\n" for e in [emails[0], *more]))
    done = invite_worker("run", str(source), "--api-url", url, "--report", str(report),
                         "--resume")  # fmt: skip
    assert done.returncode == 1, done.stderr  # the repeated row is rejected
    summary = read_report(report)[-1]
    assert summary["reconciled_sent"] == 2
    assert (summary["rows"], summary["valid"], summary["skipped"], summary["rejected"]) == (
        6, 5, 0, 1)  # fmt: skip
    # Settled by listing, and the two new; u2, created with no record of it, is found
    # invited by the dashboard check.
    assert (summary["emails_sent"], summary["emails_skipped"], summary["unsent"]) == (4, 1, 0)
    assert (summary["job"]["emails_sent"], summary["job"]["emails_skipped"]) == (4, 1)
    assert set(emulator_invited(url).values()) == {1}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("columns", [30, 40])
def test_the_bar_is_never_cut_on_a_very_narrow_terminal(
    tmp_path: Path, start_emulator: Callable[..., str], columns: int
) -> None:
    """On a 30- or 40-column terminal every redraw of the bar fits whole: a narrower frame
    (no label, then no bar) instead of a line cut mid-field, so each still ends with its
    closing bracket and shows the emails done of the total."""
    url = start_emulator("--limit", "20", "--period", "1")
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"tok{n % 3},u{n}@example.com\n"
                                                for n in range(2_000)))  # fmt: skip
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--batch-size", "50",
                       "--report", str(tmp_path / "r.jsonl")),
        columns=columns,
    )  # fmt: skip
    assert code == 0
    lines = [p for p in re.split(r"[\r\n]", ANSI.sub("", seen.decode())) if p.strip()]
    bars = [line for line in lines if re.search(r"\d+%\|", line)]
    assert any("/2000" in bar for bar in bars), lines
    assert max(len(bar) for bar in bars) <= columns, max(bars, key=len)
    assert all(bar.rstrip().endswith("]") for bar in bars), [b for b in bars if b[-1] != "]"]


@pytest.mark.timeout(150)
async def test_a_queue_workers_bar_shows_pending_and_dead_lettered_first(
    tmp_path: Path, start_emulator: Callable[..., str], redis_server: str, redis: Redis,
    stream_name: str,
) -> None:  # fmt: skip
    """On a 60-column terminal a stream worker's bar still shows messages read, pending and
    dead-lettered (its watcher's numbers), the rate and the rest only as room allows."""
    url = start_emulator()
    gone = "gone1234gone1234-0123456789abcdef0123456789abcdef"
    for n in range(300):
        await redis.xadd(stream_name, {"token": TOKEN_A, "email": f"t{n}@example.com"})
    await redis.xadd(stream_name, {"token": gone, "email": "nobody@example.com"})
    code, seen = await asyncio.to_thread(
        on_a_terminal,
        worker_command("run", redis_server, "--stream", stream_name, "--until-empty",
                       "--linger", "0.05", "--api-url", url, "--report",
                       str(tmp_path / "r.jsonl")),
        columns=60,
    )  # fmt: skip
    assert code == 1  # the dead-lettered message failed
    lines = [p for p in re.split(r"[\r\n]", ANSI.sub("", seen.decode())) if p.strip()]
    bars = [line for line in lines if "messages " in line]
    assert any("dead-lettered 1" in bar for bar in bars), lines
    assert all("pending " in bar and len(bar) <= 60 for bar in bars), bars


def test_a_daily_lists_new_bad_row_at_an_old_bad_rows_line_is_recorded(tmp_path: Path) -> None:
    """A resumed run over a list that changed since (the CronJob's next day) records a bad
    row found at the line where an earlier day's bad row was; the same row read again by
    a resume of the same list is not recorded twice."""
    source, report = tmp_path / "list.csv", tmp_path / "r.jsonl"
    source.write_text("token,email\ntok-aaaa,a@example.com\ntok-aaaa,bad-address\n"
                      "tok-aaaa,b@example.com,extra\n")  # fmt: skip
    first = invite_worker("run", str(source), "--sandbox", "--report", str(report))
    assert first.returncode == 1, first.stderr  # a rejected row
    source.write_text("token,email\ntok-aaaa,a@example.com\nbad token!,x@example.com\n"
                      "tok-aaaa,also-bad\n\"tok-aaaa,c@example.com\n")  # fmt: skip
    for _ in range(2):  # the next day, then that day's run resumed
        again = invite_worker("run", str(source), "--sandbox", "--report", str(report),
                              "--resume")  # fmt: skip
        assert again.returncode == 1, again.stderr
    rejected = sorted((r["line"], r["reason"], r.get("token"), r.get("email"))
                      for r in by_kind(read_report(report), "rejected"))  # fmt: skip
    assert rejected == [(3, "invalid_email", "tok-aaaa", "bad-address"),
                        (3, "invalid_token", "bad token!", "x@example.com"),
                        (4, "invalid_email", "tok-aaaa", "also-bad"),
                        (4, "too_many_fields", None, None),
                        (5, "malformed_csv", None, None)]  # fmt: skip
    assert summarize(report)["rejected"] == 5


def test_a_daily_resume_exits_by_what_todays_list_holds(tmp_path: Path) -> None:
    """The CronJob's next day: a bad row still on the list is counted (rows add up) and
    exits 1; once it is fixed, and a pair refused for good is off the list, the day exits
    0, while the job's totals still hold the whole history."""
    source, report = tmp_path / "list.csv", tmp_path / "r.jsonl"
    good, gone = "tok-aaaa,m1@example.com\n", "gone-token,g@example.com\n"
    source.write_text("token,email\n" + good + "tok-aaaa,zzz\n" + gone)
    day1 = invite_worker("run", str(source), "--sandbox", "--report", str(report))
    assert day1.returncode == 1, day1.stderr

    def resumed() -> tuple[int, dict[str, object]]:
        done = invite_worker("run", str(source), "--sandbox", "--report", str(report),
                             "--resume")  # fmt: skip
        return done.returncode, by_kind(read_report(report), "summary")[-1]

    code, summary = resumed()  # the same list: the bad row and the refused pair are still on it
    assert code == 1
    assert (summary["rows"], summary["valid"], summary["skipped"], summary["rejected"]) == (
        3, 0, 2, 1)  # fmt: skip
    assert summary["rejected_by_reason"] == {"invalid_email": 1}
    source.write_text("token,email\n" + good + "tok-aaaa,m2@example.com\n")  # fixed, gone dropped
    code, summary = resumed()
    assert code == 0, summary
    assert (summary["emails_sent"], summary["rejected"]) == (1, 0)
    assert summary["job"] == {"emails_sent": 2, "emails_failed": 1, "emails_skipped": 0,
                              "rejected": 1, "unknown": 0}  # fmt: skip
    assert summarize(report)["rejected"] == 1


def test_a_pair_refused_then_found_served_is_no_longer_failed_in_the_jobs_totals() -> None:
    """A pair refused on one day and skipped as already served on a later one counts as
    served, not failed, in the job's totals (as ``report summarize`` counts it)."""
    history = History()
    history.on_batch("tok-aaaa", ["new1@example.com"], Status.FAILED, "not_on_share_list")
    assert history.totals()["emails_failed"] == 1
    history.on_batch("tok-aaaa", ["new1@example.com"], Status.SKIPPED, "already_invited")
    assert history.totals()["emails_failed"] == 0
    assert history.totals()["emails_skipped"] == 1
