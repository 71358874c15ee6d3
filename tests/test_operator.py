"""Operator tools: dry run, progress, report summarize/failed, JSON-only stderr."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shlex
import signal
import stat
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    Proc,
    a_summary,
    by_kind,
    emulator_invited,
    on_a_terminal,
    read_report,
    rows_csv,
    worker_command,
    worker_env,
)
from worker.cli.review import UNSETTLED, write_failed
from worker.record.journal import journal_path
from worker.record.replay import Replay
from worker.run.bar import SteadyRate, duration_text
from worker.run.counts import FileRead, QueueRead
from worker.run.human import print_summary
from worker.run.summary import Halt, JobTotals

SAMPLES = ROOT / "sample_inputs"
KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}


def invite_worker(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(worker_command(*args), env=worker_env(**env), capture_output=True,
                          cwd=ROOT, timeout=120, check=False)  # fmt: skip


def stats(url: str) -> dict[str, object]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=10) as resp:  # noqa: S310
        result: dict[str, object] = json.loads(resp.read())
        return result


def test_dry_run_plans_without_a_single_request(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """--dry-run: zero requests, planned batches and rejections in the report, a plan with
    an estimate for --assume-limit (and --rate), exit 1 because rows were rejected."""
    url = start_emulator()
    report = tmp_path / "plan.jsonl"
    done = invite_worker("run", str(SAMPLES / "invites.csv"), "--dry-run", "--api-url", url,
                         "--report", str(report), "--batch-size", "2", "--assume-limit", "2/10",
                         "--rate", "0.5")  # fmt: skip
    assert done.returncode == 1, done.stderr.decode()
    assert stats(url)["requests"] == 0
    plan = done.stdout.decode()
    assert "nothing was sent" in plan
    assert "requests needed  4" in plan
    assert "20.0 s at --rate 0.5/s and 2 requests per 10 s window" in plan
    records = read_report(report)
    planned = [b for b in by_kind(records, "batch") if b["status"] == "planned"]
    assert sum(len(b["emails"]) for b in planned) == 7
    assert len(by_kind(records, "rejected")) == 3
    summary = records[-1]
    assert summary["dry_run"] is True
    assert summary["requests"] == 4
    assert summary["tokens"] == 3
    assert summary["estimated_seconds"] == 20.0


def test_summarize_agrees_with_the_report_to_the_row(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Across a run refused by its keys and its --resume, summarize counts each pair's
    final state, and agrees with the records line by line; after the refused run alone it
    says that run stopped (exit 3) and how to finish."""
    url = start_emulator()
    source = tmp_path / "in.csv"
    rows = [f"tok-{i % 3},u{i}@example.com" for i in range(50)]
    rows += ["tok-1,who@outside.example", "tok-1,bad", "gone-x,g@example.com"]
    source.write_text("token,email\n" + "\n".join(rows) + "\n")
    report = tmp_path / "r.jsonl"
    common = ("run", str(source), "--api-url", url, "--report", str(report), "--batch-size", "7")
    refused = invite_worker(*common, DD_API_KEY="wrong-key-123456", DD_APP_KEY=APP_KEY)
    assert refused.returncode == 3, refused.stderr.decode()
    stopped = invite_worker("report", "summarize", str(report)).stdout.decode()
    assert "(1 run; the last run stopped before the end (exit 3))" in stopped
    assert "run it again with --resume to finish." in stopped
    totals = json.loads(invite_worker("report", "summarize", str(report), "--json").stdout)
    assert totals["last_run"]["exit_code"] == 3
    resumed = invite_worker(*common, "--resume", **KEYS)
    assert resumed.returncode == 1, resumed.stderr.decode()
    totals = json.loads(invite_worker("report", "summarize", str(report), "--json").stdout)
    assert (totals["sent"], totals["failed"], totals["rejected"]) == (50, 2, 1)
    assert totals["runs"] == 2
    assert totals["complete"] is True
    assert totals["last_run"] == {"exit_code": 1, "unsent": 0, "unread": 0}
    records = read_report(report)
    assert totals["requests"] == sum(r["requests"] for r in by_kind(records, "summary"))
    assert records[-1]["job"] == {"emails_sent": 50, "emails_failed": 2, "emails_skipped": 0,
                                  "rejected": 1, "unknown": 0}  # fmt: skip
    assert totals["failed_by_code"] == {"bad_request": 1, "token_not_found": 1}
    assert totals["failed_by_token"] == {"tok-1": 1, "gone-x": 1}
    assert totals["rejected_by_reason"] == {"invalid_email": 1}
    human = invite_worker("report", "summarize", str(report)).stdout.decode()
    assert "emails sent        50" in human
    assert "(2 runs)" in human
    assert "stopped" not in human


