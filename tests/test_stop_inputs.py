"""Stopping a real process whatever feeds it: a silent pipe, a FIFO, a terminal, a stuck loop."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    by_kind,
    emulator_invited,
    read_report,
    rows_csv,
    worker_command,
    worker_env,
)

KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
#: 40 pairs over two tokens; with --batch-size 5 the first 23 rows make four full batches
#: (20 emails) and leave three rows held in partial ones.
PAIRS = sorted({(f"dash-{i % 2}", f"person{i}@example.com") for i in range(40)})
FIRST = PAIRS[:12] + PAIRS[20:31]


class Worker:
    """One ``python -m worker`` process; its stderr in a file, killed if still alive."""

    def __init__(self, argv: list[str], stdin: int | None, log: Path) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.popen = subprocess.Popen(
                argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                env=worker_env(**KEYS), cwd=ROOT,
            )  # fmt: skip

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def exits(self, code: int | tuple[int, ...], within: float) -> float:
        """Wait for the exit, check its code (or one of them); the seconds it took."""
        started = time.monotonic()
        try:
            got = self.popen.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            raise AssertionError(f"still running after {within}s:\n{self.stderr()}") from None
        codes = code if isinstance(code, tuple) else (code,)
        assert got in codes, f"exit {got}, expected {code}:\n{self.stderr()}"
        return time.monotonic() - started


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers (argv after ``python -m worker``, optional stdin); killed after."""
    workers: list[Worker] = []

    def starter(*args: str, stdin: int | None = None, argv: list[str] | None = None) -> Worker:
        log = tmp_path / f"stderr-{len(workers)}.log"
        worker = Worker(argv or worker_command(*args), stdin, log)
        workers.append(worker)
        return worker

    yield starter
    for worker in workers:
        if worker.popen.poll() is None:
            worker.popen.kill()
            worker.popen.wait(timeout=10)


class Writer:
    """The writing end of a pipe on a worker's standard input."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        """The end of the input (idempotent)."""
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def piped(start: Callable[..., Worker]) -> Iterator[Callable[..., tuple[Worker, Writer]]]:
    """Start a worker (argv after ``python -m worker``) reading a pipe: the worker and the
    pipe's writing end, closed after the test."""
    writers: list[Writer] = []

    def starter(*args: str) -> tuple[Worker, Writer]:
        read_end, write_end = os.pipe()
        writers.append(Writer(write_end))
        try:
            return start(*args, stdin=read_end), writers[-1]
        finally:
            os.close(read_end)

    yield starter
    for writer in writers:
        writer.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sigterm_in(pid: int, mask: str) -> bool:
    """Whether SIGTERM is in the process's ``mask`` of /proc/PID/status (Linux): SigCgt,
    a handler is set; SigBlk, its main thread holds it back."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{mask}:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM yet."""
    return sigterm_in(pid, "SigCgt")


def open_fifo_writer(path: str | Path, worker: Worker, timeout: float = 30) -> int:
    """The FIFO's writing end, once the worker has opened it to read (or an error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert worker.popen.poll() is None, f"the worker ended:\n{worker.stderr()}"
            assert time.monotonic() < deadline, "the worker never opened the FIFO"
            time.sleep(0.05)
        else:
            os.set_blocking(fd, True)
            return fd


def sent_in_report(report: Path) -> Counter[tuple[str, str]]:
    return Counter(
        (b["token"], e)
        for b in by_kind(read_report(report), "batch")
        if b["status"] == "sent"
        for e in b["emails"]
    )


class Input:
    """What feeds the worker: its SOURCE argument, its stdin, and the writing end."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind, self.source, self.stdin, self._ends = kind, "-", None, []
        if kind == "pipe":
            self.stdin, self.writer = os.pipe()
        elif kind == "terminal":
            self.writer, self.stdin = pty.openpty()
            attrs = termios.tcgetattr(self.stdin)
            attrs[3] &= ~termios.ECHO  # nobody reads the echo back
            termios.tcsetattr(self.stdin, termios.TCSANOW, attrs)
        else:
            self.source = str(tmp_path / "invites.csv")
            os.mkfifo(self.source)
        self._ends = [fd for fd in (self.stdin,) if fd is not None]

    def open_writer(self, worker: Worker) -> None:
        """A FIFO's writer opens once the worker opened it for reading."""
        if self.kind == "fifo":
            self.writer = open_fifo_writer(self.source, worker)

    def started(self) -> None:
        """The worker holds its end now."""
        for fd in self._ends:
            os.close(fd)
        self._ends = []

    def close(self) -> None:
        for fd in [*self._ends, getattr(self, "writer", None)]:
            if fd is not None:
                os.close(fd)


