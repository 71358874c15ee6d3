"""Crashes and signals on a real process, against an emulator in another process."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from tests.conftest import (
    Proc,
    by_kind,
    emulator_invited,
    read_report,
    worker_command,
    worker_env,
    write_input,
)
from tests.test_stop_inputs import sigterm_in


def start_worker(
    spawn: Callable[..., Proc], url: str, source: Path, report: Path, *extra: str
) -> Proc:
    # A short --timeout: --resume waits out a killed run's requests before it lists them.
    return spawn("run", str(source), "--report", str(report), "--api-url", url,
                 "--reconcile-delay", "0.2", "--timeout", "3", *extra)  # fmt: skip


def sent_in_report(report: Path) -> Counter[tuple[str, str]]:
    return Counter(
        (b["token"], e.lower())
        for b in by_kind(read_report(report), "batch")
        if b["status"] == "sent"
        for e in b["emails"]
    )


def test_three_sigkills_then_resume_invite_everyone_exactly_once(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """12,000 rows; the worker is SIGKILLed three times at random moments, then --resume
    finishes: every pair invited once, and the report's sent records match the service."""
    url = start_emulator("--limit", "40", "--period", "1", "--error-after-rate", "0.05",
                         "--seed", "4")  # fmt: skip
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = write_input(source, 12_000, 7)
    rng = random.Random(2024)
    for round_ in range(3):
        extra = ("--resume",) if round_ else ()
        before = report.stat().st_size if report.exists() else 0
        proc = start_worker(spawn, url, source, report, *extra)
        # A random moment of the run, not of the start-up: a worker killed before it wrote
        # anything leaves nothing to --resume, and a loaded machine starts slowly.
        deadline = time.monotonic() + 30
        while not report.exists() or report.stat().st_size <= before:
            assert proc.popen.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 1.0))
        proc.popen.kill()
        proc.expect(-signal.SIGKILL, timeout=10)
    created_before_resume = emulator_invited(url)
    assert 0 < sum(created_before_resume.values()) < len(pairs)
    done = start_worker(spawn, url, source, report, "--resume")
    done.expect(0, timeout=120)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert sent_in_report(report) == Counter(invited)
    assert read_report(report)[-1]["kind"] == "summary"


def test_sigterm_stops_within_grace_and_resume_finishes(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGTERM mid-run: exit 3 within --grace, summary last and marked interrupted, every
    created invitation in the report; --resume then completes with no duplicate."""
    url = start_emulator("--limit", "10", "--period", "1")
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = write_input(source, 3_000, 3)
    proc = start_worker(spawn, url, source, report, "--batch-size", "50", "--grace", "5")
    deadline = time.monotonic() + 30
    while not emulator_invited(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    signalled = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    proc.expect(3, timeout=10)
    assert time.monotonic() - signalled < 5
    records = read_report(report)
    summary = records[-1]
    assert summary["kind"] == "summary"
    assert summary["interrupted"] is True
    assert summary["exit_code"] == 3
    assert summary["unsent"] > 0
    invited = emulator_invited(url)
    assert sent_in_report(report) == Counter(invited)
    done = start_worker(spawn, url, source, report, "--batch-size", "50", "--resume")
    done.expect(0, timeout=120)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert msgspec.json.decode(report.read_bytes().splitlines()[-1])["resumed"] is True


_FIRST_SIGNAL_AFTER_A_HALT = """
import asyncio, os, signal, sys
from worker.cli.signals import StopSignals

async def main() -> None:
    with StopSignals(json_lines=True) as signals:
        stop = asyncio.Event()
        received = signals.run_started(stop, "invite-worker run in.csv --resume")
        stop.set()  # the run halted or was refused its keys: it is already stopping
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        print("finished", received, flush=True)

asyncio.run(main())
"""


def test_first_signal_while_a_halted_run_winds_down_is_not_taken_as_the_second() -> None:
    """A run already stopping on its own (a halt, refused keys) still gets its grace and
    its summary when the first SIGTERM arrives: only a second signal exits at once."""
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_SIGNAL_AFTER_A_HALT],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "finished ['SIGTERM']" in done.stdout
    assert "exiting_now" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_command_loads_is_exit_3_with_a_line(
    tmp_path: Path, spawn: Callable[..., Proc], sig: signal.Signals
) -> None:
    """SIGTERM or Ctrl-C while the command's modules still load: held until they are,
    then exit 3 and one line saying to run it again, never killed silently (143) nor a
    traceback."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\ntok-aaaa,a@example.com\n")
    proc = spawn("run", str(source), "--report", str(tmp_path / "r.jsonl"), "--api-url",
                 "http://127.0.0.1:9", "--log-format", "console")  # fmt: skip
    deadline = time.monotonic() + 30
    while not sigterm_in(proc.popen.pid, "SigBlk"):
        assert time.monotonic() < deadline, "the process never held SIGTERM back"
        time.sleep(0.001)
    proc.popen.send_signal(sig)
    proc.expect(3, timeout=30)
    said = proc.stderr()
    assert "Traceback" not in said
    assert "interrupted before it started: nothing was done; run the same command again" in said
    assert not (tmp_path / "r.jsonl").exists()


_SIGNAL_AS_THE_RUN_RETURNS = """
import os, signal, sys
import worker.cli.signals as signals

leave = signals.StopSignals.__exit__

def leave_then_term(self, *exc):
    leave(self, *exc)
    os.kill(os.getpid(), signal.SIGTERM)  # the run is done, the loop not yet closed

signals.StopSignals.__exit__ = leave_then_term
from worker.start import main
sys.argv = ["invite-worker", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_signal_as_a_finished_run_returns_leaves_its_exit_code(tmp_path: Path) -> None:
    """A SIGTERM heard after the run is done (its summary written, its handlers put back,
    the loop closing) leaves the run's exit code as its summary gives it: not exit 3
    with "interrupted"."""
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    source.write_text("token,email\nabc-123,a@example.com\nabc-123,not-an-email\n")
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AS_THE_RUN_RETURNS, "run", str(source), "--sandbox",
         "--report", str(report), "-q"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    summary = msgspec.json.decode(report.read_bytes().splitlines()[-1])
    assert summary["exit_code"] == 1  # a row rejected
    assert done.returncode == 1, done.stderr
    assert "cli.interrupted" not in done.stderr


def test_a_signal_as_a_finished_enqueue_returns_leaves_its_summary_and_code(
    tmp_path: Path, redis_server: str, stream_name: str
) -> None:
    """enqueue prints its summary before a SIGTERM heard as it returns can cut it short:
    the summary is on stdout and the exit code is its own (0), not exit 3."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\nabc-123,a@example.com\n")
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AS_THE_RUN_RETURNS, "enqueue", str(source),
         redis_server, "--stream", stream_name],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout)["enqueued"] == 1
    assert "cli.interrupted" not in done.stderr


def test_enqueue_keeps_its_exit_code_when_its_reader_is_gone(
    tmp_path: Path, redis_server: str, stream_name: str
) -> None:
    """enqueue whose stdout reader went away before the summary (a closed pipe) still
    exits 1 for its rejected row, not 0: the rows were added all the same."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\nabc-123,a@example.com\nabc-123,not-an-email\n")
    proc = subprocess.Popen(
        [*worker_command(), "enqueue", str(source), redis_server, "--stream", stream_name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before anything is said
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
