"""Messages deleted from the stream (a producer's MAXLEN) before a worker settled them.

A worker that comes upon such a message without its fields cannot send or dead-letter it
(the pair is gone), but records it; a worker that still holds the fields and finds the
message pending for another lets that one decide. Real processes: a private
redis-server, an ``invite-worker emulator`` taking 3 requests per 2 s, workers started
as a user would.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.conftest import Proc, by_kind, emulator_invited, pending, read_report, redis_cli
from tests.test_queue_deliveries import HELD_UP, side_by_side
from tests.test_queue_refusals import GOOD, worker
from worker.queue.lease import ConsumerLease
from worker.queue.stream import StreamQueue, enqueue_rows, intent_value


def stream_ids(url: str, stream: str) -> set[str]:
    """The ids of every entry in the stream."""
    with SyncRedis.from_url(url, decode_responses=True) as redis:
        return {mid for mid, _ in redis.xrange(stream)}


def trimmed_records(report: Path) -> list[str]:
    """The stream ids a report recorded rejected ``message_trimmed``."""
    return [r["stream_id"] for r in by_kind(read_report(report), "rejected")
            if r["reason"] == "message_trimmed"]  # fmt: skip


def test_a_killed_workers_trimmed_messages_are_recorded_by_the_worker_that_claims_them(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A worker killed (SIGKILL) with messages read, the stream trimmed, another worker
    claims them without their fields: each is recorded rejected message_trimmed (exit 1,
    queue.message_trimmed), counted once, never dropped with no trace; nobody twice."""
    api, pairs, first, start_second = side_by_side(spawn, tmp_path, start_emulator,
                                                   redis_server, stream_name, 0.5)  # fmt: skip
    ids = stream_ids(redis_server, stream_name)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=10)
    held = set(pending_ids(redis_server, stream_name))
    assert held  # the service's limit kept most of them waiting
    redis_cli(redis_server, "XTRIM", stream_name, "MAXLEN", "0")
    second = start_second()
    second.expect(1, timeout=90)
    recorded = trimmed_records(tmp_path / "second.jsonl")
    assert sorted(recorded) == sorted(held)  # each once
    summary = by_kind(read_report(tmp_path / "second.jsonl"), "summary")[-1]
    assert summary["rows"] == len(held)
    assert summary["rejected_by_reason"] == {"message_trimmed": len(held)}
    assert "queue.message_trimmed" in second.stderr(60_000)
    assert pending(redis_server, stream_name) == 0
    invited = emulator_invited(api)
    assert set(invited.values()) <= {1}
    # Every message is accounted for: acknowledged by the first worker once sent, or
    # recorded by the second.
    assert len(ids - held) <= len(invited) <= len(pairs)


def test_a_restarted_workers_own_trimmed_messages_are_recorded_once(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A worker killed with messages read, the stream trimmed, the same worker (same
    consumer name) started again: it re-reads its own pending messages without their
    fields and records each rejected message_trimmed once, its rows counted once."""
    api, _, first, _ = side_by_side(spawn, tmp_path, start_emulator, redis_server,
                                    stream_name, 0.5)  # fmt: skip
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=10)
    held = set(pending_ids(redis_server, stream_name))
    assert held
    redis_cli(redis_server, "XTRIM", stream_name, "MAXLEN", "0")
    report = tmp_path / "first.jsonl"
    before = len(trimmed_records(report)) if report.exists() else 0
    again = worker(spawn, tmp_path, redis_server, stream_name, api, "first", *HELD_UP, env=GOOD)
    again.expect(1, timeout=90)
    recorded = trimmed_records(report)[before:]
    assert sorted(recorded) == sorted(held)
    summary = by_kind(read_report(report), "summary")[-1]
    assert summary["rows"] == len(held)
    assert pending(redis_server, stream_name) == 0
    assert set(emulator_invited(api).values()) <= {1}


async def test_intents_of_trimmed_messages_not_this_workers_are_recorded_failed_here(
    redis: Redis, stream_name: str
) -> None:
    """Before a send, a worker whose messages were trimmed finds out which are still its
    own (recorded, sent) and which are not: one another consumer claimed (maybe without
    its fields: a claim after the trim) or one pending for nobody is "t:", recorded failed
    and dead-lettered here with its pair, which this worker alone may still know."""
    await enqueue_rows(redis, stream_name, [(f"t{i}", f"p{i}@example.com") for i in range(3)])
    queue = StreamQueue(redis, stream_name, "invite-worker", "c1", f"{stream_name}:dead")
    await queue.ensure_group()
    await ConsumerLease(queue).take()
    mine, theirs, nobodys = [mid for mid, _ in await queue.read_new(3, 0.1)]
    await redis.xclaim(stream_name, "invite-worker", "c2", 0, [theirs])
    await redis.xack(stream_name, "invite-worker", nobodys)
    await redis.xtrim(stream_name, maxlen=0)
    claimed, trimmed = await queue.record_intents([mine, theirs, nobodys], intent_value(1.0, 3))
    assert (claimed, trimmed) == (set(), {theirs, nobodys})
    assert set(await redis.hkeys(queue.intents_key)) == {mine}


def pending_ids(url: str, stream: str) -> list[str]:
    """The ids pending in the group, oldest first."""
    with SyncRedis.from_url(url, decode_responses=True) as redis:
        return [p["message_id"] for p in redis.xpending_range(stream, "invite-worker", "-", "+",
                                                              100_000)]  # fmt: skip
