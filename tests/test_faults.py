"""Faults outside one healthy run, on real processes: two runs on one report, a full disk,
an API that cannot be reached, a --resume with nothing to resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Proc, by_kind, emulator_invited, free_port, read_report, write_input
from worker.record.lock import lock_path


def requests_seen(url: str) -> int:
    """How many requests a standalone emulator has received."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=10) as resp:  # noqa: S310
        count: int = json.loads(resp.read())["requests"]
        return count


def wait_until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def events(proc: Proc) -> list[dict[str, object]]:
    """The JSON log events a process wrote to stderr."""
    return [json.loads(line) for line in proc.log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("second_args", [("--resume",), ("--overwrite",)])
def test_a_second_run_on_the_same_report_is_refused_before_any_request(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    second_args: tuple[str, ...],
) -> None:
    """While one run holds the report, a second (with --resume or --overwrite) exits 2 at
    once, naming the holder's pid, and sends nothing; once the first is killed, --resume
    takes over and everyone is invited exactly once."""
    url = start_emulator("--limit", "20", "--period", "1")
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = write_input(source, 1500, 3)
    # A short --timeout: the --resume after the SIGKILL waits out its requests' timeout.
    common = ("--report", str(report), "--api-url", url, "--batch-size", "10",
              "--log-format", "json", "--reconcile-delay", "0.2", "--timeout", "3")  # fmt: skip
    first = spawn("run", str(source), *common)
    wait_until(lambda: sum(emulator_invited(url).values()) >= 50, 30)
    before = report.read_bytes()
    started = time.monotonic()
    second = spawn("run", str(source), *common, *second_args)
    second.expect(2, timeout=30)
    assert time.monotonic() - started < 15
    message = second.stderr()
    assert "in use by another run" in message
    assert f"pid {first.popen.pid}" in message
    assert report.read_bytes().startswith(before)  # not truncated by --overwrite
    assert not [e for e in events(second) if e.get("event") == "run.started"]
    first.popen.kill()
    first.expect(-9, timeout=10)
    spawn("run", str(source), *common, "--resume").expect(0, timeout=120)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert lock_path(report).exists()


def test_a_second_run_through_a_hard_link_to_the_report_is_refused(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """A hard link is the same report under another name, with a .lock of its own beside
    it: a second run through it exits 2 at once, sending nothing (both ran, inviting 54
    people twice); the first then finishes, everyone invited once."""
    url = start_emulator("--limit", "20", "--period", "1")
    source, report, alias = tmp_path / "in.csv", tmp_path / "report.jsonl", tmp_path / "alias.jsonl"
    pairs = write_input(source, 600, 3)
    common = ("--api-url", url, "--batch-size", "10", "--log-format", "json")
    first = spawn("run", str(source), "--report", str(report), *common)
    wait_until(lambda: report.exists() and sum(emulator_invited(url).values()) >= 20, 30)
    os.link(report, alias)
    second = spawn("run", str(source), "--report", str(alias), "--resume", *common)
    second.expect(2, timeout=30)
    assert "in use by another run under another name (a hard link" in second.stderr()
    assert not [e for e in events(second) if e.get("event") == "run.started"]
    first.expect(0, timeout=120)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 160 KiB tmpfs, as root; skipped where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=160k,mode=0700", "tmpfs",
                           str(where)], capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.mark.parametrize("resume_at", ["same disk, grown", "a copy elsewhere"])
def test_a_full_disk_stops_the_run_cleanly_and_resume_finishes_it(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    small_disk: Path,
    resume_at: str,
) -> None:
    """The report's filesystem fills up mid-run: exit 3 within seconds, one message naming
    the path and ENOSPC; after space is freed (or the files are copied), --resume invites
    everyone exactly once."""
    url = start_emulator()
    source = tmp_path / "in.csv"
    pairs = write_input(source, 3000, 4)
    report = small_disk / "report.jsonl"
    # A short --timeout: the resume waits out each open intent's timeout before listing it.
    common = ("--api-url", url, "--batch-size", "10", "--reconcile-delay", "0.2",
              "--timeout", "3", "--log-format", "json")  # fmt: skip
    started = time.monotonic()
    run = spawn("run", str(source), "--report", str(report), *common)
    run.expect(3, timeout=60)
    assert time.monotonic() - started < 30
    halted = [e for e in events(run) if e.get("event") == "run.halted"]
    assert len(halted) == 1, run.stderr()
    assert halted[0]["code"] == "storage_error"
    assert str(small_disk) in str(halted[0]["error"])
    assert "No space left on device (ENOSPC)" in str(halted[0]["error"])
    assert "Traceback" not in run.stderr()
    # The halted run's counts are the report's: a send whose record the disk refused is
    # an unknown outcome (its intent stays open), neither sent nor unsent.
    [finished] = [e for e in events(run) if e.get("event") == "run.finished"]
    recorded = sum(len(b["emails"]) for b in by_kind(read_report(report), "batch")
                   if b["status"] == "sent")  # fmt: skip
    assert finished["emails_sent"] == recorded
    counted = [int(str(finished[key])) for key in ("emails_sent", "unsent", "valid")]
    assert counted[0] + counted[1] <= counted[2]
    partial = emulator_invited(url)
    assert 0 < len(partial) < len(pairs)
    assert set(partial.values()) == {1}
    if resume_at == "same disk, grown":
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    else:
        copy = tmp_path / "elsewhere"
        copy.mkdir()
        for name in ("report.jsonl", "report.jsonl.journal"):
            shutil.copy(small_disk / name, copy / name)
        report = copy / "report.jsonl"
    spawn("run", str(source), "--report", str(report), *common, "--resume").expect(0, 120)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    sent = Counter(
        (b["token"], e) for b in by_kind(read_report(report), "batch")
        if b["status"] == "sent" for e in b["emails"]
    )  # fmt: skip
    assert set(sent) == pairs


def test_a_disk_full_from_the_start_says_to_run_again_and_that_run_sends_all(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    small_disk: Path,
) -> None:
    """The report's filesystem is full before the run writes anything: exit 3, no POST
    made; the advice's --resume finds no run (exit 2, nothing sent), as the advice says it
    may, and the same command without it, once space is freed, invites everyone once."""
    url = start_emulator()
    source = tmp_path / "in.csv"
    pairs = write_input(source, 200, 2)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # until the disk is full (ENOSPC)
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    args = ("run", str(source), "--report", str(small_disk / "report.jsonl"), "--api-url", url,
            "--log-format", "json")  # fmt: skip
    run = spawn(*args)
    run.expect(3, timeout=60)
    [halted] = [e for e in events(run) if e.get("event") == "run.halted"]
    assert "if it finds no run in the report, nothing was sent" in str(halted["error"])
    assert emulator_invited(url) == {}  # (the dashboard check read, nothing was posted)
    filler.unlink()
    before = requests_seen(url)
    resumed = spawn(*args, "--resume")
    resumed.expect(2, timeout=30)
    assert "holds no run" in resumed.stderr()
    assert requests_seen(url) == before
    spawn(*args).expect(0, timeout=60)
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}


