"""Shared fixtures: an emulator on loopback, configs pointing at it, report helpers."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
    Sequence,
)
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from redis.asyncio import Redis

from worker.config import Config
from worker.emulator import Emulator, Logged
from worker.run.counts import FileRead, QueueRead
from worker.run.summary import AnySummary, Summary
from worker.send import edit_lock
from worker.sources import Source, open_source

API_KEY = "test-api-key-0123456789abcdef"
APP_KEY = "test-app-key-fedcba9876543210"
TOKEN_A = "fasjyydbcgwwc2uc-3dde636009128a6f937e880f67a0ad04"
TOKEN_B = "k9x2mmq7rt5vbc1a-77c1e0f4a2b94e6d8f0a1b2c3d4e5f60"
TOKEN_C = "zz11yy22xx33ww44-0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """The CLI configures structlog globally; give every test the defaults back."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def edit_locks(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs keep their dashboard edit locks in a directory of the test's own, the
    machine's left alone: those in this process here (returned), the processes it starts
    under their own TMPDIR."""
    directory = tmp_path_factory.mktemp("edit-locks")
    monkeypatch.setattr(edit_lock, "default_directory", lambda: directory)
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
    return directory


@pytest.fixture
async def answering() -> AsyncIterator[
    Callable[[Callable[[web.Request], Awaitable[web.Response]]], Awaitable[str]]
]:
    """Serve every request on 127.0.0.1 with the test's own handler (a service the
    emulator cannot play); its base URL. Stopped when the test ends."""
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.Response]]) -> str:
        app = web.Application()
        app.router.add_route("*", "/{anything:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """An emulator on 127.0.0.1 expecting the test keys, with sandbox token rules."""
    emu = Emulator(api_key=API_KEY, app_key=APP_KEY)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
def make_config(tmp_path: Path, emulator: Emulator) -> Callable[..., Config]:
    """Build a Config aimed at the emulator, with waits shrunk so tests run in milliseconds."""

    def build(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "api_url": emulator.url,
            "api_key": API_KEY,
            "app_key": APP_KEY,
            "report_path": tmp_path / "report.jsonl",
            "backoff_base": 0.005,
            "backoff_max": 0.02,
            "ratelimit_jitter": 0.01,
            "ratelimit_default_wait": 0.01,
            "timeout": 5.0,
            "reconcile_delay": 0.01,
            "durable_journal": False,
            # A queue worker's partial batches go at once when the stream is caught up.
            "linger": 0.05,
        }
        values.update(overrides)
        return Config(**values)

    return build


def csv_source(text: str) -> Source:
    """A CSV source over an in-memory string (as if piped on stdin)."""
    return open_source("-", "csv", stdin=io.BytesIO(text.encode()))


def jsonl_source(data: bytes) -> Source:
    """A JSONL source over in-memory bytes."""
    return open_source("-", "jsonl", stdin=io.BytesIO(data))


def rows_csv(pairs: list[tuple[str, str]]) -> str:
    """A CSV input (with its header) of these (token, email) pairs."""
    return "token,email\n" + "".join(f"{t},{e}\n" for t, e in pairs)


def write_input(path: Path, rows: int, tokens: int) -> set[tuple[str, str]]:
    """Write a CSV of ``rows`` distinct pairs over ``tokens`` tokens; return the pairs."""
    pairs = {(f"dash-{i % tokens}", f"person{i}@example.com") for i in range(rows)}
    path.write_text(rows_csv(sorted(pairs)))
    return pairs


def a_summary(read: FileRead | QueueRead | None = None, **facts: Any) -> AnySummary:
    """A run's summary for the terminal's table: 10 invited in 1.5 s, one request, and
    ``facts`` (``read``: a stream worker's share, else a file's)."""
    values: dict[str, Any] = {
        "source": "in.csv", "rows": 10, "valid": 10, "rejected": 0, "rejected_by_reason": {},
        "emails_sent": 10, "emails_failed": 0, "emails_skipped": 0, "refused_by_code": {},
        "invitees_added": 0, "invitees_lost": None, "invitees_unchecked": None,
        "skipped_by_reason": {}, "batches_sent": 1,
        "batches_failed": 0,
        "requests": 1, "retries": 0, "rate_limited": 0, "ratelimit_waits": 0, "splits": 0,
        "unknown_outcomes": 0, "reconciled_sent": 0, "reconcile_requests": 0, "list_pages": 0,
        "requests_by_kind": {"invite": 1}, "unsent": 0, "unread": 0, "aborted": False,
        "abort_reason": None, "interrupted": False, "halted": None, "resumed": False,
        "exit_code": 0, "started_at": "", "finished_at": "", "duration_ms": 1500.0,
    }  # fmt: skip
    if isinstance(read, QueueRead):
        return Summary(read=read, **{**values, **facts})
    return Summary(read=read or FileRead(skipped=0, tokens=1), **{**values, **facts})


def read_report(path: Path) -> list[dict[str, Any]]:
    """Every record of a report, checking each line is one JSON object."""
    records = []
    for line in path.read_bytes().splitlines():
        record = msgspec.json.decode(line)
        assert isinstance(record, dict)
        records.append(record)
    return records


def by_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one kind."""
    return [r for r in records if r["kind"] == kind]


