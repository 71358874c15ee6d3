"""What a run says about itself is true: counts after a stop, exit codes, hints, headings,
progress, and the files it leaves beside its report (a real process, real files)."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    Proc,
    emulator_invited,
    on_a_terminal,
    read_report,
    worker_command,
    worker_env,
)

SAMPLE = ROOT / "sample_inputs" / "invites.csv"
KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def shown(seen: bytes) -> list[str]:
    """What a terminal showed, one entry per redraw or line, escape sequences removed."""
    return [part for part in re.split(r"[\r\n]", ANSI.sub("", seen.decode())) if part.strip()]


def write_rows(path: Path, rows: int, tokens: int = 1) -> set[tuple[str, str]]:
    pairs = {(f"tok{i % tokens}", f"u{i}@example.com") for i in range(rows)}
    path.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    return pairs


@pytest.mark.timeout(120)
def test_a_stop_counts_the_rows_never_read_and_the_total_shows_at_once(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Cases 5 and 9: in a rate-limited run of 30,000 rows the bar's total shows within its
    first redraws (not at the end), and after SIGTERM "N invited; M not sent yet" adds up
    to every row, read or not; the report's summary says the same."""
    url = start_emulator("--limit", "5", "--period", "1")
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    write_rows(source, 30_000)
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--batch-size", "20",
                       "--report", str(report)),
        when=b"/30000", then=lambda proc: proc.send_signal(signal.SIGTERM),
    )  # fmt: skip
    assert code == 3
    last = shown(seen)[-1]
    found = re.search(r"Stopped by SIGTERM: ([\d,]+) invited; ([\d,]+) not sent yet", last)
    assert found, last
    invited, left = (int(n.replace(",", "")) for n in found.groups())
    assert invited + left == 30_000  # the rows never read count too
    summary = read_report(report)[-1]
    assert summary["unread"] > 0
    assert summary["emails_sent"] + summary["unsent"] + summary["unread"] == 30_000
    assert "Done" not in "".join(shown(seen)[-12:])


@pytest.mark.timeout(90)
def test_the_bar_fits_a_narrow_terminal(tmp_path: Path, start_emulator: Callable[..., str]) -> None:
    """Case 9: on an 80-column terminal every redraw of the bar fits whole: no longer than
    80 columns and never cut off (each ends with its closing bracket)."""
    url = start_emulator("--limit", "20", "--period", "1")
    source = tmp_path / "in.csv"
    write_rows(source, 2_000, tokens=3)
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--batch-size", "50",
                       "--report", str(tmp_path / "r.jsonl")),
        columns=80,
    )  # fmt: skip
    assert code == 0
    bars = [part for part in shown(seen) if part.startswith("invites:")]
    assert bars
    assert max(len(bar) for bar in bars) <= 80, max(bars, key=len)
    assert all(bar.rstrip().endswith("]") for bar in bars), [b for b in bars if b[-1] != "]"]
    assert any("email/s" in bar and "sent" in bar for bar in bars)


def test_the_bar_counts_a_refused_email_once(tmp_path: Path) -> None:
    """The sample's two refused emails show as refused on the bar, not as failed too: the
    bar adds up as the end table does."""
    code, seen = on_a_terminal(
        worker_command("run", str(SAMPLE), "--sandbox", "--report", str(tmp_path / "r.jsonl")),
        columns=200,
    )  # fmt: skip
    assert code == 1  # the sample's bad rows
    last = [part for part in shown(seen) if part.startswith("invites:")][-1]
    assert "sent 3" in last, last
    assert "failed 0" in last, last
    assert "refused 2" in last, last


