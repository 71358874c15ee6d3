"""Redis refusing queue commands, with real redis-servers: out of memory, a read-only
replica, a user without permission, a frozen server. Each ends with exit 3 (or 2 for the
user's mistake) and one message, never a traceback, and once Redis is healthy a run sends
every message exactly once."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    API_KEY,
    APP_KEY,
    Proc,
    each_invited_once_nothing_left,
    emulator_invited,
    worker_env,
)
from tests.test_queue_restart import RedisProcess, enqueue


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[], RedisProcess]]:
    """Start private redis-servers a test may fill, demote or lock down; killed after."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli on PATH")
    started: list[RedisProcess] = []

    def start() -> RedisProcess:
        workdir = tmp_path / f"redis-{len(started)}"
        workdir.mkdir()
        server = RedisProcess(binary, workdir, keep_data=False)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)  # a frozen one must be able to die
        server.kill()


#: The CLI with Redis's retry budget shrunk (about 30 s of reconnecting, and 5 s for a
#: command to be answered, down to a second or two), for failures that are retried first.
QUICK = ("import sys, worker.queue.connect as r; r.RECONNECT_RETRIES = 2; "
         "r.COMMAND_TIMEOUT = 1.0; from worker.cli import main; sys.exit(main())")  # fmt: skip


#: What the NOPERM message tells to grant for stream ``invites`` (checked to be enough).
WORKER_RULES = ("+@connection +@stream +@hash +@string +@scripting +expire +pexpireat "
                "+exists +type +scan ~invites ~invites:* ~invite-worker:ratelimit:*")  # fmt: skip


class Workers:
    """Starts CLI processes (``quick``: with the shrunk retry budget); killed after."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.procs = tmp_path, list[Proc]()

    def __call__(self, *args: str, quick: bool = False, **env: str) -> Proc:
        argv = [sys.executable, *(("-c", QUICK) if quick else ("-m", "worker")), *args]
        log = self.tmp_path / f"cli-{len(self.procs)}.log"
        proc = Proc(argv, log, worker_env(DD_API_KEY=API_KEY, DD_APP_KEY=APP_KEY, **env))
        self.procs.append(proc)
        return proc


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Workers]:
    """``invite-worker`` processes for a test."""
    workers = Workers(tmp_path)
    yield workers
    for proc in workers.procs:
        proc.stop()


def worker_args(url: str, api: str, report: Path, *extra: str) -> list[str]:
    """A queue worker draining ``invites`` as consumer ``w1``.

    A short --timeout: a worker ended mid-send leaves intents, and the run after it waits
    out their requests' timeout (30 s by default) before it lists what they created.
    """
    return ["run", url, "--stream", "invites", "--until-empty", "--consumer", "w1",
            "--linger", "0.05", "--api-url", api, "--report", str(report), "--batch-size",
            "10", "--claim-idle", "2", "--reconcile-delay", "0.2", "--timeout", "3",
            *extra]  # fmt: skip


def one_message(proc: Proc) -> str:
    """The stderr of a command that failed: one message, no traceback."""
    text = proc.stderr()
    assert "Traceback" not in text, text
    assert "enqueued again" not in text, text  # only a missing stream or group says so
    return text


def pending(server: RedisProcess) -> int:
    return int(server.cli("XPENDING", "invites", "invite-worker").splitlines()[0])


def wait_for_invites(api: str, count: int, worker: Proc) -> None:
    deadline = time.monotonic() + 30
    while sum(emulator_invited(api).values()) < count:
        assert worker.popen.poll() is None, worker.stderr()
        assert time.monotonic() < deadline, f"the worker never got going:\n{worker.stderr()}"
        time.sleep(0.05)


def replicate(replica: RedisProcess, primary: RedisProcess, length: str) -> None:
    """Make ``replica`` follow ``primary``; return once it holds the stream's messages."""
    replica.cli("REPLICAOF", "127.0.0.1", str(primary.port))
    deadline = time.monotonic() + 20
    while replica.cli("XLEN", "invites") != length:
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)