async def collect(source: Source) -> list[tuple[int, str | None, str | None, str | None]]:
    """Every raw row of a source."""
    rows: list[tuple[int, str | None, str | None, str | None]] = []
    async for chunk in source.chunks():
        rows.extend(chunk)
    source.close()
    return rows


def invitation_traffic(emulator: Emulator) -> list[Logged]:
    """The POSTs, and the listings made to settle them: each token's preflight reads (the
    dashboard, and its invitations listed before its first POST) left out."""
    posted: set[str] = set()
    traffic = []
    for request in emulator.requests:
        if not request.path.endswith("/invitation"):
            continue  # the dashboard read
        if request.method == "POST":
            posted.add(request.token)
        elif request.token not in posted:
            continue  # the preflight listing
        traffic.append(request)
    return traffic


def find_capture(
    logs: Sequence[MutableMapping[str, Any]], event: str
) -> list[MutableMapping[str, Any]]:
    """Captured structlog events with this name."""
    return [e for e in logs if e["event"] == event]


CaptureFactory = Callable[[], Any]


ROOT = Path(__file__).resolve().parent.parent


#: Where the servers tests start listen: below the kernel's ephemeral range (32768 and up
#: on Linux), which it hands to outgoing connections and to ``bind(0)``. A port taken from
#: that range and released could be taken again, by a client socket or another test
#: process, before the server binds it, and a test would then talk to the wrong server.
#: Each test process (pytest-xdist worker) has a slice of its own and hands each port once,
#: in a random order.
PORT_RANGE = (20000, 32000)
_ports: list[int] = []


def free_port() -> int:
    """A TCP port free on 127.0.0.1, handed out once, in this test process's own slice."""
    if not _ports:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        low, high = PORT_RANGE
        size = (high - low) // max(workers, 8)
        start = low + (int(worker) if worker.isdigit() else 0) % max(workers, 8) * size
        _ports.extend(range(start, start + size))
        # In an order of its own: two test sessions at once (two checkouts) hold the same
        # slices, and handing ports out in the same order would give both the same port
        # at the same moment, each then talking to the other's server.
        random.Random(os.getpid() ^ time.time_ns()).shuffle(_ports)
    while _ports:
        port = _ports.pop()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # taken by another program on the machine: next
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port left in this test process's slice of {PORT_RANGE}")


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None,
    seconds: float = 20,
) -> None:  # fmt: skip
    """Return once something accepts connections on 127.0.0.1:``port``; fail if ``proc``
    (the process meant to listen there) ends first, or after ``seconds``, showing ``log``."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    told = f"; its output:\n{log.read_text(errors='replace')[-6000:]}" if log else ""
    ended = "exited" if proc.poll() is not None else f"did not listen within {seconds:g} s"
    raise RuntimeError(f"{what} {ended}{told}")


class Proc:
    """A process a test started, its stderr kept in a file to show when a check fails."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT
            )

    def stderr(self, limit: int = 6000) -> str:
        """The last ``limit`` characters the process wrote to stderr."""
        text = self.log.read_text(errors="replace")
        return text[-limit:]

    def expect(self, code: int, timeout: float) -> None:
        """Wait for the exit and check its code; on failure show stderr (kill if it hangs)."""
        try:
            got = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            raise AssertionError(
                f"still running after {timeout}s; stderr:\n{self.stderr()}"
            ) from None
        assert got == code, f"exit {got}, expected {code}; stderr:\n{self.stderr()}"

    def stop(self) -> None:
        """Kill it if it still runs (fixture teardown)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``python -m worker ARGS`` processes with the test keys; killed after the test."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        log = tmp_path / f"stderr-{len(procs)}.log"
        keys = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
        proc = Proc(worker_command(*args), log, worker_env(**(env if env is not None else keys)))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def start_emulator(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ``invite-worker emulator`` processes (extra CLI args allowed); stopped after."""
    procs: list[Proc] = []

    def start(*args: str) -> str:
        port = free_port()
        proc = Proc(
            [sys.executable, "-m", "worker", "emulator", "--port", str(port), "--api-key",
             API_KEY, "--app-key", APP_KEY, "--log-format", "json", *args],
            tmp_path / f"emulator-{port}.log",
        )  # fmt: skip
        procs.append(proc)
        wait_for_port(port, proc.popen, "the emulator", proc.log)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.popen.terminate()
        proc.popen.wait(timeout=10)