@pytest.fixture(params=["pipe", "fifo", "terminal"])
def feed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Input]:
    """A pipe on stdin, a FIFO path, or a terminal on stdin; closed after the test."""
    source = Input(request.param, tmp_path)
    yield source
    source.close()


def test_sigterm_while_the_input_is_silent_stops_within_grace(
    feed: Input,
    tmp_path: Path,
    start_emulator: Callable[..., str],
    start: Callable[..., Worker],
) -> None:
    """A writer that sent 23 rows and stays open, silent: SIGTERM ends the run within
    --grace with exit 3, what was sent is in the report, the rows held are left; --resume
    then invites everyone, nobody twice."""
    url = start_emulator()
    report = tmp_path / "report.jsonl"
    worker = start("run", feed.source, "--api-url", url, "--report", str(report),
                   "--batch-size", "5", "--grace", "5", "--reconcile-delay", "0.2",
                   "--linger", "600", stdin=feed.stdin)  # fmt: skip
    feed.started()
    feed.open_writer(worker)
    os.write(feed.writer, rows_csv(FIRST).encode())
    wait_for(lambda: sum(emulator_invited(url).values()) >= 20, "four full batches sent")
    time.sleep(0.5)  # the held rows read too, the next read waiting on the silent writer
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.exits(3, within=15) < 5
    invited = emulator_invited(url)
    assert sent_in_report(report) == Counter(invited)
    assert set(invited.values()) == {1}
    summary = read_report(report)[-1]
    assert summary["kind"] == "summary"
    assert (summary["interrupted"], summary["exit_code"]) == (True, 3)
    # Rows read and not sent are left for --resume (a terminal hands them over a line at a
    # time: the last may still be on its way).
    assert summary["emails_sent"] == 20
    assert summary["unsent"] == summary["valid"] - 20 >= 2
    done = start("run", "-", "--api-url", url, "--report", str(report), "--batch-size", "5",
                 "--resume", stdin=subprocess.PIPE)  # fmt: skip
    assert done.popen.stdin is not None
    done.popen.stdin.write(rows_csv(PAIRS).encode())
    done.popen.stdin.close()
    done.exits(0, within=60)
    invited = emulator_invited(url)
    assert set(invited) == set(PAIRS)
    assert set(invited.values()) == {1}


def test_a_run_stopped_before_any_batch_filled_counts_the_rows_and_tokens_it_read(
    tmp_path: Path, start_emulator: Callable[..., str], piped: Callable[..., tuple[Worker, Writer]]
) -> None:
    """Six rows over two tokens from a pipe that stays open, no batch of 100 full: SIGTERM
    exits 3 with nothing sent, and the summary counts the six rows, the two tokens they
    name, and six emails unsent for --resume."""
    url = start_emulator()
    report = tmp_path / "report.jsonl"
    worker, writer = piped("run", "-", "--api-url", url, "--report", str(report), "--linger",
                           "600")  # fmt: skip
    writer.write(rows_csv(PAIRS[:3] + PAIRS[-3:]).encode())
    wait_for(lambda: report.exists() and catches_sigterm(worker.popen.pid), "the run")
    time.sleep(0.5)  # the six rows read, the next read waiting on the silent writer
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.exits(3, within=15) < 5
    assert emulator_invited(url) == {}
    summary = read_report(report)[-1]
    assert (summary["valid"], summary["tokens"], summary["unsent"]) == (6, 2, 6)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_from_a_pipe_gone_quiet_go_out_after_linger_and_the_run_reads_on(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    piped: Callable[..., tuple[Worker, Writer]],
    fmt: str,
) -> None:
    """A writer that sends six rows over two tokens, then stays silent: with --linger 0.3
    their partial batches are sent while the writer is still open; the rows it sends
    later go out too, each address invited once, exit 0 at the end of the input."""
    url = start_emulator()
    report = tmp_path / "report.jsonl"

    def rows(pairs: list[tuple[str, str]]) -> bytes:
        if fmt == "csv":
            return rows_csv(pairs).encode()
        return "".join(f'{{"token": "{t}", "email": "{e}"}}\n' for t, e in pairs).encode()

    worker, writer = piped("run", "-", "--format", fmt, "--api-url", url, "--report",
                           str(report), "--linger", "0.3")  # fmt: skip
    first, then = PAIRS[:3] + PAIRS[-3:], PAIRS[3:6] + PAIRS[-6:-3]
    writer.write(rows(first))
    wait_for(lambda: len(emulator_invited(url)) == 6, "the quiet pipe's rows sent", 20)
    assert worker.popen.poll() is None  # still reading: the writer is open
    writer.write(rows(then)[len("token,email\n") if fmt == "csv" else 0 :])
    writer.close()
    assert worker.exits(0, within=30) < 30
    assert emulator_invited(url) == dict.fromkeys(first + then, 1)
    assert sent_in_report(report) == Counter(dict.fromkeys(first + then, 1))


