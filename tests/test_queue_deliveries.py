"""Runs that end for a reason not the messages' give back the deliveries they added.

A refused key or a stop says nothing about a message; if each such run counted as a
delivery, a few in a row would make the next good worker dead-letter them as
``max_deliveries``. Real processes: a private redis-server, an ``invite-worker emulator``
that refuses wrong keys with 403, workers started as a user would.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.conftest import (
    Proc,
    by_kind,
    dead_letters,
    each_invited_once_nothing_left,
    emulator_invited,
    read_report,
    redis_cli,
)
from tests.test_queue_refusals import GOOD, WRONG, enqueue, expect_refused, worker
from worker.queue.deliveries import HeldDeliveries
from worker.queue.stream import StreamQueue, enqueue_rows
from worker.state import RunState

#: The strictest bound: a single delivery more than the good worker's own dead-letters.
STRICT = ("--max-deliveries", "1", "--claim-idle", "0.2")


def deliveries(url: str, stream: str) -> dict[str, tuple[str, int]]:
    """Each pending message's owner and delivery count."""
    lines = redis_cli(url, "XPENDING", stream, "invite-worker", "-", "+", "100000").split("\n")
    rows = [lines[i : i + 4] for i in range(0, len(lines) - 3, 4)]  # none: one empty line
    return {mid: (owner, int(count)) for mid, owner, _idle, count in rows}


def finish_with_good_keys(spawn: Callable[..., Proc], tmp_path: Path, url: str, stream: str,
                          api: str, pairs: set[tuple[str, str]]) -> None:  # fmt: skip
    """A worker with good keys and --max-deliveries 1 sends each pair exactly once."""
    good = worker(spawn, tmp_path, url, stream, api, "good", "--until-empty", *STRICT, env=GOOD)
    good.expect(0, timeout=90)
    each_invited_once_nothing_left(api, pairs, url, stream)


def test_five_refused_runs_in_a_row_dead_letter_nothing(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Five runs with refused keys (new consumers claiming, one re-reading its own pending,
    with and without --until-empty) each take every message and leave its delivery count
    as they found it; a worker with good keys and --max-deliveries 1 then sends every
    message exactly once and dead-letters none."""
    api = start_emulator()
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 200)
    runs = [("refused-0", ["--until-empty"]), ("refused-1", []), ("refused-1", ["--until-empty"]),
            ("refused-2", []), ("refused-3", ["--until-empty"])]  # fmt: skip
    for number, (name, extra) in enumerate(runs):
        time.sleep(0.3)  # older than --claim-idle: the next run claims them at once
        proc = worker(spawn, tmp_path, redis_server, stream_name, api, name, *STRICT, *extra,
                      env=WRONG)  # fmt: skip
        expect_refused(proc, tmp_path / f"{name}.jsonl")
        held = deliveries(redis_server, stream_name)
        assert len(held) == len(pairs), f"run {number}"
        # Every message was taken by this run, and its count is what it was before: 0.
        assert set(held.values()) == {(name, 0)}, f"run {number}: {set(held.values())}"
        assert dead_letters(redis_server, stream_name) == 0
        assert "queue.deliveries_given_back" in proc.stderr()
    assert emulator_invited(api) == {}
    finish_with_good_keys(spawn, tmp_path, redis_server, stream_name, api, pairs)


def test_workers_stopped_by_sigterm_again_and_again_dead_letter_nothing(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Three workers stopped by SIGTERM mid-run (a scale-down, a rolling update) each give
    back the deliveries they added; a worker with --max-deliveries 1 then sends the rest:
    every pair exactly once, none dead-lettered."""
    api = start_emulator("--limit", "20", "--period", "1")
    # Enough that three runs stopped after a batch or a few never drain the stream: each
    # needs messages left to be stopped on (60 batches of 20; a run sends a few).
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 1200)
    for number in range(3):
        time.sleep(0.3)
        before = sum(emulator_invited(api).values())
        name = f"stopped-{number}"
        proc = worker(spawn, tmp_path, redis_server, stream_name, api, name, *STRICT, env=GOOD)
        deadline = time.monotonic() + 30
        while sum(emulator_invited(api).values()) < before + 20:
            assert proc.popen.poll() is None, proc.stderr()
            assert time.monotonic() < deadline, proc.stderr()
            time.sleep(0.05)
        proc.popen.send_signal(signal.SIGTERM)
        proc.expect(3, timeout=30)
        held = deliveries(redis_server, stream_name)
        assert held, f"run {number}: nothing left to stop on"
        assert {count for _, count in held.values()} == {0}, f"run {number}"
        assert dead_letters(redis_server, stream_name) == 0
        assert set(emulator_invited(api).values()) == {1}
    finish_with_good_keys(spawn, tmp_path, redis_server, stream_name, api, pairs)