def emulator_invited(url: str) -> dict[tuple[str, str], int]:
    """What a standalone emulator created: (token, email) -> times invited."""
    with urllib.request.urlopen(f"{url}/_emulator/invited", timeout=10) as resp:  # noqa: S310
        return {(t, e): n for t, e, n in json.loads(resp.read())}


def worker_command(*args: str) -> list[str]:
    """The argv of ``python -m worker`` with these arguments."""
    return [sys.executable, "-m", "worker", *args]


def worker_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any DD_* or proxy variable, plus ``extra``.

    A proxy set on the machine would otherwise carry the tests' loopback requests off it.
    """
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DD_") and not k.lower().endswith("_proxy")}  # fmt: skip
    return {**base, **extra}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port; else REDIS_URL; else skip."""
    binary = shutil.which("redis-server")
    if binary is None:
        url = os.environ.get("REDIS_URL")
        if not url:
            pytest.skip("queue tests need redis-server on PATH or REDIS_URL set")
        yield url
        return
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc, "redis-server", workdir / "redis.log")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def redis(redis_server: str) -> AsyncIterator[Redis]:
    """A client of the test Redis server."""
    client = Redis.from_url(redis_server, decode_responses=True)
    yield client
    await client.aclose()


def redis_cli(url: str, *args: str) -> str:
    """What ``redis-cli -u URL ARGS`` prints, stripped."""
    done = subprocess.run(["redis-cli", "-u", url, *args], capture_output=True, check=True,
                          timeout=30)  # fmt: skip
    return done.stdout.decode().strip()


def pending(url: str, stream: str) -> int:
    """How many of the stream's messages group ``invite-worker`` read and has not settled."""
    return int(redis_cli(url, "XPENDING", stream, "invite-worker").split("\n")[0])


def dead_letters(url: str, stream: str) -> int:
    """How many messages the stream's dead-letter stream holds."""
    return int(redis_cli(url, "XLEN", f"{stream}:dead"))


def each_invited_once_nothing_left(
    api: str, pairs: set[tuple[str, str]], url: str, stream: str
) -> None:
    """A queue drained: the standalone emulator at ``api`` invited every pair exactly once
    (and nobody else), nothing is pending in the group, nothing was dead-lettered."""
    invited = emulator_invited(api)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert pending(url, stream) == 0
    assert dead_letters(url, stream) == 0


@pytest.fixture
def stream_name() -> str:
    """A stream name no other test uses (the server may be shared through REDIS_URL)."""
    return f"invites-{uuid.uuid4().hex[:12]}"


def on_a_terminal(
    argv: list[str], when: bytes | None = None, then: Callable[[subprocess.Popen[bytes]], None]
    = lambda proc: None, columns: int = 160,
) -> tuple[int, bytes]:  # fmt: skip
    """Run ``argv`` with stderr on a pseudo-terminal; once ``when`` is shown, do ``then``.

    Returns the exit code and everything the terminal showed.
    """
    master, slave = pty.openpty()
    # A terminal has a size: 24 rows by 160 columns (or ``columns``).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = worker_env(TERM="xterm", COLUMNS=str(columns), DD_API_KEY=API_KEY, DD_APP_KEY=APP_KEY)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=ROOT)  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            if when is not None and when in seen + chunk and when not in seen:
                then(proc)
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), seen