def test_an_api_that_cannot_be_reached_stops_within_seconds_and_resume_sends_all(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """A wrong port: exit 3 within seconds with one message naming the URL, no batch
    recorded as failed; --resume against the right URL then sends everything once."""
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = write_input(source, 500, 2)
    wrong = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = spawn("run", str(source), "--report", str(report), "--api-url", wrong,
                "--batch-size", "10", "--log-format", "json")  # fmt: skip
    run.expect(3, timeout=60)
    assert time.monotonic() - started < 15
    halted = [e for e in events(run) if e.get("event") == "run.halted"]
    assert len(halted) == 1
    assert f"cannot reach the API at {wrong}" in str(halted[0]["error"])
    warnings = [e for e in events(run) if e.get("event") == "batch.retry_scheduled"]
    assert len(warnings) <= 4
    records = read_report(report)
    assert by_kind(records, "batch") == []
    assert records[-1]["unsent"] == len(pairs)
    assert records[-1]["halted"]["code"] == "service_unreachable"
    url = start_emulator()
    spawn("run", str(source), "--report", str(report), "--api-url", url,
          "--resume").expect(0, timeout=60)  # fmt: skip
    invited = emulator_invited(url)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}


@pytest.mark.parametrize("report_state", ["missing", "empty", "only a torn line"])
def test_resume_without_an_earlier_run_exits_2_before_any_request(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    report_state: str,
) -> None:
    """--resume on a report that does not exist or holds no run never starts over."""
    url = start_emulator()
    source, report = tmp_path / "in.csv", tmp_path / "typo-report.jsonl"
    write_input(source, 50, 1)
    if report_state == "empty":
        report.write_bytes(b"")
    elif report_state == "only a torn line":
        report.write_bytes(b'{"kind": "batch", "tok')
    run = spawn("run", str(source), "--report", str(report), "--api-url", url, "--resume")
    run.expect(2, timeout=30)
    assert str(report) in run.stderr()
    assert requests_seen(url) == 0


def test_resume_with_an_unreadable_journal_exits_2_before_any_request(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """--resume of a report whose journal cannot be read (here a directory in its place)
    is a usage error naming it, exit 2, with nothing sent: not a traceback and exit 1."""
    url = start_emulator()
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    write_input(source, 5, 1)
    args = ("run", str(source), "--report", str(report), "--api-url", url)
    spawn(*args).expect(0, timeout=30)
    journal = tmp_path / "report.jsonl.journal"
    journal.unlink(missing_ok=True)
    journal.mkdir()
    before = requests_seen(url)
    run = spawn(*args, "--resume")
    run.expect(2, timeout=30)
    assert str(journal) in run.stderr()
    assert "Traceback" not in run.stderr()
    assert requests_seen(url) == before


@pytest.mark.parametrize("listener", ["closes at once", "answers garbage"])
def test_a_port_where_something_else_listens_stops_the_run_like_a_wrong_one(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc], listener: str
) -> None:
    """Something that is not the API on the port (it hangs up, or answers what is not
    HTTP, as a Redis would): reads that get no HTTP answer count as failed connections,
    so the run stops with exit 3 and no row recorded failed, as for a refused port;
    --resume then sends everyone."""
    import socketserver
    import threading

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            if listener == "answers garbage":
                self.request.recv(65536)
                self.request.sendall(b"-ERR unknown command 'GET'\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
        pairs = write_input(source, 200, 2)
        wrong = f"http://127.0.0.1:{server.server_address[1]}"
        started = time.monotonic()
        run = spawn("run", str(source), "--report", str(report), "--api-url", wrong,
                    "--batch-size", "10", "--log-format", "json", "--timeout", "1")  # fmt: skip
        run.expect(3, timeout=60)
        assert time.monotonic() - started < 30
        records = read_report(report)
        assert by_kind(records, "batch") == []
        assert records[-1]["halted"]["code"] == "service_unreachable"
    finally:
        server.shutdown()
        server.server_close()
    url = start_emulator()
    spawn("run", str(source), "--report", str(report), "--api-url", url,
          "--resume").expect(0, timeout=60)  # fmt: skip
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
