"""Queue mode while the Redis server itself restarts: a real redis-server, stopped and
started again by the test, with its data kept and with it lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Proc, emulator_invited, free_port, wait_for_port


class RedisProcess:
    """A private redis-server on a fixed loopback port that a test can stop and restart."""

    def __init__(self, binary: str, workdir: Path, *, keep_data: bool) -> None:
        self.binary, self.workdir, self.keep_data = binary, workdir, keep_data
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Data kept: an append-only file synced on every write, as a careful deployment has.
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.keep_data \
            else ["--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
             *persistence],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, self.proc, "redis-server", self.workdir / "redis.log")

    def kill(self) -> None:
        """SIGKILL: whatever is not on disk is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              check=True, timeout=10)  # fmt: skip
        return done.stdout.decode().strip()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Start a restartable redis-server (skipped where redis-server is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli on PATH")
    servers: list[RedisProcess] = []

    def start(*, keep_data: bool) -> RedisProcess:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisProcess(binary, workdir, keep_data=keep_data)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def enqueue(
    spawn: Callable[..., Proc], tmp_path: Path, url: str, rows: int
) -> set[tuple[str, str]]:
    pairs = {(f"dash-{i % 3}", f"person{i}@example.com") for i in range(rows)}
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    spawn("enqueue", str(source), url, "--stream", "invites").expect(0, timeout=60)
    return pairs


def start_worker(spawn: Callable[..., Proc], server: RedisProcess, api: str, report: Path) -> Proc:
    """One queue worker draining the stream, logging JSON lines."""
    return spawn("run", server.url, "--stream", "invites", "--until-empty", "--linger", "0.1",
                 "--api-url", api, "--report", str(report), "--batch-size", "10",
                 "--claim-idle", "2", "--reconcile-delay", "0.2",
                 "--log-format", "json")  # fmt: skip


def restart_mid_run(server: RedisProcess, api: str, seen: int) -> None:
    """Once ``seen`` invitations exist, kill the server and start it again a second later."""
    deadline = time.monotonic() + 30
    while sum(emulator_invited(api).values()) < seen:
        assert time.monotonic() < deadline, "the worker never got going"
        time.sleep(0.05)
    server.kill()
    time.sleep(1.0)
    server.start()


def test_redis_restarting_with_its_data_is_survived(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    restartable_redis: Callable[..., RedisProcess],
) -> None:
    """Redis is killed mid-run and comes back with its data: the worker reconnects and
    finishes; every pair invited exactly once, nothing left pending."""
    server = restartable_redis(keep_data=True)
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(spawn, tmp_path, server.url, 1500)
    worker = start_worker(spawn, server, api, tmp_path / "w.jsonl")
    restart_mid_run(server, api, 200)
    worker.expect(0, timeout=120)
    invited = emulator_invited(api)
    assert set(invited) == pairs
    assert set(invited.values()) == {1}
    assert server.cli("XPENDING", "invites", "invite-worker").splitlines()[0] == "0"
    assert '"queue.reconnecting"' in worker.log.read_text()  # the restart did reach it
    assert "Traceback" not in worker.stderr()


def test_redis_restarting_without_its_data_ends_with_a_clear_error(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    spawn: Callable[..., Proc],
    restartable_redis: Callable[..., RedisProcess],
) -> None:
    """Redis comes back empty (the stream and group are gone): exit 3 with one message
    that says so, no traceback, no hang, and nobody invited twice."""
    server = restartable_redis(keep_data=False)
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(spawn, tmp_path, server.url, 1500)
    worker = start_worker(spawn, server, api, tmp_path / "w.jsonl")
    restart_mid_run(server, api, 200)
    worker.expect(3, timeout=120)
    lines = [json.loads(line) for line in worker.log.read_text().splitlines()]
    halted = [e for e in lines if e["event"] == "run.halted"]
    assert len(halted) == 1, worker.stderr()
    assert halted[0]["code"] == "queue_lost"
    assert "gone" in str(halted[0]["error"])
    assert "Traceback" not in worker.stderr()
    invited = emulator_invited(api)
    assert set(invited) <= pairs
    assert set(invited.values()) == {1}