@pytest.mark.timeout(150)
async def test_a_queue_worker_stopped_says_how_to_resume_at_once(
    tmp_path: Path, start_emulator: Callable[..., str], redis_server: str, redis: Redis,
    stream_name: str, spawn: Callable[..., Proc],
) -> None:  # fmt: skip
    """Case 5: a queue worker with --until-empty stopped by SIGTERM exits 3, as a file run
    does, and its "Run again with" names its --consumer: run as shown it re-reads its own
    pending messages at once (not after --claim-idle) and everyone is invited once."""
    url = start_emulator("--limit", "5", "--period", "1")
    source = tmp_path / "in.csv"
    pairs = write_rows(source, 400, tokens=2)
    spawn("enqueue", str(source), redis_server, "--stream", stream_name).expect(0, timeout=60)
    argv = worker_command("run", redis_server, "--stream", stream_name, "--until-empty",
                          "--batch-size", "20", "--linger", "0.1", "--api-url", url,
                          "--report", str(tmp_path / "w.jsonl"))  # fmt: skip
    code, seen = await _on_a_terminal_async(argv, b"invites:")
    assert code == 3
    last = shown(seen)[-1]
    assert "Run again with: " in last, last
    again = shlex.split(last.split("Run again with: ", 1)[1])
    assert "--consumer" in again
    started = time.monotonic()
    finished = await asyncio.to_thread(
        subprocess.run, worker_command(*again[1:]), env=worker_env(**KEYS), cwd=ROOT,
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    assert time.monotonic() - started < 55  # did not wait out --claim-idle (60 s)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def _on_a_terminal_async(argv: list[str], when: bytes) -> tuple[int, bytes]:
    return await asyncio.to_thread(on_a_terminal, argv, when,
                                   lambda proc: proc.send_signal(signal.SIGTERM))  # fmt: skip


def test_sandbox_counts_every_request_and_report_failed_names_what_it_left_out(
    tmp_path: Path,
) -> None:
    """Case 5: the summary's requests count every request (requests_by_kind beside it), and
    'report failed' says how many refusals it left out, naming --include-refused."""
    report = tmp_path / "r.jsonl"
    done = subprocess.run(worker_command("run", str(SAMPLE), "--sandbox", "--report",
                                         str(report)), env=worker_env(), cwd=ROOT,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr.decode()
    summary = read_report(report)[-1]
    assert summary["requests"] == sum(summary["requests_by_kind"].values())
    assert summary["requests"] > summary["requests_by_kind"]["invite"]
    failed = subprocess.run(worker_command("report", "failed", str(report), "--output",
                                           str(tmp_path / "retry.csv")), cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert failed.returncode == 0, failed.stderr
    assert "0 failed email(s) written to" in failed.stderr
    left_out = ("2 refused by the dashboard check left out (not_on_share_list 1, "
                "token_not_found 1): add --include-refused")  # fmt: skip
    assert left_out in failed.stderr, failed.stderr


@pytest.mark.timeout(90)
def test_headings_and_next_steps_match_what_happened(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Case 5: refused keys end under "Halted:" (not "Done:"); a sandbox run whose only
    refusal is token_not_found is told to check the tokens, not to --add-invitees."""
    url = start_emulator("--app-key", "another-app-key")  # the worker's key is refused
    source = tmp_path / "in.csv"
    write_rows(source, 50)
    code, seen = on_a_terminal(worker_command("run", str(source), "--api-url", url, "--report",
                                              str(tmp_path / "a.jsonl")))  # fmt: skip
    assert code == 3
    text = "\n".join(shown(seen))
    assert "Halted: " in text, text[-1500:]
    assert "Done: " not in text
    gone = tmp_path / "gone.csv"
    gone.write_text("token,email\ngone-0000aaaa1111bbbb-deadbeef,edsger@example.com\n")
    code, seen = on_a_terminal(worker_command("run", str(gone), "--sandbox", "--report",
                                              str(tmp_path / "g.jsonl")))  # fmt: skip
    assert code == 1
    [next_step] = [line for line in shown(seen) if line.startswith("Next: ")]
    assert "check the tokens" in next_step, next_step
    assert "--add-invitees" not in next_step
    assert "--include-refused" in next_step


@pytest.mark.timeout(90)
def test_an_interrupted_run_off_a_terminal_is_not_logged_as_aborted(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """Case 5: off a terminal, SIGTERM ends with run.finished (interrupted=true, a warning),
    never with run.aborted carrying aborted=false."""
    url = start_emulator("--limit", "10", "--period", "1")
    source = tmp_path / "in.csv"
    write_rows(source, 3_000)
    proc = spawn("run", str(source), "--api-url", url, "--batch-size", "20", "--report",
                 str(tmp_path / "r.jsonl"))  # fmt: skip
    deadline = time.monotonic() + 30
    while not emulator_invited(url):
        assert time.monotonic() < deadline, proc.stderr()
        time.sleep(0.1)
    proc.popen.send_signal(signal.SIGTERM)
    proc.expect(3, timeout=30)
    events = [msgspec.json.decode(line) for line in proc.log.read_bytes().splitlines()]
    assert all(e["aborted"] is True for e in events if e["event"] == "run.aborted")
    [last] = [e for e in events if e["event"] == "run.finished"]
    assert (last["interrupted"], last["level"], last["exit_code"]) == (True, "warning", 3)


def test_gitignore_covers_every_file_a_run_writes(tmp_path: Path) -> None:
    """Case 10: after the README's first command, a default run, a dry run and 'report
    failed', git ignores every file they wrote beside the report."""
    env = worker_env()
    for argv in (
        ["run", str(SAMPLE), "--sandbox", "--report", "sandbox-report.jsonl", "--overwrite"],
        ["run", str(SAMPLE), "--sandbox"],
        ["run", str(SAMPLE), "--dry-run"],
        ["report", "failed", "sandbox-report.jsonl", "--output", "retry.csv"],
    ):
        subprocess.run(worker_command(*argv), env=env, cwd=tmp_path, capture_output=True,
                       timeout=60, check=False)  # fmt: skip
    written = sorted(p.name for p in tmp_path.iterdir())
    assert {"sandbox-report.jsonl.journal", "invite-report.plan.jsonl.lock"} <= set(written)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT,
                             input="\n".join(written), capture_output=True, text=True,
                             check=False)  # fmt: skip
    assert sorted(ignored.stdout.split()) == written
