"""Queue mode against a real Redis server: groups, acknowledgements, claiming, shared limits."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    TOKEN_A,
    Proc,
    by_kind,
    each_invited_once_nothing_left,
    emulator_invited,
    on_a_terminal,
    read_report,
    worker_command,
    worker_env,
)
from worker.config import Config
from worker.emulator import Emulator, Faults
from worker.errors import ReportLocked
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.queue.stream import StreamQueue
from worker.record.lock import hold_report


def options(url: str, stream: str, **extra: Any) -> StreamOptions:
    values: dict[str, Any] = {"url": url, "stream": stream, "until_empty": True,
                              "claim_idle": 60.0}  # fmt: skip
    return StreamOptions(**{**values, **extra})


async def add(redis: Redis, stream: str, pairs: list[tuple[str, str]]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for token, email in pairs:
            pipe.xadd(stream, {"token": token, "email": email})
        await pipe.execute()


def sent_in(*reports: Path) -> Counter[tuple[str, str]]:
    return Counter(
        (b["token"], e.lower())
        for report in reports
        for b in by_kind(read_report(report), "batch")
        if b["status"] == "sent"
        for e in b["emails"]
    )


async def test_enqueue_loads_valid_rows_and_reports_rejected(
    tmp_path: Path, redis_server: str, redis: Redis, stream_name: str
) -> None:
    """1,000 valid rows become 1,000 messages; bad rows are counted, not enqueued."""
    source = tmp_path / "in.csv"
    source.write_text(
        "token,email\n"
        + "".join(f"tok-{i % 4},u{i}@example.com\n" for i in range(1000))
        + "t,not-an-email\n"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        worker_command("enqueue", str(source), redis_server, "--stream", stream_name),
        env=worker_env(), capture_output=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr.decode()
    assert b'"enqueued": 1000' in done.stdout
    assert b'"invalid_email": 1' in done.stdout
    assert await redis.xlen(stream_name) == 1000


async def test_two_workers_drain_a_group_exactly_once(
    tmp_path: Path,
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """3,000 messages, two workers of one group with --until-empty: both exit 0, everyone
    invited once, nothing pending, the two reports together hold every pair."""
    pairs = [(f"dash-{i % 5}", f"person{i}@example.com") for i in range(3000)]
    await add(redis, stream_name, pairs)
    reports = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    results = await asyncio.gather(*(
        run_stream(make_config(report_path=r, batch_size=50),
                   options(redis_server, stream_name, consumer=f"worker-{i}"))
        for i, r in enumerate(reports)
    ))  # fmt: skip
    assert [r.exit_code for r in results] == [0, 0]
    assert all(r.summary.emails_sent > 0 for r in results)  # both did a share
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    assert sent_in(*reports) == emulator.invited
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def test_bad_messages_are_acknowledged_and_reported_with_their_id(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Invalid messages are rejected by stream id; a JSON payload field is accepted;
    failures for good go to the dead-letter stream with the error."""
    bad = await redis.xadd(stream_name, {"token": "../x", "email": "a@example.com"})
    await redis.xadd(
        stream_name, {"payload": f'{{"token": "{TOKEN_A}", "email": "p@example.com"}}'}
    )
    await redis.xadd(stream_name, {"payload": "[1, 2]"})
    await redis.xadd(stream_name, {"token": TOKEN_A, "email": "no@outside.example"})
    config = make_config()
    result = await run_stream(config, options(redis_server, stream_name))
    records = read_report(config.report_path)
    rejected = {r["stream_id"]: r["reason"] for r in by_kind(records, "rejected")}
    assert rejected[bad] == "invalid_token"
    assert "not_an_object" in rejected.values()
    assert emulator.invited == Counter({(TOKEN_A, "p@example.com"): 1})
    entries: Any = await redis.xrange(f"{stream_name}:dead")
    [dead] = [fields for _, fields in entries]
    assert dead["email"] == "no@outside.example"
    assert dead["error_code"] == "bad_request"
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
    assert result.exit_code == 1