@pytest.mark.parametrize("every", [0.15, 0.03])
def test_a_steady_trickle_from_a_pipe_goes_out_while_it_lasts(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    piped: Callable[..., tuple[Worker, Writer]],
    every: float,
) -> None:
    """A row every 0.15 s, more often than --linger 0.5 (each read out long enough to be
    quiet), or every 0.03 s (never quiet): the held rows go out while the writer is still
    writing, not only once it stops; every address invited once at the end."""
    url = start_emulator()
    pairs = PAIRS[:20] if every > 0.1 else PAIRS[:40] + [("dash-2", f"x{i}@example.com")
                                                        for i in range(60)]  # fmt: skip
    worker, writer = piped("run", "-", "--api-url", url, "--report",
                           str(tmp_path / "report.jsonl"), "--linger", "0.5")  # fmt: skip
    writer.write(b"token,email\n")
    written = list(pairs)
    for token, email in pairs:
        writer.write(f"{token},{email}\n".encode())
        time.sleep(every)
    # A start-up slowed by a loaded machine is not what is measured: the trickle goes on
    # (up to 20 s more) until rows have gone out while it lasts.
    deadline = time.monotonic() + 20
    while len(emulator_invited(url)) < 5 and time.monotonic() < deadline:
        written.append(("dash-2", f"late{len(written)}@example.com"))
        writer.write(f"{written[-1][0]},{written[-1][1]}\n".encode())
        time.sleep(every)
    sent_while_writing = len(emulator_invited(url))
    writer.close()
    assert worker.exits(0, within=30) < 30
    assert sent_while_writing >= 5, sent_while_writing
    assert emulator_invited(url) == dict.fromkeys(written, 1)


def test_linger_zero_keeps_a_fast_pipes_batches_whole(
    tmp_path: Path, start_emulator: Callable[..., str], start: Callable[..., Worker]
) -> None:
    """--linger 0 on a pipe that keeps up (cat of 100,000 rows over 200 tokens): a read in
    progress is not silence, so batches stay full: about 1,000 requests of 100."""
    url = start_emulator()
    source = tmp_path / "in.csv"
    pairs = [(f"dash-{i % 200}", f"p{i}@example.com") for i in range(100_000)]
    source.write_text(rows_csv(pairs))
    cat = subprocess.Popen(["cat", str(source)], stdout=subprocess.PIPE)
    try:
        assert cat.stdout is not None
        worker = start("run", "-", "--api-url", url, "--report", str(tmp_path / "r.jsonl"),
                       "--linger", "0", stdin=cat.stdout.fileno())  # fmt: skip
        cat.stdout.close()
        assert worker.exits(0, within=60) < 60
    finally:
        cat.wait(timeout=10)
    batches = by_kind(read_report(tmp_path / "r.jsonl"), "batch")
    sizes = [len(b["emails"]) for b in batches]
    assert sum(sizes) == 100_000
    # Whole, but for a few reads that a loaded machine held past the quiet time (0.1 s):
    # those are silence, and every token's partial batch goes out then (200 at a time).
    # Split at every read, the batches of 200 tokens would hold 9 rows each, none 100.
    assert sizes.count(100) >= 500, sorted(sizes)[:20]