def test_failed_rows_come_back_as_a_csv_that_reruns_cleanly(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """report failed -> token,email CSV of what failed; once the cause is fixed it re-runs
    with exit 0, and only those are sent again."""
    url = start_emulator()
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"tok,u{i}@example.com\n" for i in range(20)))
    report = tmp_path / "r.jsonl"
    refused = invite_worker("run", str(source), "--api-url", url, "--report", str(report),
                            DD_API_KEY="wrong-key-123456", DD_APP_KEY=APP_KEY)  # fmt: skip
    assert refused.returncode == 3, refused.stderr.decode()
    failed_csv = tmp_path / "failed.csv"
    done = invite_worker("report", "failed", str(report), "--output", str(failed_csv))
    assert done.returncode == 0, done.stderr.decode()
    with failed_csv.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["token", "email", "error_code", "error_message"]
    assert len(rows) == 21
    assert {row[2] for row in rows[1:]} <= {"aborted", "forbidden"}
    assert stat.S_IMODE(failed_csv.stat().st_mode) == 0o600
    again = invite_worker("run", str(failed_csv), "--api-url", url, "--report",
                          str(tmp_path / "again.jsonl"), **KEYS)  # fmt: skip
    assert again.returncode == 0, again.stderr.decode()
    assert set(emulator_invited(url).values()) == {1}
    assert len(emulator_invited(url)) == 20