async def test_linger_sends_a_trickle_without_waiting_for_a_full_batch(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A partial batch goes once it has waited --linger, with the worker still running."""
    stop = asyncio.Event()
    config = make_config(batch_size=100, linger=0.2)
    task = asyncio.create_task(run_stream(
        config, options(redis_server, stream_name, until_empty=False), stop=stop
    ))  # fmt: skip
    await add(redis, stream_name, [(TOKEN_A, "first@example.com")])
    await asyncio.wait_for(emulator.wait_for_invitations(1), 10)
    await add(redis, stream_name, [(TOKEN_A, "second@example.com")])
    await asyncio.wait_for(emulator.wait_for_invitations(2), 10)
    stop.set()
    result = await asyncio.wait_for(task, 30)
    assert result.exit_code == 3  # a stop is exit 3 in both modes; nothing is lost
    assert result.summary.interrupted is True
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def test_a_dead_workers_messages_are_claimed_and_reconciled_not_resent(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Messages another consumer took, sent (intent recorded) and never acknowledged are
    claimed; what the service created is recorded, the rest sent; over-delivered ones go
    to the dead-letter stream."""
    opts = options(redis_server, stream_name, claim_idle=0.05, max_deliveries=3)
    await redis.xgroup_create(stream_name, "invite-worker", id="0", mkstream=True)
    done = [(TOKEN_A, f"done{i}@example.com") for i in range(3)]
    await add(redis, stream_name, [*done, (TOKEN_A, "never@example.com")])
    taken: Any = await redis.xreadgroup("invite-worker", "dead-worker", {stream_name: ">"})
    ids: list[str] = [mid for mid, _ in taken[0][1]]
    sent_at = emulator._clock() - 10  # long enough ago that no request can be in progress
    await redis.hset(f"{stream_name}:invite-worker:intents",
                     mapping=dict.fromkeys(ids, repr(sent_at)))  # fmt: skip
    board = emulator.add_dashboard(TOKEN_A)
    for _, email in done:  # the dead worker's POST had created these
        board.invitations.append((email, sent_at + 0.2))
        emulator.invited[(TOKEN_A, email)] += 1
    over = await redis.xadd(stream_name, {"token": TOKEN_A, "email": "loop@example.com"})
    await redis.xreadgroup("invite-worker", "crashy", {stream_name: ">"})  # delivery 1
    for i in range(3):  # deliveries 2..4, each consumer dying in turn
        await redis.xautoclaim(stream_name, "invite-worker", f"crashy-{i}", 0, start_id=over,
                               count=1)  # fmt: skip
    await asyncio.sleep(0.1)
    config = make_config()
    result = await run_stream(config, opts)
    assert result.exit_code == 0
    posts = [(r.token, r.emails) for r in emulator.requests if r.method == "POST"]
    assert posts == [(TOKEN_A, 1)]  # only "never@" was sent
    assert max(emulator.invited.values()) == 1
    reconciled = [b for b in by_kind(read_report(config.report_path), "batch")
                  if b.get("reconciled")]  # fmt: skip
    assert sorted(reconciled[0]["emails"]) == sorted(e for _, e in done)
    dead_letters: Any = await redis.xrange(f"{stream_name}:dead")
    [(_, dead)] = dead_letters
    assert dead["email"] == "loop@example.com"
    assert dead["error_code"] == "max_deliveries"
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def test_two_workers_share_the_rate_limit(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Two workers against a limited service stay inside it together: at most one 429."""
    pairs = [(f"dash-{i % 4}", f"person{i}@example.com") for i in range(480)]
    await add(redis, stream_name, pairs)
    async with Emulator(api_key=API_KEY, app_key=APP_KEY, limit=8, period=0.5) as emu:
        results = await asyncio.gather(*(
            run_stream(make_config(api_url=emu.url, report_path=tmp_path / f"{i}.jsonl",
                                   batch_size=10, concurrency=4),
                       options(redis_server, stream_name, consumer=f"w{i}"))
            for i in range(2)
        ))  # fmt: skip
        assert [r.exit_code for r in results] == [0, 0]
        assert emu.invited == Counter(dict.fromkeys(pairs, 1))
        assert emu.stats()["rate_limited"] <= 1


def test_a_worker_killed_mid_run_is_finished_by_another(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """SIGKILL one worker mid-run; a second with --claim-idle 1 finishes the stream:
    every pair invited exactly once, nothing pending."""
    url = start_emulator("--limit", "20", "--period", "1")
    source = tmp_path / "in.csv"
    pairs = {(f"dash-{i % 3}", f"person{i}@example.com") for i in range(2000)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    spawn("enqueue", str(source), redis_server, "--stream", stream_name).expect(0, timeout=60)

    def worker(name: str, *extra: str) -> Proc:
        return spawn("run", redis_server, "--stream", stream_name, "--consumer", name,
                     "--until-empty", "--linger", "0.1", "--api-url", url,
                     "--report", str(tmp_path / f"{name}.jsonl"), "--batch-size", "50",
                     "--reconcile-delay", "0.2", "--timeout", "3", *extra)  # fmt: skip

    first = worker("first")
    deadline = time.monotonic() + 30
    while sum(emulator_invited(url).values()) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.popen.send_signal(signal.SIGKILL)
    first.expect(-signal.SIGKILL, timeout=10)
    assert sum(emulator_invited(url).values()) < len(pairs)
    second = worker("second", "--claim-idle", "1")
    second.expect(0, timeout=120)
    each_invited_once_nothing_left(url, pairs, redis_server, stream_name)
    second_report = read_report(tmp_path / "second.jsonl")
    assert by_kind(second_report, "rejected") == []


async def test_a_message_claimed_back_while_its_ack_is_under_way_is_not_new_work(
    redis: Redis,
    redis_server: str,
    stream_name: str,
    make_config: Callable[..., Config],
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages settled here but not yet acknowledged, claimed back by this worker's own
    periodic claim, are not new work: one record each, no 'duplicate' rejection, none
    counted as claimed from another worker, exit 0.

    This race made the two-worker SIGKILL test flaky on a loaded machine: the second
    worker's own settled messages were claimed back after --claim-idle and handled again."""
    await add(redis, stream_name, [(TOKEN_A, f"p{i}@example.com") for i in range(5)])
    settle = StreamQueue.settle

    async def slow_settle(self: StreamQueue, acks: list[str], dead: Any, now: float) -> None:
        await asyncio.sleep(1.2)  # a loaded machine: the claim cycle (0.5 s) comes first
        await settle(self, acks, dead, now)

    monkeypatch.setattr(StreamQueue, "settle", slow_settle)
    config = make_config(batch_size=5)
    stop = asyncio.Event()
    # Not --until-empty: its check would flush from the read loop itself; the race is
    # between the background flusher and the loop's claim cycle.
    loop = asyncio.get_running_loop()
    loop.call_later(2.5, stop.set)
    with capture_logs():
        result = await run_stream(
            config,
            options(redis_server, stream_name, claim_idle=0.05, until_empty=False),
            stop=stop,
        )
    assert result.exit_code == 3, result.summary  # stopped: exit 3 in both modes
    assert result.summary.read.claimed == 0  # its own, claimed back: no other worker's
    records = read_report(config.report_path)
    assert by_kind(records, "rejected") == []
    assert sorted(e for b in by_kind(records, "batch") for e in b["emails"]) == sorted(
        f"p{i}@example.com" for i in range(5)
    )
    assert emulator.invited == Counter({(TOKEN_A, f"p{i}@example.com"): 1 for i in range(5)})
    assert await redis.xpending(stream_name, "invite-worker") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_a_queue_worker_refuses_a_report_another_run_holds(
    redis_server: str, stream_name: str, make_config: Callable[..., Config]
) -> None:
    """Queue workers lock their own reports too: one already held is refused at once."""
    config = make_config()
    with hold_report(config.report_path), pytest.raises(ReportLocked, match="in use"):
        await run_stream(config, options(redis_server, stream_name))


@pytest.mark.timeout(60)
async def test_a_queue_worker_on_a_terminal_shows_a_bar_and_the_summary(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """On a terminal a stream worker shows messages read, pending and dead-lettered as it
    goes, then the summary table; its log has no thirty-field run.finished line."""
    url = start_emulator()
    gone = "gone1234gone1234-0123456789abcdef0123456789abcdef"
    await add(redis, stream_name, [(TOKEN_A, f"t{i}@example.com") for i in range(300)]
              + [(gone, "nobody@example.com")])  # fmt: skip
    code, seen = await asyncio.to_thread(
        on_a_terminal,
        worker_command("run", redis_server, "--stream", stream_name, "--until-empty",
                       "--linger", "0.05", "--api-url", url, "--report",
                       str(tmp_path / "r.jsonl")),
    )  # fmt: skip
    assert code == 1  # the dead-lettered message failed
    assert b"messages 301" in seen
    assert b"pending " in seen
    assert b"dead-lettered 1" in seen
    assert b"Done: " in seen
    assert b"run.finished" not in seen


@pytest.mark.parametrize("protocol", ["", "?protocol=2", "?protocol=3"])
async def test_a_worker_reads_the_stream_over_either_protocol(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
    protocol: str,
) -> None:
    """Replies are read as Redis sends them, in RESP2's shape or RESP3's: every message,
    in whatever field order a producer wrote it, is invited once and acknowledged."""
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(250)]
    await add(redis, stream_name, pairs[:240])
    for token, email in pairs[240:]:  # another producer: other field order, extra fields
        await redis.xadd(stream_name, {"source": "crm", "email": email, "token": token})
    result = await run_stream(make_config(), options(redis_server + protocol, stream_name))
    assert result.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0


async def test_a_backlog_is_sent_in_full_batches_whatever_the_linger(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """2,000 waiting messages over 10 tokens, read 100 at a time with --linger 0: while
    reads come back full, partial batches wait and fill, so every request carries 100
    addresses (half-full ones would spend the rate limit on half the emails)."""
    pairs = [(f"dash-{i % 10}", f"b{i}@example.com") for i in range(2000)]
    await add(redis, stream_name, pairs)
    opts = options(redis_server, stream_name, read_count=100)
    result = await run_stream(make_config(batch_size=100, linger=0.0), opts)
    assert result.exit_code == 0
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert len(posts) == 20
    assert {r.emails for r in posts} == {100}
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))


async def test_a_pair_enqueued_twice_and_read_by_two_workers_is_sent_once(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A producer enqueues its 600 pairs twice; two workers drain the stream at once, each
    having checked the dashboards before anything was invited. Each pair is invited once:
    the copy read by the other worker is rejected as a duplicate, and nothing is pending."""
    emulator = Emulator(api_key=API_KEY, app_key=APP_KEY,
                        faults=Faults(slow_rate=1.0, slow_seconds=0.2))  # fmt: skip
    await emulator.start()
    try:
        pairs = [(f"dash-{i % 6}", f"twice{i}@example.com") for i in range(600)]
        await add(redis, stream_name, pairs)
        await add(redis, stream_name, pairs)
        config = make_config(api_url=emulator.url, batch_size=20, concurrency=4)
        reports = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
        results = await asyncio.gather(*(
            run_stream(dataclasses.replace(config, report_path=report),
                       options(redis_server, stream_name, consumer=f"w{i}", read_count=50))
            for i, report in enumerate(reports)
        ))  # fmt: skip
    finally:
        await emulator.stop()
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))
    duplicates = [r for report in reports for r in by_kind(read_report(report), "rejected")
                  if r["reason"] == "duplicate"]  # fmt: skip
    assert len(duplicates) == 600
    assert sum(r.summary.emails_sent for r in results) == 600
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
