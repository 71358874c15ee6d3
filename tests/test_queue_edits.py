"""--add-invitees in queue mode: workers of one stream edit a dashboard one at a time.

The API has no version or ETag: a write puts back the invitees its writer read, with its
additions. Two workers adding at once each wrote over the other's additions: people
invited whom the dashboard then did not let in, and rows refused for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import by_kind, read_report
from tests.test_queue import add, options
from worker.config import Config
from worker.emulator import Emulator
from worker.queue import edits as edits_module
from worker.queue.edits import DashboardEdits
from worker.queue.runner import run_stream
from worker.queue.stream import StreamQueue
from worker.send import client_for
from worker.send.invitees import add_invitees
from worker.send.replies import Dashboard

TOKENS = ("dash-0", "dash-1")


async def test_two_workers_adding_invitees_at_once_keep_each_others_additions(
    tmp_path: Path,
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Two workers drain 2,000 pairs over two dashboards that allow nobody yet, each
    adding its batches' addresses to the invitees: every address ends up an invitee and
    invited once, no row is refused or dead-lettered, nothing is left pending."""
    boards = [emulator.add_dashboard(token, invitees=[]) for token in TOKENS]
    pairs = [(TOKENS[i % 2], f"p{i}@example.com") for i in range(2000)]
    await add(redis, stream_name, pairs)
    config = make_config(batch_size=20, concurrency=4, add_invitees=True)
    reports = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    results = await asyncio.wait_for(asyncio.gather(*(
        run_stream(dataclasses.replace(config, report_path=report),
                   options(redis_server, stream_name, consumer=f"w{i}", read_count=40))
        for i, report in enumerate(reports)
    )), 120)  # fmt: skip
    failed = [b for r in reports for b in by_kind(read_report(r), "batch") if b["status"] != "sent"]
    assert failed == []
    assert [r.exit_code for r in results] == [0, 0]
    assert all(r.summary.emails_sent for r in results)  # both took part
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    for token, board in zip(TOKENS, boards, strict=True):
        assert board.invitees is not None
        assert set(board.invitees) == {e for t, e in pairs if t == token}
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def test_a_worker_waits_for_another_edit_of_the_dashboard_and_a_stop_ends_the_wait(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """While another worker holds the dashboard's edit lock, a worker adding invitees
    neither writes the dashboard nor invites anyone; a stop ends its wait at once, with
    16 batches of the token queued behind its own lock (each waited half a second before
    it looked at the stop): exit 3, the messages left pending for a worker to claim."""
    board = emulator.add_dashboard(TOKENS[0], invitees=[])
    await redis.set(f"{stream_name}:edits:{TOKENS[0]}:lock", "another-worker", px=60_000)
    pairs = [(TOKENS[0], f"w{i}@example.com") for i in range(40)]
    await add(redis, stream_name, pairs)
    stop = asyncio.Event()
    config = make_config(batch_size=1, concurrency=16, add_invitees=True)
    run = asyncio.create_task(run_stream(config, options(redis_server, stream_name), stop=stop))
    for _ in range(200):  # until it read the dashboard and met the lock
        if any(r.method == "GET" and "invitation" not in r.path for r in emulator.requests):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)  # two of its looks at the stop, the lock still held
    assert [r.method for r in emulator.requests if r.method != "GET"] == []
    stop.set()
    result = await asyncio.wait_for(run, 3)
    assert result.exit_code == 3
    assert board.invitees == {}
    assert emulator.invited == Counter()
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 40


