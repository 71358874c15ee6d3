"""A worker holding messages longer than their pairs' holds last keeps those holds.

The same pair enqueued twice is sent once because each message takes its pair in Redis
for one to two hours. A worker behind the rate limit can hold a message longer; it takes
the hold again each period, for the messages still its own only. A real private
redis-server; the consumer in process, with an injected clock standing for the hours.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from worker.batching import Batch
from worker.clock import FakeClock
from worker.config import Config
from worker.outcome import Failure, Outcome, Status
from worker.queue import settling
from worker.queue.consumer import Consumer
from worker.queue.messages import MessageIndex
from worker.queue.options import StreamOptions
from worker.queue.stream import HOLD_SECONDS, StreamQueue, enqueue_rows
from worker.record.journal import Journal
from worker.record.report import Report
from worker.send import client_for, pacer_for
from worker.send.sender import Sender

#: Late in a period of holds: the next one starts within the hour.
LATE = HOLD_SECONDS * 480_000 + 3000.0


@asynccontextmanager
async def consumers(
    tmp_path: Path, make_config: Callable[..., Config], redis: Redis, options: StreamOptions,
    clock: FakeClock, *names: str,
) -> AsyncIterator[list[Consumer]]:  # fmt: skip
    """In-process consumers of one group, each with its own report; nothing is sent."""
    made: list[tuple[Consumer, Report, Journal]] = []
    async with client_for(make_config()) as client:
        for name in names:
            config = make_config(report_path=tmp_path / f"{name}.jsonl")
            queue = StreamQueue(redis, options.stream, options.group, name, options.dead_letter)
            await queue.ensure_group()
            report, journal = Report(config.report_path), Journal(tmp_path / f"{name}.journal")
            sender = Sender(client, pacer_for(config, clock), journal, config, clock)
            consumer = Consumer(config, options, queue, report, sender, MessageIndex(), clock)
            made.append((consumer, report, journal))
        try:
            yield [consumer for consumer, _, _ in made]
        finally:
            for _, report, journal in made:
                report.close()
                journal.close()


async def test_pairs_held_past_their_hold_take_it_again_so_a_later_duplicate_is_rejected(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A worker holding messages longer than a pair's hold lasts (two periods, waiting on
    the rate limit) takes their holds again as it keeps them, a thousand at a time: the
    same pairs enqueued again and read by another worker are still rejected as
    duplicates, not sent twice."""
    options = StreamOptions(url=redis_server, stream=stream_name)
    pairs = [("tok-a", f"Person{i}@example.com") for i in range(2_500)]  # several slices
    await enqueue_rows(redis, stream_name, pairs)
    clock = FakeClock()
    async with consumers(tmp_path, make_config, redis, options, clock, "c1") as [consumer]:
        await consumer._take(await consumer.queue.read_new(len(pairs), 0.1), reclaimed=False)
        assert len(consumer.index) == len(pairs)
        clock.advance(2 * HOLD_SECONDS + 1)  # still held here, their holds long lapsed
        await consumer.keep_held()
    other = StreamQueue(redis, stream_name, options.group, "c2", options.dead_letter)
    copies = [f"9-{i}" for i in range(len(pairs))]
    lowered = [(token, email.lower()) for token, email in pairs]
    assert await other.hold_pairs(copies, lowered, clock.time()) == set(copies)


@pytest.mark.parametrize("claim_idle", [60.0, 36_000.0])
async def test_holds_are_taken_again_each_period_whatever_claim_idle(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
    claim_idle: float,
) -> None:
    """The holds are taken again as each period starts, not only when the messages are
    kept (every third of --claim-idle): with --claim-idle of ten hours, a message held
    five and a half hours still holds its pair."""
    options = StreamOptions(url=redis_server, stream=stream_name, claim_idle=claim_idle)
    await enqueue_rows(redis, stream_name, [("tok-a", "person@example.com")])
    clock = FakeClock(start=LATE)
    # The flush loop's own pace (monotonic) follows the injected clock too.
    monkeypatch.setattr(settling, "time", types.SimpleNamespace(monotonic=clock.time))
    async with consumers(tmp_path, make_config, redis, options, clock, "c1") as [consumer]:
        await consumer._take(await consumer.queue.read_new(10, 0.1), reclaimed=False)
        finished = asyncio.Event()
        flushing = asyncio.create_task(consumer.flush_until(finished))
        for _ in range(66):  # 5.5 hours, 5 minutes a step
            clock.advance(300)
            await asyncio.sleep(0.02)
        finished.set()
        await flushing
    other = StreamQueue(redis, stream_name, options.group, "c2", options.dead_letter)
    assert await other.hold_pairs(["9-1"], [("tok-a", "person@example.com")], clock.time())