def test_redis_out_of_memory_at_start_loses_nothing_and_says_so(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A full Redis (maxmemory, noeviction): a worker exits 3 saying it is out of memory,
    before reading anything (its consumer name's lease is the first thing it stores), on
    a stream with a group or none yet; enqueue
    and dead-letter requeue exit 3 too, listing dead letters still works. Once memory is
    freed, the requeue and a run send every message exactly once."""
    server = servers()
    api = start_emulator()
    pairs = enqueue(cli, tmp_path, server.url, 300)
    server.cli("XGROUP", "CREATE", "invites", "invite-worker", "0")
    server.cli("XADD", "invites:dead", "*", "token", "dash-0", "email", "dead@example.com",
               "error_code", "server_error")  # fmt: skip
    server.cli("XADD", "fresh", "*", "token", "dash-0", "email", "fresh@example.com")
    server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    server.cli("CONFIG", "SET", "maxmemory", "1")

    fresh = cli("run", server.url, "--stream", "fresh", "--api-url", api, "--report",
                str(tmp_path / "0.jsonl"))  # fmt: skip
    fresh.expect(3, timeout=30)
    assert "out of memory (OOM" in one_message(fresh)
    worker = cli(*worker_args(server.url, api, tmp_path / "1.jsonl"))
    worker.expect(3, timeout=30)
    said = one_message(worker)
    assert "out of memory (OOM" in said
    assert "nothing was lost (0 message(s) stay pending in group 'invite-worker'" in said
    assert emulator_invited(api) == {}
    assert pending(server) == 0

    (tmp_path / "more.csv").write_text("token,email\ndash-0,late@example.com\n")
    more = cli("enqueue", str(tmp_path / "more.csv"), server.url, "--stream", "invites")
    more.expect(3, timeout=30)
    assert "out of memory" in one_message(more)
    assert "0 row(s) had been added to the stream" in more.stderr()
    listed = cli("dead-letter", "list", server.url, "--stream", "invites")
    listed.expect(0, timeout=30)
    requeue = ("dead-letter", "requeue", server.url, "--stream", "invites", "--all")
    refused = cli(*requeue)
    refused.expect(3, timeout=30)
    assert "out of memory (OOM" in one_message(refused)
    assert server.cli("XLEN", "invites:dead") == "1"

    server.cli("CONFIG", "SET", "maxmemory", "0")
    cli(*requeue).expect(0, timeout=30)
    cli(*worker_args(server.url, api, tmp_path / "2.jsonl")).expect(0, timeout=60)
    requeued = ("dash-0", "dead@example.com")
    each_invited_once_nothing_left(api, pairs | {requeued}, server.url, "invites")


def test_redis_out_of_memory_mid_run_leaves_the_rest_pending_for_the_next_run(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """Redis fills up mid-run: exit 3 within seconds, the message counts the messages left
    pending (as Redis does) and never says to enqueue again; a run after sends the rest,
    nobody twice."""
    server = servers()
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(cli, tmp_path, server.url, 600)
    worker = cli(*worker_args(server.url, api, tmp_path / "1.jsonl", "--log-format", "json"))
    wait_for_invites(api, 100, worker)
    server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    server.cli("CONFIG", "SET", "maxmemory", "1")
    started = time.monotonic()
    worker.expect(3, timeout=30)
    assert time.monotonic() - started < 10
    one_message(worker)
    events = [json.loads(line) for line in worker.log.read_text().splitlines()]
    finished = [e for e in events if e["event"] == "run.finished"]
    assert len(finished) == 1, worker.stderr()
    halted = finished[0]["halted"]
    assert halted["code"] == "redis_out_of_memory"
    left = pending(server)
    assert 0 < left < 600
    assert f"nothing was lost ({left:,} message(s) stay pending" in halted["message"]

    server.cli("CONFIG", "SET", "maxmemory", "0")
    cli(*worker_args(server.url, api, tmp_path / "2.jsonl")).expect(0, timeout=120)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")


def test_a_replica_address_backs_off_then_exits_3_naming_the_primary(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A worker and enqueue pointed at a read-only replica (an old primary's address after
    a failover) reconnect with backoff, then exit 3 naming the primary; the worker pointed
    where the message says sends every message exactly once."""
    primary, replica = servers(), servers()
    api = start_emulator()
    pairs = enqueue(cli, tmp_path, primary.url, 200)
    replicate(replica, primary, "200")

    worker = cli(*worker_args(replica.url, api, tmp_path / "1.jsonl"), quick=True)
    worker.expect(3, timeout=30)
    said = one_message(worker)
    assert "read-only replica (READONLY)" in said
    assert "queue.reconnecting" in said  # backed off and reconnected first
    named = re.search(r"point the worker at the primary \((redis://[^)]+)\)", said)
    assert named is not None, said
    assert named.group(1) == primary.url
    (tmp_path / "more.csv").write_text("token,email\ndash-0,late@example.com\n")
    more = cli("enqueue", str(tmp_path / "more.csv"), replica.url, "--stream", "invites",
               quick=True)  # fmt: skip
    more.expect(3, timeout=30)
    assert f"primary at 127.0.0.1:{primary.port}" in one_message(more)
    assert emulator_invited(api) == {}

    cli(*worker_args(named.group(1), api, tmp_path / "2.jsonl")).expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, primary.url, "invites")


def test_a_failover_mid_run_ends_the_run_naming_the_new_primary_which_finishes_it(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """Mid-run, the worker's Redis is demoted to a replica of its replica (a manual
    failover): it backs off, exits 3 naming the new primary, and a worker there sends the
    rest, nobody twice."""
    old, new = servers(), servers()
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(cli, tmp_path, old.url, 600)
    replicate(new, old, "600")
    worker = cli(*worker_args(old.url, api, tmp_path / "1.jsonl"), quick=True)
    wait_for_invites(api, 100, worker)
    time.sleep(0.2)  # what the worker wrote reaches the replica (as a planned failover waits)
    new.cli("REPLICAOF", "NO", "ONE")
    old.cli("REPLICAOF", "127.0.0.1", str(new.port))
    worker.expect(3, timeout=30)
    said = one_message(worker)
    assert f"answers as a read-only replica (READONLY), following the primary at " \
        f"127.0.0.1:{new.port}" in said  # fmt: skip

    cli(*worker_args(new.url, api, tmp_path / "2.jsonl")).expect(0, timeout=120)
    each_invited_once_nothing_left(api, pairs, new.url, "invites")


def test_a_redis_user_without_permission_is_a_usage_error_naming_user_and_command(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """NOPERM, WRONGPASS and NOAUTH exit 2 at once, naming the user and the command, for
    run, enqueue and dead-letter; the grant the message gives is enough for a run that
    sends every message exactly once."""
    server = servers()
    api = start_emulator()
    pairs = enqueue(cli, tmp_path, server.url, 100)
    server.cli("ACL", "SETUSER", "alice", "on", ">s3cret", "+@connection")
    alice = f"redis://alice:s3cret@127.0.0.1:{server.port}/0"

    worker = cli(*worker_args(alice, api, tmp_path / "1.jsonl"))
    worker.expect(2, timeout=10)
    said = one_message(worker)
    assert "refused user 'alice' EXISTS (NOPERM" in said
    assert "s3cret" not in said
    grant = re.search(r"ACL SETUSER alice (.+?), or put", said)
    assert grant is not None, said
    assert grant.group(1) == WORKER_RULES
    # A user that may touch every key already: Redis refuses the patterns, as said.
    assert "without the ~ patterns" in said
    server.cli("ACL", "SETUSER", "carol", "on", ">pw", "~*", "+@connection")
    assert "Try 'resetkeys'" in server.cli("ACL", "SETUSER", "carol", *WORKER_RULES.split())
    commands = [rule for rule in WORKER_RULES.split() if not rule.startswith("~")]
    assert server.cli("ACL", "SETUSER", "carol", *commands) == "OK"
    (tmp_path / "more.csv").write_text("token,email\ndash-0,late@example.com\n")
    more = cli("enqueue", str(tmp_path / "more.csv"), alice, "--stream", "invites")
    more.expect(2, timeout=10)
    assert "refused user 'alice' TYPE (NOPERM" in one_message(more)  # checked first

    wrong = f"redis://alice:guess@127.0.0.1:{server.port}/0"
    listed = cli("dead-letter", "list", wrong, "--stream", "invites")
    listed.expect(2, timeout=10)
    assert "refused user 'alice' on AUTH" in one_message(listed)
    cli(*worker_args(wrong, api, tmp_path / "0.jsonl")).expect(2, timeout=10)
    assert emulator_invited(api) == {}

    server.cli("ACL", "SETUSER", "alice", *grant.group(1).split())
    cli(*worker_args(alice, api, tmp_path / "2.jsonl")).expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")

    server.cli("ACL", "SETUSER", "default", "off")  # last: the test's own commands need it
    anonymous = cli("dead-letter", "requeue", server.url, "--stream", "invites", "--all")
    anonymous.expect(2, timeout=10)
    assert "requires a password (NOAUTH) for PING, and user 'default'" in one_message(anonymous)


def test_a_permission_revoked_mid_run_ends_it_with_a_usage_error_and_nothing_lost(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """The worker's user loses EVALSHA mid-run: exit 2 in seconds, naming the user and the
    command, with the summary written; given it back, a run sends the rest, nobody twice."""
    server = servers()
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(cli, tmp_path, server.url, 600)
    server.cli("ACL", "SETUSER", "bob", "on", ">pw", *WORKER_RULES.split())
    bob = f"redis://bob:pw@127.0.0.1:{server.port}/0"
    worker = cli(*worker_args(bob, api, tmp_path / "1.jsonl", "--log-format", "json"))
    wait_for_invites(api, 100, worker)
    server.cli("ACL", "SETUSER", "bob", "-evalsha")
    worker.expect(2, timeout=10)
    one_message(worker)
    events = [json.loads(line) for line in worker.log.read_text().splitlines()]
    halted = [e for e in events if e["event"] == "run.halted"]
    assert len(halted) == 1, worker.stderr()
    assert halted[0]["code"] == "redis_refused"
    assert "refused user 'bob' EVALSHA (NOPERM" in halted[0]["error"]
    summary = [r for r in map(json.loads, (tmp_path / "1.jsonl").read_text().splitlines())
               if r["kind"] == "summary"]  # fmt: skip
    assert summary[0]["exit_code"] == 2
    assert pending(server) > 0

    server.cli("ACL", "SETUSER", "bob", "+evalsha")
    cli(*worker_args(bob, api, tmp_path / "2.jsonl")).expect(0, timeout=120)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")


def test_a_frozen_redis_ends_the_run_within_its_bound_and_nobody_is_invited_twice(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A Redis that stops answering (SIGSTOP: connections stay open, nothing comes back)
    no longer holds a worker forever: each command has a time limit, then the reconnection
    budget, then exit 3 (and a command started meanwhile, exit 3 too); after SIGCONT a run
    sends the rest, nobody twice."""
    server = servers()
    api = start_emulator("--limit", "30", "--period", "1")
    pairs = enqueue(cli, tmp_path, server.url, 600)
    worker = cli(*worker_args(server.url, api, tmp_path / "1.jsonl"), quick=True)
    wait_for_invites(api, 100, worker)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        worker.expect(3, timeout=30)
        # Three 1 s command limits and backoff: about 3 s (15 s with the client's own 5 s).
        assert time.monotonic() - stopped < 10
        assert "lost Redis at" in one_message(worker)
        at_start = cli("dead-letter", "list", server.url, "--stream", "invites", quick=True)
        at_start.expect(3, timeout=30)
        assert "cannot reach Redis" in one_message(at_start)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    cli(*worker_args(server.url, api, tmp_path / "2.jsonl")).expect(0, timeout=120)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")


def test_a_user_whose_scripts_are_refused_xack_is_named_with_the_grant(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A user allowed everything but XACK passes the start and sends, then its
    acknowledging script is refused (Redis 7.0 says so without NOPERM): exit 2 naming the
    user and the grant, not exit 3 and "fix what Redis says"; the messages stay pending,
    and a run as a user that has the grant settles them by listing: each invited once."""
    server = servers()
    api = start_emulator()
    pairs = enqueue(cli, tmp_path, server.url, 30)
    server.cli("ACL", "SETUSER", "noack", "on", ">s3cret", "~*", "&*", "+@all", "-xack")
    noack = f"redis://noack:s3cret@127.0.0.1:{server.port}/0"
    worker = cli(*worker_args(noack, api, tmp_path / "1.jsonl"))
    worker.expect(2, timeout=60)
    said = worker.stderr()
    assert "Traceback" not in said, said
    assert "refused user 'noack' a command its script runs" in said, said
    assert f"ACL SETUSER noack {WORKER_RULES}" in said, said
    assert "s3cret" not in said
    assert set(emulator_invited(api)) == pairs  # sent, not acknowledged
    assert pending(server) == 30
    cli(*worker_args(server.url, api, tmp_path / "2.jsonl")).expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")


def allowing_nobody(tmp_path: Path, start_emulator: Callable[..., str]) -> str:
    """An emulator whose dashboards ``dash-0``..``dash-2`` allow nobody yet: its URL."""
    boards = tmp_path / "boards.json"
    boards.write_text(json.dumps([{"token": f"dash-{i}", "invitees": []} for i in range(3)]))
    return start_emulator("--dashboards", str(boards))


def test_the_granted_rules_are_enough_to_add_invitees_one_edit_at_a_time(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A user with exactly the rules the NOPERM message grants runs a worker with
    --add-invitees over dashboards that allow nobody: each edit's lock in Redis is taken
    and let go with those rules alone (a lock needing DEL stopped it at its first edit,
    exit 2); everyone is added and invited once, and no lock is left behind."""
    server = servers()
    api = allowing_nobody(tmp_path, start_emulator)
    pairs = enqueue(cli, tmp_path, server.url, 60)
    server.cli("ACL", "SETUSER", "carol", "on", ">pw", *WORKER_RULES.split())
    carol = f"redis://carol:pw@127.0.0.1:{server.port}/0"
    worker = cli(*worker_args(carol, api, tmp_path / "1.jsonl", "--add-invitees"))
    worker.expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")
    assert server.cli("KEYS", "invites:edits:*") == ""  # let go, not left to expire


def test_a_lock_that_cannot_be_let_go_is_a_refusal_said_not_a_silent_wait(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """A user denied PEXPIREAT cannot let go of a dashboard's edit lock: exit 2 naming the
    user and the grant, the messages pending (each edit waited out the lock's 30 s in
    silence); granted it, a run invites everyone once and leaves no lock."""
    server = servers()
    api = allowing_nobody(tmp_path, start_emulator)
    pairs = enqueue(cli, tmp_path, server.url, 30)
    rules = [rule for rule in WORKER_RULES.split() if rule != "+pexpireat"]
    server.cli("ACL", "SETUSER", "erin", "on", ">pw", *rules)
    erin = f"redis://erin:pw@127.0.0.1:{server.port}/0"
    worker = cli(*worker_args(erin, api, tmp_path / "1.jsonl", "--add-invitees"))
    worker.expect(2, timeout=20)
    said = one_message(worker)
    assert "refused user 'erin'" in said, said
    assert "+pexpireat" in said, said
    assert pending(server) > 0
    server.cli("ACL", "SETUSER", "erin", "+pexpireat")
    if left := server.cli("KEYS", "invites:edits:*"):  # as 30 s later
        server.cli("DEL", *left.split())
    cli(*worker_args(erin, api, tmp_path / "2.jsonl", "--add-invitees")).expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")
    assert server.cli("KEYS", "invites:edits:*") == ""


def test_a_dead_letter_copy_refused_leaves_its_messages_pending_not_acknowledged(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """Rows the dashboard refuses, for a user granted the printed rules of a run whose
    dead letters went to the default stream, now run with another --dead-letter it may
    not write: the copy is refused, and the messages stay pending (they were
    acknowledged without their copies: lost). With the rules for that stream, a run
    dead-letters them all, once."""
    server = servers()
    api = allowing_nobody(tmp_path, start_emulator)
    pairs = enqueue(cli, tmp_path, server.url, 12)
    server.cli("ACL", "SETUSER", "dana", "on", ">pw", *WORKER_RULES.split())
    dana = f"redis://dana:pw@127.0.0.1:{server.port}/0"
    worker = cli(*worker_args(dana, api, tmp_path / "1.jsonl", "--dead-letter", "parked"))
    worker.expect(2, timeout=60)
    assert "refused user 'dana'" in one_message(worker)
    assert pending(server) == 12
    assert server.cli("XLEN", "parked") == "0"
    server.cli("ACL", "SETUSER", "dana", "~parked")
    cli(*worker_args(dana, api, tmp_path / "2.jsonl", "--dead-letter", "parked")).expect(
        1, timeout=60
    )
    assert pending(server) == 0
    assert server.cli("XLEN", "parked") == str(len(pairs))
    assert emulator_invited(api) == {}


def test_redis_not_answering_at_the_start_is_a_fault_to_run_again_not_a_mistake(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    servers: Callable[[], RedisProcess],
    cli: Workers,
) -> None:
    """No Redis on the URL's port when run, enqueue or dead-letter starts: exit 3 (a fault,
    as an unreachable API), one line naming host and port and what to do, nothing sent or
    added; with the server back on that port, a run sends what is then enqueued, once."""
    server = servers()
    api = start_emulator()
    server.kill()
    where = f"redis://127.0.0.1:{server.port}/0"
    source = tmp_path / "late.csv"
    source.write_text("token,email\ndash-0,late@example.com\n")
    for args in (worker_args(server.url, api, tmp_path / "1.jsonl"),
                 ["enqueue", str(source), server.url, "--stream", "invites"],
                 ["dead-letter", "list", server.url, "--stream", "invites"]):  # fmt: skip
        proc = cli(*args, quick=True)
        proc.expect(3, timeout=30)
        said = one_message(proc)
        assert f"cannot reach Redis at {where}" in said, said
        assert "run the same command again" in said, said
        assert "if that port speaks TLS, use rediss://" in said, said
        assert ".;" not in said, said
    assert emulator_invited(api) == {}
    server.start()
    assert server.cli("EXISTS", "invites") == "0"  # nothing was added while it was down
    pairs = enqueue(cli, tmp_path, server.url, 30)
    cli(*worker_args(server.url, api, tmp_path / "2.jsonl")).expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, server.url, "invites")