def test_json_mode_stderr_is_only_json_events_with_progress(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """In JSON mode every stderr line is one object with event and level, progress events
    included; usage errors too."""
    url = start_emulator("--limit", "10", "--period", "1")
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"tok-{i % 2},u{i}@example.com\n"
                                                for i in range(300)))  # fmt: skip
    done = invite_worker("run", str(source), "--api-url", url, "--report",
                         str(tmp_path / "r.jsonl"), "--batch-size", "20",
                         "--progress-every", "0.2", "--log-format", "json", **KEYS)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    events = [msgspec.json.decode(line) for line in done.stderr.splitlines()]
    assert all("event" in e and "level" in e for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress
    assert {
        "rows",
        "sent",
        "failed",
        "requests",
        "ratelimit_waits",
        "emails_per_second",
        "eta_seconds",
    } <= set(progress[-1])
    for args in (["run", "missing.csv", "--sandbox"], ["run", "x.csv", "--batch-size", "x"]):
        bad = invite_worker(*args, "--log-format", "json")
        assert bad.returncode == 2, bad.stderr.decode()
        lines = [msgspec.json.decode(line) for line in bad.stderr.splitlines()]
        assert all("event" in e and "level" in e for e in lines)
        assert lines[-1]["event"] == "cli.usage_error"


@pytest.mark.timeout(60)
def test_a_terminal_run_shows_a_progress_bar_redrawn_in_place(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Through a pseudo-terminal: a bar with counts and rate, redrawn with carriage returns."""
    url = start_emulator("--limit", "10", "--period", "1")
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"tok,u{i}@example.com\n" for i in range(400)))
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--report",
                       str(tmp_path / "r.jsonl"), "--batch-size", "20"),
    )  # fmt: skip
    assert code == 0
    assert b"invites:" in seen
    assert b"email/s" in seen
    assert b"requests" in seen
    assert b"429s 0" in seen  # 429 answers and pacing waits are labelled apart
    assert b"pacing waits" in seen
    assert seen.count(b"\r") >= 3  # redrawn in place, not one line per update
    assert b"400/400" in seen
    assert b"ETA " in seen  # once every row is read, the total and an ETA
    # ...and it ends with how it went and what to do next, for the person reading.
    assert b"Done: " in seen
    assert b"invited" in seen
    assert b"Next: nothing: everyone is invited" in seen


@pytest.mark.timeout(90)
def test_sigterm_on_a_terminal_ends_with_one_plain_line_and_the_exact_resume_command(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """SIGTERM mid-run: the terminal ends with "Stopped by SIGTERM: … Finish with: <command>"
    (no thirty-field run.aborted line), and that command, run as shown, finishes the job
    with every address invited exactly once."""
    url = start_emulator("--limit", "10", "--period", "1")
    source = tmp_path / "in.csv"
    pairs = {("tok", f"u{i}@example.com") for i in range(400)}
    source.write_text(rows_csv(sorted(pairs)))
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--batch-size", "20",
                       "--report", str(tmp_path / "r.jsonl")),
        when=b"invites:", then=lambda proc: proc.send_signal(signal.SIGTERM),
    )  # fmt: skip
    assert code == 3
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode()).replace("\r", "\n")
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last.startswith("Stopped by SIGTERM: "), last
    assert "not sent yet, nothing is lost. Finish with: invite-worker run " in last
    assert "run.aborted" not in text
    assert "interrupted=" not in text
    command = shlex.split(last.split("Finish with: ", 1)[1])
    assert command[-1] == "--resume"
    finished = subprocess.run(worker_command(*command[1:]), env=worker_env(**KEYS), cwd=ROOT,
                              capture_output=True, timeout=60, check=False)  # fmt: skip
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}


def test_a_pairs_last_batch_record_decides_its_state(tmp_path: Path) -> None:
    """Summaries and the failed CSV follow each pair's last record, across runs, once each."""

    def batch(token: str, emails: list[str], status: str, code: str | None = None) -> bytes:
        error = {"code": code, "message": "x"} if code else None
        return msgspec.json.encode({"kind": "batch", "token": token, "emails": emails,
                                    "status": status, "error": error})  # fmt: skip

    report = tmp_path / "report.jsonl"
    report.write_bytes(b"\n".join([
        batch("t1", ["a@x.io", "b@x.io", "c@x.io"], "failed", "server_error"),
        batch("t1", ["A@x.io"], "sent"),  # a: failed, then sent (case does not matter)
        batch("t2", ["a@x.io"], "failed", "bad_request"),  # another token: another pair
        batch("t1", ["c@x.io", "c@x.io"], "failed", "timeout"),  # c: failed again, once
        b'{"kind": "summary", "requests": 4}',
        b'{"kind": "batch", "token": "t1", "emails": ["b@x.io"], "sta',  # torn by a crash
    ]) + b"\n")  # fmt: skip
    totals = Replay.read(report).summary()
    assert (totals["sent"], totals["failed"], totals["runs"]) == (1, 3, 1)
    assert totals["failed_by_code"] == {"server_error": 1, "bad_request": 1, "timeout": 1}
    assert totals["failed_by_token"] == {"t1": 2, "t2": 1}
    out = tmp_path / "failed.csv"
    with out.open("w") as f:
        assert write_failed(report, f) == 3
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["token", "email", "error_code", "error_message"]
    assert sorted(row[:2] for row in rows[1:]) == [["t1", "b@x.io"], ["t1", "c@x.io"],
                                                   ["t2", "a@x.io"]]  # fmt: skip
    assert sorted(row[2] for row in rows[1:]) == ["bad_request", "server_error", "timeout"]


QUEUE = QueueRead(claimed=0, dead_lettered=0, group="g", consumer="c")


@pytest.mark.parametrize(
    ("facts", "advice"),
    [
        ({}, "nothing: everyone is invited"),
        ({"interrupted": True, "unsent": 5},
         "5 not sent yet, nothing is lost. Finish with: invite-worker run in.csv --resume"),
        ({"interrupted": True, "read": QUEUE},
         "stay pending for the next worker, nothing is lost. Run again with: invite-worker "
         "run redis://r:6379/0 --stream s"),
        ({"emails_failed": 2}, "invite-worker report failed r.jsonl --output retry.csv"),
        ({"aborted": True}, "check DD_API_KEY"),
        ({"halted": Halt("storage_error", "cannot write 'r.jsonl': full. More")},
         "cannot write 'r.jsonl': full; then: invite-worker run in.csv --resume"),
        ({"emails_failed": 1, "refused_by_code": {"not_on_share_list": 1}}, "--add-invitees"),
        ({"emails_failed": 3, "refused_by_code": {"dashboard_paused": 2}},
         "--output retry.csv, then run retry.csv (the refused are left out: resume sharing the "
         "paused dashboards, then add --include-refused)"),
        ({"rejected": 3}, "fix the rejected rows"),
        ({"job": JobTotals(emails_sent=1, emails_failed=2, emails_skipped=0, rejected=0,
                           unknown=0)}, "report failed r.jsonl --output retry.csv"),
        ({"invitees_lost": 2, "emails_failed": 1}, "once they stop, look again and add the "
         "lost back: invite-worker run in.csv --resume"),
        ({"read": dataclasses.replace(QUEUE, dead_lettered=2)},
         "invite-worker dead-letter list redis://r:6379/0 --stream s; once fixed"),
        ({"read": QUEUE}, "nothing: every message read is settled"),
    ],
)  # fmt: skip
def test_the_terminal_summary_ends_with_the_next_step(facts: dict[str, Any], advice: str) -> None:
    """The human summary names the one next step that fits how the run ended."""
    summary = a_summary(**facts)
    queue = isinstance(summary.read, QueueRead)
    source = ["redis://r:6379/0", "--stream", "s"] if queue else ["in.csv"]
    out = io.StringIO()
    print_summary(summary, "r.jsonl", ["invite-worker", "run", *source], out)
    text = out.getvalue()
    assert "invited" in text
    assert advice in text.splitlines()[-1]


def test_the_terminal_summary_says_zero_requests_when_none_were_made() -> None:
    """A run that asked the service nothing (everyone settled by --resume) says 0 requests,
    not an empty line."""
    summary = a_summary(requests=0, requests_by_kind={"invite": 0, "dashboard": 0})
    out = io.StringIO()
    print_summary(summary, "r.jsonl", ["invite-worker", "run", "in.csv"], out)
    [line] = [line for line in out.getvalue().splitlines() if line.strip().startswith("requests")]
    assert line.split()[-1] == "0", line


def test_a_resumed_runs_table_says_what_the_report_had_settled() -> None:
    """--resume: the table says how many rows the report's earlier runs had settled, beside
    what this run did (a daily job's table would otherwise show only today's few)."""
    summary = a_summary(read=FileRead(skipped=152, tokens=3), resumed=True, emails_sent=1)
    out = io.StringIO()
    print_summary(summary, "r.jsonl", ["invite-worker", "run", "in.csv", "--resume"], out)
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert ["settled", "before", "152", "(by", "this", "report's", "earlier", "runs)"] in lines
    fresh = io.StringIO()
    print_summary(a_summary(), "r.jsonl", ["invite-worker", "run", "in.csv"], fresh)
    assert "settled before" not in fresh.getvalue()
    assert "invitees added" not in fresh.getvalue()


def test_the_table_says_how_many_invitees_were_added_even_when_their_sends_failed() -> None:
    """--add-invitees: the table counts the invitees added (access granted), beside a send
    that then failed."""
    summary = a_summary(emails_sent=0, emails_failed=2, invitees_added=2, exit_code=1)
    out = io.StringIO()
    print_summary(summary, "r.jsonl", ["invite-worker", "run", "in.csv", "--add-invitees"], out)
    assert ["invitees", "added", "2"] in [line.split() for line in out.getvalue().splitlines()]


def test_the_eta_holds_steady_through_bursts_paced_by_a_rate_limit() -> None:
    """A run paced to 100 requests per 10 s window sends in bursts; the ETA shown at each
    redraw stays within 15% of the truth once a minute has passed, where the instant rate
    would swing between nothing and ten times the average."""
    now = [0.0]
    rate = SteadyRate(lambda: now[0])
    total, done, etas = 60_000, 0, []
    while done < total:
        second = now[0] % 10
        if second < 1:  # the window's budget, spent in its first second: 1,000 emails/s
            done = min(total, done + 250)
        r = rate.add(done)
        eta = SteadyRate.eta(total - done, r)
        if now[0] >= 60 and eta is not None and done < total:
            truth = (total - done) / 100  # 100 emails/s on average
            etas.append(eta / truth)
        now[0] += 0.25
    assert etas
    assert min(etas) > 0.85
    assert max(etas) < 1.15


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4s"), (200, "3m 20s"), (7500, "2h 05m")])
def test_durations_are_short_and_steady_in_width(seconds: float, text: str) -> None:
    """The ETA reads 45s, 3m 20s, 2h 05m."""
    assert duration_text(seconds) == text


def test_summarize_counts_an_open_intent_unknown_whatever_an_earlier_record_says(
    tmp_path: Path,
) -> None:
    """A pair failed on one day and asked again the next by a run that died with its request
    out counts unknown only; a pair sent since its intent, or whose intent was cleared,
    counts as its record says."""
    report = tmp_path / "r.jsonl"
    batch = '{"kind":"batch","token":"tok","emails":%s,"status":"%s"}\n'
    report.write_text(batch % ('["a@x.example","b@x.example"]', "failed")
                      + batch % ('["c@x.example"]', "sent"))  # fmt: skip
    journal_path(report).write_text(
        '{"i":"1","token":"tok","emails":["a@x.example","c@x.example"],"at":1.0}\n'
        '{"i":"2","token":"tok","emails":["b@x.example"],"at":1.0}\n{"c":"2"}\n'
    )
    totals = Replay.read(report).summary(Replay.read(report).open_in(journal_path(report)))
    assert (totals["unknown"], totals["failed"], totals["sent"]) == (1, 1, 1)
    assert totals["failed_by_token"] == {"tok": 1}
    # No journal (a run that ended with nothing open empties it): nothing unknown.
    journal_path(report).unlink()
    assert (
        Replay.read(report).summary(Replay.read(report).open_in(journal_path(report)))["unknown"]
        == 0
    )


def queue_failures(tmp_path: Path, *forbidden: str) -> Path:
    """A report of three failures as a queue worker writes them: a@ outcome_unknown, b@
    server_error, and ``forbidden`` refused by a 403."""
    report = tmp_path / "r.jsonl"
    batch = '{"kind":"batch","token":"tok","emails":%s,"status":"failed","error":%s}\n'
    report.write_text(
        batch % ('["a@x.example"]', '{"code":"outcome_unknown","message":"502"}')
        + batch % ('["b@x.example"]', '{"code":"server_error","message":"500"}')
        + batch % (json.dumps(list(forbidden)), '{"code":"forbidden","message":"403"}')
    )
    return report


def test_summarize_counts_pending_what_report_failed_leaves_out_of_a_queue_report(
    tmp_path: Path,
) -> None:
    """A queue worker's failures that leave their message pending count as pending, not
    failed, as report failed leaves them out; with a journal (a file run's report) the
    same records are failures. The text names them and says who settles them."""
    report = queue_failures(tmp_path, "c@x.example", "d@x.example")
    summarized = invite_worker("report", "summarize", str(report), "--json")
    totals = json.loads(summarized.stdout)
    assert (totals["pending"], totals["failed"], totals["failed_by_code"]) == (
        3, 1, {"server_error": 1})  # fmt: skip
    text = invite_worker("report", "summarize", str(report)).stdout.decode()
    assert "emails pending" in text
    assert "the worker that claims it settles it" in text
    journal_path(report).write_bytes(b"")
    totals = json.loads(invite_worker("report", "summarize", str(report), "--json").stdout)
    assert (totals["pending"], totals["failed"]) == (0, 4)


def test_report_failed_leaves_out_what_a_queue_worker_left_pending(tmp_path: Path) -> None:
    """A queue worker's failure that leaves its message pending (outcome_unknown, which
    may have been created; forbidden: the keys, not the message) is settled by the worker
    that claims it (queue mode keeps no journal): report failed leaves it out, counted,
    as it does an open intent; a failure known unsent is listed. A file run's, an
    outcome_unknown whose intent a --resume cleared (the journal there, emptied), is
    listed."""
    report = queue_failures(tmp_path, "c@x.example")
    out, left_out = io.StringIO(), Counter[str]()
    assert write_failed(report, out, left_out=left_out) == 1
    assert "b@x.example" in out.getvalue()
    assert "a@x.example" not in out.getvalue()
    assert left_out == Counter({UNSETTLED: 2})
    journal_path(report).write_bytes(b"")
    out, left_out = io.StringIO(), Counter[str]()
    assert write_failed(report, out, left_out=left_out) == 3
    assert not left_out


def test_report_failed_keeps_its_output_when_the_journal_cannot_be_read(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    """report failed --output X --overwrite whose journal cannot be read (a directory in its
    place) is exit 2 naming it, and X is left as it was, not emptied."""
    report, output = tmp_path / "r.jsonl", tmp_path / "retry.csv"
    error = '{"code":"server_error","message":"500"}'
    report.write_text(
        '{"kind":"batch","token":"tok","emails":["b@x.example"],"status":"failed",'
        f'"error":{error}}}\n'
    )
    journal_path(report).mkdir()
    output.write_text("token,email\nkept,kept@x.example\n")
    failed = spawn("report", "failed", str(report), "--output", str(output), "--overwrite")
    failed.expect(2, timeout=30)
    assert str(journal_path(report)) in failed.stderr()
    assert output.read_text() == "token,email\nkept,kept@x.example\n"