def test_a_dry_run_from_a_pipe_plans_the_list_whole_whatever_its_pauses(
    tmp_path: Path, piped: Callable[..., tuple[Worker, Writer]]
) -> None:
    """A plan sends nothing, so a pause of the writer longer than --linger does not split
    it: three rows of one token, a second apart, are one planned request."""
    plan = tmp_path / "plan.jsonl"
    worker, writer = piped("run", "-", "--dry-run", "--report", str(plan), "--linger", "0.2")
    writer.write(rows_csv(PAIRS[:2]).encode())
    time.sleep(1)
    writer.write(f"{PAIRS[2][0]},{PAIRS[2][1]}\n".encode())
    writer.close()
    worker.exits(0, within=30)
    planned = by_kind(read_report(plan), "batch")
    assert [len(b["emails"]) for b in planned] == [3]


def test_sigterm_before_the_header_exits_at_once(
    tmp_path: Path, start_emulator: Callable[..., str], start: Callable[..., Worker]
) -> None:
    """A pipe whose writer never writes: SIGTERM while the header is awaited exits 3 at
    once, says nothing was sent, and leaves no report."""
    url = start_emulator()
    read_end, write_end = os.pipe()
    report = tmp_path / "report.jsonl"
    try:
        worker = start("run", "-", "--api-url", url, "--report", str(report), stdin=read_end)
        os.close(read_end)
        read_end = -1
        wait_for(lambda: catches_sigterm(worker.popen.pid), "a handler for SIGTERM", 10)
        time.sleep(0.3)  # and waiting for the header
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.exits(3, within=10) < 5
        assert "nothing was sent" in worker.stderr()
        assert not report.exists()
        assert emulator_invited(url) == {}
    finally:
        os.close(write_end)
        if read_end != -1:
            os.close(read_end)


def test_a_fifo_in_the_sandbox_is_read_once(tmp_path: Path, start: Callable[..., Worker]) -> None:
    """--sandbox with a FIFO path: the input is not opened a second time (what a first
    open read would be lost): the run reads every row the writer sent, and ends."""
    fifo = tmp_path / "invites.csv"
    os.mkfifo(fifo)
    report = tmp_path / "report.jsonl"
    worker = start("run", str(fifo), "--sandbox", "--report", str(report))
    writer = open_fifo_writer(fifo, worker)
    try:
        os.write(writer, (ROOT / "sample_inputs" / "invites.csv").read_bytes())
    finally:
        os.close(writer)
    worker.exits((0, 1), within=60)  # ended (the sample holds rows the sandbox refuses)
    summary = read_report(report)[-1]
    lines = (ROOT / "sample_inputs" / "invites.csv").read_text().strip().splitlines()
    assert summary["rows"] == len(lines) - 1