async def test_an_edit_lock_left_by_a_killed_worker_holds_the_dashboard_only_until_it_expires(
    tmp_path: Path,
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A lock whose holder died expires (here after 1 s): the next worker then adds the
    invitees and invites everyone, once, and lets go of the lock."""
    board = emulator.add_dashboard(TOKENS[0], invitees=[])
    lock = f"{stream_name}:edits:{TOKENS[0]}:lock"
    await redis.set(lock, "a-killed-worker", px=1000)
    pairs = [(TOKENS[0], f"k{i}@example.com") for i in range(5)]
    await add(redis, stream_name, pairs)
    config = make_config(batch_size=5, add_invitees=True)
    result = await asyncio.wait_for(run_stream(config, options(redis_server, stream_name)), 20)
    assert result.exit_code == 0
    assert board.invitees is not None
    assert set(board.invitees) == {e for _, e in pairs}
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    assert await redis.exists(lock) == 0


async def test_a_lock_lost_while_stalled_is_taken_again_before_the_write(
    redis: Redis, stream_name: str
) -> None:
    """The holder confirms its lock as its write leaves: still its own, yes; once it
    expired during a stall and another worker took it, the holder waits for that worker,
    takes it again and is told to read afresh; it lets go at the end."""
    queue = StreamQueue(redis, stream_name, "invite-worker", "w0", f"{stream_name}:dead")
    key = f"{stream_name}:edits:{TOKENS[0]}:lock"
    async with DashboardEdits(queue, asyncio.Event()).hold(TOKENS[0]) as confirm:
        assert await confirm() is True
        await redis.set(key, "another-worker", px=300)  # ours expired; another took it
        assert await asyncio.wait_for(confirm(), 10) is False
        assert await redis.get(key) not in (None, "another-worker")  # ours again
        assert await confirm() is True
    assert await redis.exists(key) == 0


async def test_a_renewal_whose_cancellation_comes_back_as_a_timeout_ends_with_the_edit(
    redis: Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit's lock renewal is ended when the edit is, even when its cancellation,
    landing as a Redis command times out, comes back as that command's timeout (a
    RedisError the renewal passes over): before, the renewal went on renewing the lock
    for good and the edit waited for it forever (a queue worker hung after a SIGSTOP)."""
    monkeypatch.setattr(edits_module, "LOCK_TTL", 0.3)  # a renewal every 0.1 s
    queue = StreamQueue(redis, stream_name, "invite-worker", "w0", f"{stream_name}:dead")
    edits = DashboardEdits(queue, asyncio.Event())
    renewing = asyncio.Event()

    async def renewal_timing_out(**kwargs: object) -> int:
        renewing.set()
        try:
            await asyncio.sleep(30)  # a command out when the edit ends
        except asyncio.CancelledError:
            raise RedisTimeoutError("Timeout reading from socket") from None
        return 1

    edits._renew_script = renewal_timing_out
    key = f"{stream_name}:edits:{TOKENS[0]}:lock"

    async def one_edit() -> None:
        async with edits.hold(TOKENS[0]):
            await asyncio.wait_for(renewing.wait(), 5)

    await asyncio.wait_for(one_edit(), 5)
    assert await redis.exists(key) == 0  # let go of, and renewed by nobody


async def test_a_write_whose_lock_was_lost_is_not_sent_and_the_dashboard_is_read_afresh(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """--add-invitees told, as its write leaves, that its lock was lost (another worker
    added someone meanwhile): that write does not go; it reads again and writes both
    additions, the other worker's kept."""
    emulator.add_dashboard(TOKENS[0], invitees=["first@example.com"])
    answers = [False, True]

    async def confirm() -> bool:
        if not answers[0]:  # what the other worker did while this one was stalled
            emulator.add_dashboard(TOKENS[0], invitees=["first@example.com",
                                                        "other@example.com"])  # fmt: skip
        return answers.pop(0)

    async def paced(call: Callable[[], Awaitable[Dashboard]]) -> Dashboard:
        return await call()

    async with client_for(make_config()) as client:
        added = await add_invitees(paced, client, TOKENS[0], ["mine@example.com"],
                                   confirm=confirm)  # fmt: skip
    board = emulator.dashboards[TOKENS[0]]
    assert added == ["mine@example.com"]
    assert board.invitees is not None
    assert set(board.invitees) == {"first@example.com", "other@example.com", "mine@example.com"}
    assert [r.method for r in emulator.requests].count("PUT") == 1