async def held_by(redis: Redis, stream: str) -> dict[str, tuple[str, int]]:
    """Each pending message's owner and delivery count, through the client."""
    rows = await redis.xpending_range(stream, "invite-worker", "-", "+", 1000)
    return {str(r["message_id"]): (str(r["consumer"]), int(r["times_delivered"])) for r in rows}


async def test_deliveries_are_given_back_only_for_messages_still_this_consumers(
    redis: Redis, stream_name: str
) -> None:
    """Given back: this consumer's messages, to their count before this run (a slow one it
    claimed back from itself included); left alone: one another worker claimed meanwhile,
    and everything when the run halted on an internal error (the poison-message case)."""
    await enqueue_rows(redis, stream_name, [(f"t{i}", f"p{i}@example.com") for i in range(4)])
    queue = StreamQueue(redis, stream_name, "invite-worker", "c1", f"{stream_name}:dead")
    await queue.ensure_group()
    earlier = StreamQueue(redis, stream_name, "invite-worker", "c0", f"{stream_name}:dead")
    a, b = [mid for mid, _ in await earlier.read_new(2, 0.1)]  # a worker that died: 1
    c, d = [mid for mid, _ in await queue.read_new(2, 0.1)]
    await redis.xclaim(stream_name, "invite-worker", "c1", 0, [a, b])  # claimed: 2 each
    held = HeldDeliveries()
    for mid in (a, b, c, d):
        held.taken(mid)
    # c1 claims its own slow message back (a delivery more), and another worker takes one.
    await redis.xclaim(stream_name, "invite-worker", "c1", 0, [c])
    held.claimed_again(c)
    await redis.xclaim(stream_name, "invite-worker", "c2", 0, [b])
    halted = RunState()
    halted.halt(RuntimeError("a bug"), "sender")
    await held.give_back(queue, halted)
    assert (await held_by(redis, stream_name))[a] == ("c1", 2)
    await held.give_back(queue, RunState(asyncio.Event()))
    assert await held_by(redis, stream_name) == {
        a: ("c1", 1), b: ("c2", 3), c: ("c1", 0), d: ("c1", 0)}  # fmt: skip
    assert len(held) == 0


#: Two workers taking one request of one email at a time, each message claimable after
#: 0.6 s idle, against a service that takes 3 requests per 2 s: they wait on it.
HELD_UP = ("--concurrency", "1", "--batch-size", "1", "--claim-idle", "0.6", "--until-empty")


def side_by_side(
    spawn: Callable[..., Proc], tmp_path: Path, start_emulator: Callable[..., str],
    redis_server: str, stream_name: str, first_alone: float,
) -> tuple[str, set[tuple[str, str]], Proc, Callable[[], Proc]]:  # fmt: skip
    """Twelve messages, a first worker that has read them all and is held up by the
    service's rate limit ``first_alone`` s more: the emulator, the pairs, the first
    worker, and how to start the second."""
    api = start_emulator("--limit", "3", "--period", "2")
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 12)
    first = worker(spawn, tmp_path, redis_server, stream_name, api, "first", *HELD_UP, env=GOOD)
    with SyncRedis.from_url(redis_server, decode_responses=True) as redis:
        last = redis.xinfo_stream(stream_name)["last-generated-id"]
        deadline = time.monotonic() + 60
        # (the group is made by the worker as it starts)
        while [g["last-delivered-id"] for g in redis.xinfo_groups(stream_name)] != [last]:
            assert time.monotonic() < deadline, f"the first worker never read: {first.stderr()}"
            time.sleep(0.02)
    time.sleep(first_alone)  # it has read every message, and waits on the limit

    def second() -> Proc:
        return worker(spawn, tmp_path, redis_server, stream_name, api, "second", *HELD_UP,
                      env=GOOD)  # fmt: skip

    return api, pairs, first, second