@pytest.mark.parametrize("entry", ["kept", "trimmed after"])
async def test_a_message_lost_to_another_worker_does_not_hold_its_pair_again(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
    entry: str,
) -> None:
    """A worker stalled past --claim-idle has a message claimed by another, which fails it
    for good (dead-lettered: its pair let go of; its entry then trimmed, or not). Waking
    in the next period, the first does not take that pair again: a requeued copy is read
    as new, not as a duplicate."""
    options = StreamOptions(url=redis_server, stream=stream_name, claim_idle=0.05)
    await enqueue_rows(redis, stream_name, [("tok-a", "ann@example.com")])
    clock = FakeClock(start=LATE)
    async with consumers(tmp_path, make_config, redis, options, clock, "w1", "w2") as workers:
        stalled, other = workers
        await stalled._take(await stalled.queue.read_new(10, 0.1), reclaimed=False)
        await asyncio.sleep(0.1)  # idle past --claim-idle (Redis's own clock)
        claimed = await other.queue.claim_idle(options.claim_idle)
        await other._take(claimed, reclaimed=True, claimed=True)
        other.on_outcome(Outcome("tok-a", ["ann@example.com"], Status.FAILED, 404, 1,
                                 clock.time(), clock.time(),
                                 Failure("token_not_found", "no shared dashboard")))  # fmt: skip
        await other.flush()
        if entry == "trimmed after":
            await redis.xtrim(stream_name, maxlen=0)
        clock.advance(HOLD_SECONDS)
        await stalled.keep_held()
    copy = StreamQueue(redis, stream_name, options.group, "w3", options.dead_letter)
    assert await copy.hold_pairs(["9-1"], [("tok-a", "ann@example.com")], clock.time()) == set()


async def test_a_dead_letter_lets_go_of_its_own_hold_only(redis: Redis, stream_name: str) -> None:
    """A message dead-lettered lets go of its pair where it holds it (a requeued copy can
    take it), but not of the hold another message of the same pair has taken meanwhile
    (it lost its own, or was dead-lettered twice): that copy stays the one held."""
    queue = StreamQueue(redis, stream_name, "invite-worker", "c1", f"{stream_name}:dead")
    rows = [("tok-a", "ann@example.com"), ("tok-b", "bo@example.com")]
    await enqueue_rows(redis, stream_name, rows)
    await queue.ensure_group()
    a, b = [mid for mid, _ in await queue.read_new(2, 0.1)]
    now = FakeClock(start=LATE).time()
    assert not await queue.hold_pairs([a, b], [("tok-a", "Ann@example.com"),
                                               ("tok-b", "bo@example.com")], now)  # fmt: skip
    # Another message (a copy requeued meanwhile) has taken b's pair.
    for key in queue._pair_hashes(now):
        await redis.hset(key, "tok-b\tbo@example.com", "9-9")
    dead = [(mid, {"token": token, "email": email, "stream_id": mid, "error_code": "x"})
            for mid, (token, email) in ((a, ("tok-a", "Ann@example.com")),
                                        (b, ("tok-b", "bo@example.com")))]  # fmt: skip
    await queue.settle([], dead, now)
    copies = StreamQueue(redis, stream_name, "invite-worker", "c2", f"{stream_name}:dead")
    taken = await copies.hold_pairs(["8-1", "8-2"], [("tok-a", "ann@example.com"),
                                                     ("tok-b", "bo@example.com")], now)  # fmt: skip
    assert taken == {"8-2"}  # a's pair was let go of; b's copy still holds its own
    assert await redis.xlen(f"{stream_name}:dead") == 2


async def test_a_long_lived_worker_keeps_no_deleted_dashboard_past_its_check(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Fifty tokens answer 404 once and never come again: once their dashboard check has
    aged, the worker keeps none of them (it would otherwise hold each for its life)."""
    options = StreamOptions(url=redis_server, stream=stream_name)
    clock = FakeClock()

    def aged_in_a_minute(**overrides: object) -> Config:
        return make_config(preflight_ttl=60.0, **overrides)

    async with consumers(tmp_path, aged_in_a_minute, redis, options, clock, "c1") as [consumer]:
        for n in range(50):
            for outcome in await consumer.sender.send(Batch(f"gone{n:03d}-x", ["a@example.com"])):
                consumer.on_outcome(outcome)
        assert (len(consumer.gone), len(consumer.sender.dead_tokens)) == (50, 50)
        clock.advance(30)
        await consumer._take([], reclaimed=False)  # a read of nothing, as the loop's
        assert (len(consumer.gone), len(consumer.sender.dead_tokens)) == (50, 50)
        clock.advance(31)
        await consumer._take([], reclaimed=False)
        assert (len(consumer.gone), len(consumer.sender.dead_tokens)) == (0, 0)