STUCK = """
import sys, threading, pathlib
import worker.batching
def stuck(self, pairs):
    pathlib.Path(sys.argv[1]).touch()
    threading.Event().wait()  # the loop thread blocks, as on a lock nobody releases
worker.batching.Batcher.add_many = stuck
from worker.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_sigterm_exits_at_once_while_the_loop_is_stuck(
    tmp_path: Path, start_emulator: Callable[..., str], start: Callable[..., Worker]
) -> None:
    """The event loop blocked for good: the first SIGTERM cannot stop the run gently, the
    second exits 3 at once and says how to finish."""
    url = start_emulator()
    source, flag = tmp_path / "in.csv", tmp_path / "stuck"
    source.write_text(rows_csv(PAIRS))
    worker = start(argv=[sys.executable, "-c", STUCK, str(flag), "run", str(source),
                         "--api-url", url, "--report", str(tmp_path / "report.jsonl")])  # fmt: skip
    wait_for(flag.exists, "the loop to be stuck")
    worker.popen.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert worker.popen.poll() is None  # stuck: stopping gently needs the loop
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.exits(3, within=10) < 3
    assert "second signal, exiting now" in worker.stderr()
    assert "--resume" in worker.stderr()


def test_a_signal_while_enqueue_adds_its_last_rows_leaves_nothing_to_finish(
    redis_server: str, stream_name: str, start: Callable[..., Worker], tmp_path: Path
) -> None:
    """Ctrl-C while enqueue's only chunk is being added (Redis holding writes for a
    moment): the rows go in, the input has ended, so it exits 0 with no 'interrupted'
    and no hint to finish what is already done."""
    source = tmp_path / "few.csv"
    source.write_text(rows_csv(PAIRS[:5]))
    with Redis.from_url(redis_server) as redis:
        # Held until the signal is sent, however slowly the process starts on a busy
        # machine (a pause timed from before it starts could end before it connects).
        redis.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
        try:
            worker = start("enqueue", str(source), redis_server, "--stream", stream_name)
            wait_for(lambda: catches_sigterm(worker.popen.pid), "the signal handler")
            time.sleep(0.8)  # connected, its first slice held by the pause
            assert worker.popen.poll() is None, worker.stderr()
            worker.popen.send_signal(signal.SIGINT)
        finally:
            redis.execute_command("CLIENT", "UNPAUSE")
        worker.exits(0, within=20)
        assert redis.xlen(stream_name) == 5
    assert "interrupted" not in worker.stderr(), worker.stderr()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_on_enqueue_waiting_for_a_pipes_header_exits_at_once(
    sig: signal.Signals,
    redis_server: str,
    stream_name: str,
    piped: Callable[..., tuple[Worker, Writer]],
) -> None:
    """enqueue from a pipe whose writer has not sent the header yet: Ctrl-C or SIGTERM
    exits 3 at once saying nothing was added (SIGTERM killed it silently, Ctrl-C hung)."""
    worker, _ = piped("enqueue", "-", redis_server, "--stream", stream_name)
    wait_for(lambda: catches_sigterm(worker.popen.pid), "the signal handler")
    time.sleep(0.3)  # and the header's read waiting on the silent writer
    worker.popen.send_signal(sig)
    assert worker.exits(3, within=10) < 3
    assert "stopping at once: nothing was added yet" in worker.stderr(), worker.stderr()
    with Redis.from_url(redis_server) as redis:
        assert not redis.exists(stream_name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_on_enqueue_from_a_silent_pipe_says_where_it_stopped(
    sig: signal.Signals,
    redis_server: str,
    stream_name: str,
    piped: Callable[..., tuple[Worker, Writer]],
    tmp_path: Path,
) -> None:
    """enqueue reading a pipe whose writer stays silent: Ctrl-C or SIGTERM ends it at once
    (exit 3, where SIGTERM had killed it silently, 143), saying how many rows it added and
    the input's last line it took, and how to enqueue the rest of a CSV whose header is
    not on line 1; doing so adds each row once."""
    # A blank line first: the header is line 2, the rows from line 3.
    whole = ["\n", *rows_csv(PAIRS).splitlines(keepends=True)]
    worker, writer = piped("enqueue", "-", redis_server, "--stream", stream_name)
    writer.write("".join(whole[:5]).encode())
    with Redis.from_url(redis_server) as redis:
        wait_for(lambda: redis.exists(stream_name) and redis.xlen(stream_name) == 3,
                 "the rows enqueued")  # fmt: skip
    time.sleep(0.3)  # and the next read waiting on the silent writer
    worker.popen.send_signal(sig)
    assert worker.exits(3, within=10) < 5
    said = worker.stderr()
    assert "Traceback" not in said, said
    assert "stopped by a signal: 3 row(s) added; every row up to line 5" in said, said
    assert "(sed -n 2p FILE; tail -n +6 FILE) | invite-worker enqueue -" in said, said
    source = tmp_path / "whole.csv"
    source.write_text("".join(whole))
    rest = subprocess.run(["sh", "-c", f"sed -n 2p {source}; tail -n +6 {source}"],
                          capture_output=True, check=True, timeout=10).stdout  # fmt: skip
    finish, writer = piped("enqueue", "-", redis_server, "--stream", stream_name)
    writer.write(rest)
    writer.close()
    finish.exits(0, within=30)
    with Redis.from_url(redis_server, decode_responses=True) as redis:
        added = [(f["token"], f["email"]) for _, f in redis.xrange(stream_name)]
    assert sorted(added) == PAIRS  # each row once