def test_messages_a_live_worker_waits_on_are_not_claimed_by_another(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A worker holding messages it cannot send yet (the service's rate limit makes it wait
    several --claim-idle) keeps them: a second worker side by side claims none, and each
    person is invited once."""
    api, pairs, first, start_second = side_by_side(spawn, tmp_path, start_emulator,
                                                   redis_server, stream_name, 0.5)  # fmt: skip
    second = start_second()
    first.expect(0, timeout=90)
    second.expect(0, timeout=30)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)
    claimed = by_kind(read_report(tmp_path / "second.jsonl"), "summary")[-1]
    assert claimed["emails_sent"] == 0


def test_a_worker_stalled_past_claim_idle_sends_nothing_another_claimed(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A worker paused (SIGSTOP) with messages read but not sent: another claims and sends
    them; resumed (SIGCONT), the first finds them claimed when it would record their
    intents and sends none of them: each person is invited once."""
    api, pairs, first, start_second = side_by_side(spawn, tmp_path, start_emulator,
                                                   redis_server, stream_name, 0.5)  # fmt: skip
    first.popen.send_signal(signal.SIGSTOP)
    try:
        start_second().expect(0, timeout=90)
    finally:
        first.popen.send_signal(signal.SIGCONT)
    first.expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)
    assert "queue.claimed_elsewhere" in first.stderr(60_000)


def test_messages_trimmed_from_the_stream_while_held_are_sent_once_or_dead_lettered(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """The stream trimmed to nothing (XTRIM MAXLEN 0, as a producer's MAXLEN does) while a
    worker holds its messages, waiting on the rate limit: each is either sent (still
    pending for it) or, once no longer pending for anyone (a claim dropped the deleted
    entry), dead-lettered message_trimmed, never silently dropped; nobody twice."""
    api, pairs, first, _ = side_by_side(spawn, tmp_path, start_emulator, redis_server,
                                        stream_name, 0.5)  # fmt: skip
    redis_cli(redis_server, "XTRIM", stream_name, "MAXLEN", "0")
    first.popen.wait(timeout=90)
    invited = emulator_invited(api)
    assert set(invited.values()) <= {1}
    with SyncRedis.from_url(redis_server, decode_responses=True) as redis:
        dead = [fields for _, fields in redis.xrange(f"{stream_name}:dead")]
    trimmed = {(f["token"], f["email"]) for f in dead if f["error_code"] == "message_trimmed"}
    assert len(trimmed) == len(dead)
    assert set(invited).isdisjoint(trimmed)
    assert set(invited) | trimmed == pairs
    assert first.popen.returncode == (1 if trimmed else 0)
    assert "queue.claimed_elsewhere" not in first.stderr(60_000)


def test_a_stalled_worker_sends_nothing_another_sent_before_the_stream_was_trimmed(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Paused with messages read, a worker has them claimed, sent and acknowledged by
    another, then trimmed from the stream: resumed, it cannot tell them from messages
    trimmed while only it held them, so it sends none (dead letters at worst); each
    person is invited exactly once."""
    api, pairs, first, start_second = side_by_side(spawn, tmp_path, start_emulator,
                                                   redis_server, stream_name, 0.5)  # fmt: skip
    first.popen.send_signal(signal.SIGSTOP)
    try:
        start_second().expect(0, timeout=90)
        redis_cli(redis_server, "XTRIM", stream_name, "MAXLEN", "0")
    finally:
        first.popen.send_signal(signal.SIGCONT)
    first.popen.wait(timeout=60)
    assert emulator_invited(api) == dict.fromkeys(pairs, 1)
